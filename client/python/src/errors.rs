//! Python's exceptions for hetkv's errors (`hetkv.Error` and its subclasses), the mapping of
//! the client's and the store's errors onto them, and the wait that releases the GIL and lets
//! Ctrl-C through.

use std::sync::Mutex;

use hetkv_client::cache::CacheError;
use hetkv_client::ClientError;
use hetkv_transport::{ErrorCode, TransportError};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    hetkv,
    Error,
    PyException,
    "The base of every hetkv error; its message is the Rust client's."
);
create_exception!(
    hetkv,
    ConnectionError,
    Error,
    "A shard could not be reached, or broke the connection, within the call's deadline."
);
create_exception!(
    hetkv,
    UnknownTableError,
    Error,
    "No shard holds a table of that name."
);
create_exception!(
    hetkv,
    KeyOutOfRangeError,
    Error,
    "A key outside the table's [0, rows)."
);
create_exception!(
    hetkv,
    WrongDimError,
    Error,
    "Rows or gradients whose shape does not match the keys and the table's dim."
);
create_exception!(
    hetkv,
    InvalidGradientError,
    Error,
    "A gradient holding NaN or infinity: nothing was applied."
);
create_exception!(
    hetkv,
    CheckpointError,
    Error,
    "A checkpoint could not be written (nothing committed was lost)."
);
create_exception!(
    hetkv,
    TableConflictError,
    Error,
    "A table of that name exists with another spec, or the spec is invalid."
);
create_exception!(
    hetkv,
    ProtocolError,
    Error,
    "A shard broke the protocol, or the shards disagree about the cluster."
);
create_exception!(
    hetkv,
    RemoteError,
    Error,
    "A shard refused the request for another reason (its message says why)."
);
create_exception!(
    hetkv,
    RollbackError,
    Error,
    "A shard restarted from a checkpoint that lacks pushes it had acknowledged: those updates are lost. Raised once per rollback; the next call goes on (Cluster.on_rollback = \"continue\" only logs it)."
);
create_exception!(
    hetkv,
    PartlyAppliedError,
    Error,
    "A write spanning shards that some applied and others did not: the message says which did what."
);

create_exception!(
    hetkv,
    PushesUnknownError,
    Error,
    "Pushes whose fate no one can tell (the shard may or may not have applied them); they were not sent again, so none was applied twice."
);

/// Runs `f` without the GIL, as every call that may wait on the network does, and interruptibly:
/// its waits are cut into slices (`hetkv_transport::interrupt`), between which this thread takes
/// the GIL and runs Python's signal handlers. When one raises (Ctrl-C: `KeyboardInterrupt`), the
/// call's waits end within a slice and that exception is what the call raises; a push it had sent
/// is then held by the transport and delivered under its number by the next call (or `flush`).
pub(crate) fn interruptible<T: Send, E: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, E> + Send,
    error: impl FnOnce(E) -> PyErr,
) -> PyResult<T> {
    let raised: std::sync::Arc<Mutex<Option<PyErr>>> = Default::default();
    let poll_raised = raised.clone();
    let result = py.detach(move || {
        hetkv_transport::interrupt::with_poll(
            move || {
                Python::attach(|py| match py.check_signals() {
                    Ok(()) => false,
                    Err(e) => {
                        *poll_raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        true
                    }
                })
            },
            f,
        )
    });
    if let Some(e) = raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    result.map_err(error)
}

/// The Python exception for a client error.
pub(crate) fn py_err(e: ClientError) -> PyErr {
    let message = e.to_string();
    match &e {
        ClientError::Transport(t) => match t {
            TransportError::Io { .. } | TransportError::Held { .. } => {
                ConnectionError::new_err(message)
            }
            TransportError::Protocol { .. } => ProtocolError::new_err(message),
            TransportError::Unknown { .. } => PushesUnknownError::new_err(message),
            TransportError::InvalidRequest { .. } => RemoteError::new_err(message),
            TransportError::Remote { error, .. } => match error.code {
                ErrorCode::UnknownTable => UnknownTableError::new_err(message),
                ErrorCode::KeyOutOfRange => KeyOutOfRangeError::new_err(message),
                ErrorCode::WrongDim => WrongDimError::new_err(message),
                ErrorCode::InvalidGradient => InvalidGradientError::new_err(message),
                ErrorCode::CheckpointFailed => CheckpointError::new_err(message),
                ErrorCode::ConflictingTable | ErrorCode::InvalidSpec => {
                    TableConflictError::new_err(message)
                }
                _ => RemoteError::new_err(message),
            },
        },
        ClientError::KeyOutOfRange { .. } => KeyOutOfRangeError::new_err(message),
        ClientError::WrongDim { .. } | ClientError::InvalidAssignment { .. } => {
            WrongDimError::new_err(message)
        }
        ClientError::TransportUnavailable(_) => ConnectionError::new_err(message),
        ClientError::UnknownTable(_) => UnknownTableError::new_err(message),
        ClientError::Cache(c) => match c {
            CacheError::KeyOutOfRange { .. } => KeyOutOfRangeError::new_err(message),
            CacheError::WrongDim { .. } => WrongDimError::new_err(message),
            CacheError::NonFinite { .. } => InvalidGradientError::new_err(message),
            CacheError::Replies(_) => ProtocolError::new_err(message),
            CacheError::Unflushed { .. } => Error::new_err(message),
        },
        ClientError::InconsistentCluster(_) => ProtocolError::new_err(message),
        ClientError::CheckpointFailed(_) => CheckpointError::new_err(message),
        ClientError::Prefetch(_) => Error::new_err(message),
        ClientError::InvalidValue { .. } => InvalidGradientError::new_err(message),
        ClientError::PartlyApplied { .. } => PartlyAppliedError::new_err(message),
        ClientError::Closed => ConnectionError::new_err(message),
        ClientError::InvalidGroup(_) | ClientError::ClusterName { .. } => {
            pyo3::exceptions::PyValueError::new_err(message)
        }
        ClientError::RolledBack { .. } => RollbackError::new_err(message),
    }
}

/// The Python exception for an export's or an import's error.
pub(crate) fn store_err(e: hetkv_store::StoreError) -> PyErr {
    use hetkv_store::StoreError as E;
    let message = e.to_string();
    match e {
        E::UnknownTable(_) => UnknownTableError::new_err(message),
        E::KeyOutOfRange(_) => KeyOutOfRangeError::new_err(message),
        E::WrongDim(_) => WrongDimError::new_err(message),
        E::ConflictingTable(_) | E::InvalidSpec(_) => TableConflictError::new_err(message),
        _ => Error::new_err(message),
    }
}
