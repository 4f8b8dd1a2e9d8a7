//! `hetkv.Cluster` and `hetkv.connect`: a client of running shards.

use std::time::Duration;

use hetkv_client::{Cluster as RustCluster, TransportKind};
use hetkv_fallback_tcp::ClientConfig;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::*;

/// A connection to every shard of a cluster (`hetkv.connect`).
#[pyclass(module = "hetkv", subclass, frozen)]
pub(crate) struct Cluster {
    pub(crate) inner: RustCluster,
}

/// The error of pickling or copying `what` (a cluster, a table or a cache: live connections and
/// the rows cached from them), saying what to do instead; `__reduce__` of each returns it, so
/// `pickle`, `copy.deepcopy` and `torch.save` of anything that holds one fail with it.
pub(crate) fn not_copied(what: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "a hetkv {what} holds connections to the shards (and a cache, the rows cached from \
         them): it is not pickled or copied. Save the model with torch.save(model.state_dict()) \
         (hetkv.torch modules put their tables' rows in it) or the tables with \
         cluster.checkpoint(name), and in another process (a DataLoader worker, another rank) \
         connect again with hetkv.connect(addrs)"
    ))
}

#[pymethods]
impl Cluster {
    /// Refused: see [`not_copied`].
    fn __reduce__(&self) -> PyResult<()> {
        Err(not_copied("cluster"))
    }

    /// The shards' addresses, in shard order.
    #[getter]
    fn addrs(&self) -> Vec<String> {
        (0..self.inner.shard_count())
            .map(|i| self.inner.shard(i).addr().to_string())
            .collect()
    }

    /// Creates a table on every shard (or confirms an identical one) and returns it.
    /// `buckets` is the table's placement buckets (the unit of resharding; 4,096 when left out);
    /// with `dynamic` (a `hetkv.Dynamic`) the table takes any u64 key and `rows` is its capacity.
    /// When some shards hold the table with updates applied and others lack it (a shard
    /// restarted on an empty volume), this is refused (`hetkv.ProtocolError` naming them) unless
    /// `fresh=True` says the table starts again, at its initial values, where it is missing.
    #[pyo3(signature = (name, rows, dim, init = None, optimizer = None, buckets = None, dynamic = None, fresh = false))]
    #[allow(clippy::too_many_arguments)]
    fn create_table(
        &self,
        py: Python<'_>,
        name: String,
        rows: u64,
        dim: u32,
        init: Option<Initializer>,
        optimizer: Option<Optimizer>,
        buckets: Option<u32>,
        dynamic: Option<Dynamic>,
        fresh: bool,
    ) -> PyResult<Table> {
        let spec = spec_of(py, name, rows, dim, init, optimizer, (buckets, dynamic))?;
        let inner = interruptible(
            py,
            || match fresh {
                false => self.inner.create_table(&spec),
                true => self.inner.create_table_fresh(&spec),
            },
            py_err,
        )?;
        Ok(Table { inner })
    }

    /// Drops table `name` on every shard: its rows, optimizer state and memory go, and its name
    /// may be created again. A handle of it fails from then on (`hetkv.UnknownTableError`, also
    /// raised when no shard held it); a cache of it fails at its next request to a shard
    /// (lookups its lines answer within their bounds send none).
    fn drop_table(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        interruptible(py, || self.inner.drop_table(name), py_err)
    }

    /// The table named `name` (`hetkv.UnknownTableError` when no shard holds it).
    fn table(&self, py: Python<'_>, name: &str) -> PyResult<Table> {
        let inner = interruptible(py, || self.inner.open_table(name), py_err)?;
        Ok(Table { inner })
    }

    /// Writes checkpoint `name` on every shard (each into its data directory); returns one dict
    /// per shard (`name`, `seq`, `tables`, `rows`, `bytes`, `seconds`).
    #[pyo3(signature = (name, incremental = false))]
    fn checkpoint<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        incremental: bool,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let done = interruptible(py, || self.inner.checkpoint(name, incremental), py_err)?;
        done.into_iter()
            .map(|d| {
                let out = PyDict::new(py);
                out.set_item("name", d.name)?;
                out.set_item("seq", d.seq)?;
                out.set_item("parent", d.parent)?;
                out.set_item("tables", d.tables)?;
                out.set_item("rows", d.rows)?;
                out.set_item("bytes", d.bytes)?;
                out.set_item("seconds", d.micros as f64 / 1e6)?;
                Ok(out)
            })
            .collect()
    }

    /// Each shard's counters, one dict a shard: `shard`, `shards`, `requests` (frames handled:
    /// a batch of many tables' requests is one), `errors`, `rows_read`, `rows_pushed`,
    /// `bytes_in`, `bytes_out`, `connections`, `tables`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let all = interruptible(py, || self.inner.stats(), py_err)?;
        all.into_iter()
            .map(|s| {
                let out = PyDict::new(py);
                out.set_item("shard", s.shard)?;
                out.set_item("shards", s.shards)?;
                out.set_item("requests", s.requests)?;
                out.set_item("errors", s.errors)?;
                out.set_item("rows_read", s.rows_read)?;
                out.set_item("rows_pushed", s.rows_pushed)?;
                out.set_item("bytes_in", s.bytes_in)?;
                out.set_item("bytes_out", s.bytes_out)?;
                out.set_item("connections", s.connections)?;
                out.set_item("tables", s.tables.len())?;
                Ok(out)
            })
            .collect()
    }

    /// What this client has seen of the shards' restarts: `seen`, and the acknowledged pushes a
    /// restore took back (`pushes_rolled_back`, `rows_rolled_back`, `pushes_unknown`).
    fn restarts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.inner.restarts();
        let out = PyDict::new(py);
        out.set_item("seen", r.seen)?;
        out.set_item("pushes_rolled_back", r.pushes_rolled_back)?;
        out.set_item("rows_rolled_back", r.rows_rolled_back)?;
        out.set_item("pushes_unknown", r.pushes_unknown)?;
        Ok(out)
    }

    /// What calls do when a shard's restart took back pushes it had acknowledged: "error" (the
    /// default: the call that learns of it raises `hetkv.RollbackError`, once, after doing its
    /// own work) or "continue" (a warning in the log).
    fn set_on_rollback(&self, on: &str) -> PyResult<()> {
        let on = match on {
            "error" => hetkv_client::OnRollback::Error,
            "continue" => hetkv_client::OnRollback::Continue,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_rollback {other:?} is not \"error\" or \"continue\""
                )))
            }
        };
        self.inner.set_on_rollback(on);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("hetkv.Cluster({:?})", self.addrs())
    }
}

