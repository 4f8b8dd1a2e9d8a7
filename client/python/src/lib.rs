//! The native half of the `hetkv` Python package: the client crate's cluster, tables and caches,
//! and an in-process cluster, as Python classes. NumPy arrays go in and out without copies where
//! their layout allows (u64 keys, f32 rows, C-contiguous); every call that talks to a shard
//! releases the GIL; errors are subclasses of `hetkv.Error` carrying the Rust message.
//!
//! The Python half (`python/hetkv`) re-exports these names and adds `hetkv.torch`.
//!
//! One Python class a file: `cluster` (`Cluster`, `connect`), `embedded` (`EmbeddedCluster`),
//! `table` (`Table`), `cache` (`Cache`), `group` (`lookup_many`, `prefetch_many`,
//! `update_many`), `specs` (`Initializer`, `Optimizer`, `Dynamic`); beside them `errors` (the
//! exception classes, the mapping of Rust errors onto them, the GIL-releasing wait), `arrays`
//! (NumPy arguments and results) and `cli` (the store's command line, which the wheel's `hetkv`
//! console script runs: the daemon and the operator commands, the `hetkv` binary's flags). This
//! file registers them.

use pyo3::prelude::*;

mod arrays;
mod cache;
mod cli;
mod cluster;
mod embedded;
mod errors;
mod group;
mod specs;
mod table;

pub(crate) use arrays::*;
pub(crate) use cache::*;
pub(crate) use cluster::*;
pub(crate) use embedded::*;
pub(crate) use errors::*;
pub(crate) use group::*;
pub(crate) use specs::*;
pub(crate) use table::*;

/// The native module, `hetkv._hetkv`.
#[pymodule]
fn _hetkv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(cli::run_cli, m)?)?;
    m.add_function(wrap_pyfunction!(lookup_many, m)?)?;
    m.add_function(wrap_pyfunction!(prefetch_many, m)?)?;
    m.add_function(wrap_pyfunction!(update_many, m)?)?;
    m.add_class::<Cluster>()?;
    m.add_class::<EmbeddedCluster>()?;
    m.add_class::<Table>()?;
    m.add_class::<Cache>()?;
    m.add_class::<Initializer>()?;
    m.add_class::<Optimizer>()?;
    m.add_class::<Dynamic>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ConnectionError", py.get_type::<ConnectionError>())?;
    m.add("UnknownTableError", py.get_type::<UnknownTableError>())?;
    m.add("KeyOutOfRangeError", py.get_type::<KeyOutOfRangeError>())?;
    m.add("WrongDimError", py.get_type::<WrongDimError>())?;
    m.add(
        "InvalidGradientError",
        py.get_type::<InvalidGradientError>(),
    )?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("TableConflictError", py.get_type::<TableConflictError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    m.add("PartlyAppliedError", py.get_type::<PartlyAppliedError>())?;
    m.add("PushesUnknownError", py.get_type::<PushesUnknownError>())?;
    m.add("RollbackError", py.get_type::<RollbackError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The Rust side's logs (restarts noticed, pushes held, rollbacks) reach Python's `logging`,
    // under loggers named after their Rust module (`hetkv_client.cache.core`, ...).
    let _ = pyo3_log::try_init();
    Ok(())
}