/// Connects to the shards at `addrs` (in shard order), or, given a pattern and `shards`, at the
/// pattern with `{i}` replaced by each shard's index (`"hetkv-{i}.hetkv:7070"`, a StatefulSet's
/// pods behind a headless Service). Each shard's hello must name the place it is listed at.
///
/// `transport` is "auto" (shared memory for shards on this host that expose it, else TCP),
/// "tcp", "shm" or "rdma"; `auth_token` is the daemons' token; `timeout` is every call's
/// deadline in seconds, retries included. `emulated_link_gbps` holds every frame to and from
/// each shard to that bandwidth (a token bucket in the TCP transport: transfer time, no
/// latency), to show a slow network on one machine. An address where no daemon listens fails at
/// once (`hetkv.ConnectionError`), unless `wait_for_daemon` gives it that many seconds to start.
#[pyfunction]
#[pyo3(signature = (addrs, transport = "auto", auth_token = None, timeout = 60.0, emulated_link_gbps = None, wait_for_daemon = 0.0, shards = None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect(
    py: Python<'_>,
    addrs: &Bound<'_, PyAny>,
    transport: &str,
    auth_token: Option<String>,
    timeout: f64,
    emulated_link_gbps: Option<f64>,
    wait_for_daemon: f64,
    shards: Option<u32>,
) -> PyResult<Cluster> {
    let addrs: Vec<String> = match (addrs.extract::<String>(), shards) {
        (Ok(pattern), Some(n)) => hetkv_client::shard_addrs(&pattern, n).map_err(py_err)?,
        (Ok(pattern), None) => {
            return Err(PyValueError::new_err(format!(
                "addrs is the pattern {pattern:?}: give the shard count with shards=N, or a list \
                 of addresses"
            )))
        }
        (Err(_), _) => addrs.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(
                "addrs must be a list of \"host:port\" strings, or a pattern with {i} and shards=N",
            )
        })?,
    };
    let kind: TransportKind = transport.parse().map_err(PyValueError::new_err)?;
    let mut config = client_config(auth_token, timeout)?;
    if !(wait_for_daemon.is_finite() && wait_for_daemon >= 0.0) {
        return Err(PyValueError::new_err(format!(
            "wait_for_daemon must be a number of seconds of at least 0, not {wait_for_daemon}"
        )));
    }
    config.wait_for_daemon = Duration::from_secs_f64(wait_for_daemon);
    if let Some(g) = emulated_link_gbps {
        if !(g.is_finite() && g > 0.0) {
            return Err(PyValueError::new_err(format!(
                "emulated_link_gbps must be a positive number, not {g}"
            )));
        }
        config.emulated_link = Some(hetkv_fallback_tcp::LinkLimit::gbit(g));
    }
    let inner = interruptible(py, || RustCluster::connect(&addrs, kind, &config), py_err)?;
    Ok(Cluster { inner })
}

pub(crate) fn client_config(auth_token: Option<String>, timeout: f64) -> PyResult<ClientConfig> {
    if !(timeout.is_finite() && timeout > 0.0) {
        return Err(PyValueError::new_err(format!(
            "timeout must be a positive number of seconds, not {timeout}"
        )));
    }
    let deadline = Duration::from_secs_f64(timeout);
    Ok(ClientConfig {
        auth: auth_token,
        connect_timeout: deadline.min(Duration::from_secs(5)),
        io_timeout: Some(deadline),
        deadline,
        name: format!("hetkv-python pid {}", std::process::id()),
        ..ClientConfig::default()
    })
}

/// A cluster's shard transports, in shard order (what export and import take).
pub(crate) fn shards_of(cluster: &RustCluster) -> Vec<&dyn hetkv_transport::ShardTransport> {
    (0..cluster.shard_count())
        .map(|i| &**cluster.shard(i) as &dyn hetkv_transport::ShardTransport)
        .collect()
}
