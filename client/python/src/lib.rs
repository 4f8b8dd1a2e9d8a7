//! The native half of the `hetkv` Python package: the client crate's cluster, tables and caches,
//! and an in-process cluster, as Python classes. NumPy arrays go in and out without copies where
//! their layout allows (u64 keys, f32 rows, C-contiguous); every call that talks to a shard
//! releases the GIL; errors are subclasses of `hetkv.Error` carrying the Rust message.
//!
//! The Python half (`python/hetkv`) re-exports these names and adds `hetkv.torch`.

use std::sync::Mutex;
use std::time::Duration;

use hetkv_client::cache::CacheError;
use hetkv_client::{
    Bound as CacheBound, CacheConfig, CachedTable, Capacity, ClientError, Cluster as RustCluster,
    PolicyKind, Table as RustTable, TransportKind, UpdateRuleKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_transport::{
    Admission, DynamicSpec, ErrorCode, Eviction, Initializer as RustInit, OptimizerSpec, TableSpec,
    TransportError,
};
use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1,
    PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

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
fn interruptible<T: Send, E: Send>(
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
fn py_err(e: ClientError) -> PyErr {
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
        ClientError::WrongDim { .. } => WrongDimError::new_err(message),
        ClientError::TransportUnavailable(_) => ConnectionError::new_err(message),
        ClientError::UnknownTable(_) => UnknownTableError::new_err(message),
        ClientError::Cache(c) => match c {
            CacheError::KeyOutOfRange { .. } => KeyOutOfRangeError::new_err(message),
            CacheError::WrongDim { .. } => WrongDimError::new_err(message),
            CacheError::NonFinite { .. } => InvalidGradientError::new_err(message),
            CacheError::Replies(_) => ProtocolError::new_err(message),
        },
        ClientError::InconsistentCluster(_) => ProtocolError::new_err(message),
        ClientError::CheckpointFailed(_) => CheckpointError::new_err(message),
        ClientError::Prefetch(_) => Error::new_err(message),
        ClientError::InvalidValue { .. } => InvalidGradientError::new_err(message),
        ClientError::PartlyApplied { .. } => PartlyAppliedError::new_err(message),
        ClientError::Closed => ConnectionError::new_err(message),
        ClientError::RolledBack { .. } => RollbackError::new_err(message),
    }
}

/// The Python exception for an export's or an import's error.
fn store_err(e: hetkv_store::StoreError) -> PyErr {
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

fn dtype_of(obj: &Bound<'_, PyAny>) -> String {
    match obj.getattr("dtype") {
        Ok(d) => d.str().map_or_else(|_| "?".into(), |s| s.to_string()),
        Err(_) => obj
            .get_type()
            .name()
            .map_or_else(|_| "?".into(), |n| n.to_string()),
    }
}

/// `obj` as a read-only view of a 1-D array of `T` (its `what` for messages).
fn array1<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    obj.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a 1-D numpy array of {dtype} (got {} of {}); convert it with \
             numpy.asarray(..., dtype=numpy.{dtype})",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string()),
            dtype_of(obj)
        ))
    })
}

/// Keys as Python hands them: numpy uint64 (read in place), or int64, torch's dtype for ids,
/// taken as its u64 bit pattern (copied): a raw 64-bit feature id at or above 2^63 is negative
/// as an int64, and is the same key either way.
enum Keys<'py> {
    U64(PyReadonlyArray1<'py, u64>),
    I64(Vec<u64>),
}

impl Keys<'_> {
    /// The keys, refusing a strided uint64 array.
    fn slice(&self) -> PyResult<&[u64]> {
        match self {
            Self::U64(a) => contiguous(a, "keys"),
            Self::I64(v) => Ok(v),
        }
    }
}

/// `obj` as keys: a 1-D numpy array of uint64 or int64.
fn keys_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Keys<'py>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u64>>() {
        return Ok(Keys::U64(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, i64>>() {
        return Ok(Keys::I64(a.as_array().iter().map(|&k| k as u64).collect()));
    }
    Err(PyTypeError::new_err(format!(
        "keys must be a 1-D numpy array of uint64 or int64 (got {} of {}); an int64 key is taken \
         as its u64 bit pattern, as torch's int64 carries raw 64-bit ids",
        obj.get_type()
            .name()
            .map_or_else(|_| "?".into(), |n| n.to_string()),
        dtype_of(obj)
    )))
}

/// `obj` as a read-only view of a 2-D array of f32.
fn rows2<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray2<'py, f32>> {
    obj.extract::<PyReadonlyArray2<'py, f32>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a 2-D numpy array of float32, keys x dim (got {} of {})",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string()),
            dtype_of(obj)
        ))
    })
}

/// The elements of `array` in row-major order, borrowed: only a C-contiguous array has them so
/// (a Fortran-ordered one is contiguous too, but column by column, and reading it as rows would
/// take its values for the wrong keys), so any other layout is refused, saying how to convert.
fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    let refuse = || {
        PyValueError::new_err(format!(
            "{what} must be C-contiguous (row-major): pass numpy.ascontiguousarray({what})"
        ))
    };
    if !array.is_c_contiguous() {
        return Err(refuse());
    }
    array.as_slice().map_err(|_| refuse())
}

fn check_rows(shape: &[usize], keys: usize, dim: usize, what: &str, table: &str) -> PyResult<()> {
    if shape != [keys, dim] {
        return Err(WrongDimError::new_err(format!(
            "table {table} has dim {dim}: {what} of shape {shape:?} does not fit {keys} keys \
             (want ({keys}, {dim}))"
        )));
    }
    Ok(())
}

/// How a table's rows start (`hetkv.Initializer.zeros()`, `.uniform(bound, seed)`,
/// `.normal(std, seed)`): a pure function of the seed and the row.
#[pyclass(module = "hetkv", frozen, from_py_object)]
#[derive(Clone)]
struct Initializer(RustInit);

#[pymethods]
impl Initializer {
    /// Every value 0.
    #[staticmethod]
    fn zeros() -> Self {
        Self(RustInit::Zeros)
    }

    /// Uniform in [-bound, bound).
    #[staticmethod]
    #[pyo3(signature = (bound, seed = 0))]
    fn uniform(bound: f32, seed: u64) -> Self {
        Self(RustInit::Uniform { bound, seed })
    }

    /// Normal with mean 0 and standard deviation `std`.
    #[staticmethod]
    #[pyo3(signature = (std, seed = 0))]
    fn normal(std: f32, seed: u64) -> Self {
        Self(RustInit::Normal { std, seed })
    }

    fn __repr__(&self) -> String {
        format!("hetkv.Initializer({:?})", self.0)
    }
}

/// What makes a table dynamic (`hetkv.Dynamic(eviction="lru", admit_after=None,
/// admit_probability=None, seed=0)`): any u64 key (raw feature ids), rows created when a key is
/// admitted (on its first update; after `admit_after` updates counted while not held; or with
/// probability `admit_probability` per update, seeded), at most the table's `rows` over the
/// cluster, evicting a full bucket's least recently (`"lru"`) or least frequently (`"lfu"`)
/// updated row.
#[pyclass(module = "hetkv", frozen, from_py_object)]
#[derive(Clone)]
struct Dynamic(DynamicSpec);

#[pymethods]
impl Dynamic {
    #[new]
    #[pyo3(signature = (eviction = "lru", admit_after = None, admit_probability = None, seed = 0))]
    fn new(
        eviction: &str,
        admit_after: Option<u32>,
        admit_probability: Option<f32>,
        seed: u64,
    ) -> PyResult<Self> {
        let eviction = match eviction {
            "lru" => Eviction::Lru,
            "lfu" => Eviction::Lfu,
            other => {
                return Err(PyValueError::new_err(format!(
                    "eviction must be \"lru\" or \"lfu\", not {other:?}"
                )))
            }
        };
        let admission = match (admit_after, admit_probability) {
            (None, None) => Admission::Always,
            (Some(n), None) => Admission::Threshold {
                count: u8::try_from(n).map_err(|_| {
                    PyValueError::new_err(format!("admit_after must be 1 to 255 updates, not {n}"))
                })?,
            },
            (None, Some(p)) => Admission::Probability { p, seed },
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give admit_after or admit_probability, not both",
                ))
            }
        };
        let spec = DynamicSpec {
            admission,
            eviction,
        };
        spec.validate().map_err(|e| PyValueError::new_err(e.0))?;
        Ok(Self(spec))
    }

    fn __repr__(&self) -> String {
        format!("hetkv.Dynamic({:?})", self.0)
    }
}

/// The optimizer a table's shards apply to pushed gradients (`hetkv.Optimizer.sgd(lr)`,
/// `.adagrad(lr, ...)`, `.rowwise_adagrad(lr, ...)`, `.adam(lr, ...)`). A parameter left out
/// takes the one default the Rust crate and the TOML config also use (`OptimizerSpec`); a
/// parameter out of range is a `ValueError` naming it.
#[pyclass(module = "hetkv", frozen, from_py_object)]
#[derive(Clone)]
struct Optimizer(OptimizerSpec);

impl Optimizer {
    fn checked(spec: OptimizerSpec) -> PyResult<Self> {
        spec.validate().map_err(|e| PyValueError::new_err(e.0))?;
        Ok(Self(spec))
    }
}

#[pymethods]
impl Optimizer {
    /// Plain SGD: `w -= lr * g`.
    #[staticmethod]
    fn sgd(lr: f32) -> PyResult<Self> {
        Self::checked(OptimizerSpec::sgd(lr))
    }

    /// Adagrad, one accumulator per element (defaults: PyTorch's, eps 1e-10, accumulator 0).
    #[staticmethod]
    #[pyo3(signature = (lr, eps = None, initial_accumulator = None))]
    fn adagrad(lr: f32, eps: Option<f32>, initial_accumulator: Option<f32>) -> PyResult<Self> {
        Self::checked(OptimizerSpec::Adagrad {
            lr,
            eps: eps.unwrap_or(OptimizerSpec::ADAGRAD_EPS),
            initial_accumulator: initial_accumulator.unwrap_or(0.0),
        })
    }

    /// Row-wise Adagrad, one accumulator per row (FBGEMM's default for embeddings; defaults
    /// eps 1e-8, accumulator 0). A cache that mirrors it reads 4 bytes more a row.
    #[staticmethod]
    #[pyo3(signature = (lr, eps = None, initial_accumulator = None))]
    fn rowwise_adagrad(
        lr: f32,
        eps: Option<f32>,
        initial_accumulator: Option<f32>,
    ) -> PyResult<Self> {
        Self::checked(OptimizerSpec::RowwiseAdagrad {
            lr,
            eps: eps.unwrap_or(OptimizerSpec::ROWWISE_ADAGRAD_EPS),
            initial_accumulator: initial_accumulator.unwrap_or(0.0),
        })
    }

    /// Adam, applied lazily (a row's moments advance when it is pushed; defaults: PyTorch's).
    #[staticmethod]
    #[pyo3(signature = (lr, beta1 = None, beta2 = None, eps = None))]
    fn adam(lr: f32, beta1: Option<f32>, beta2: Option<f32>, eps: Option<f32>) -> PyResult<Self> {
        Self::checked(OptimizerSpec::Adam {
            lr,
            beta1: beta1.unwrap_or(OptimizerSpec::ADAM_BETA1),
            beta2: beta2.unwrap_or(OptimizerSpec::ADAM_BETA2),
            eps: eps.unwrap_or(OptimizerSpec::ADAM_EPS),
        })
    }

    /// The learning rate.
    #[getter]
    fn lr(&self) -> f32 {
        self.0.lr()
    }

    /// The optimizer's name: "sgd", "adagrad", "rowwise_adagrad" or "adam".
    #[getter]
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn __repr__(&self) -> String {
        format!("hetkv.Optimizer.{}", self.0)
    }

    fn __eq__(&self, other: &Optimizer) -> bool {
        self.0 == other.0
    }
}

/// The optimizer a table created without one gets.
fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec::sgd(0.01)
}

/// The spec of a table to create; a table created without an optimizer says, through Python's
/// `logging` (logger `hetkv`, level WARNING), what it got.
fn spec_of(
    py: Python<'_>,
    name: String,
    rows: u64,
    dim: u32,
    init: Option<Initializer>,
    optimizer: Option<Optimizer>,
    (buckets, dynamic): (Option<u32>, Option<Dynamic>),
) -> PyResult<TableSpec> {
    let optimizer = match optimizer {
        Some(o) => o.0,
        None => {
            let got = default_optimizer();
            py.import("logging")?
                .call_method1("getLogger", ("hetkv",))?
                .call_method1(
                    "warning",
                    (format!(
                        "table {name:?}: no optimizer given, the shards apply {got} (pass \
                         optimizer=hetkv.Optimizer...)"
                    ),),
                )?;
            got
        }
    };
    Ok(TableSpec {
        name,
        rows,
        dim,
        init: init.map_or(RustInit::Zeros, |i| i.0),
        optimizer,
        buckets: buckets.unwrap_or(hetkv_transport::DEFAULT_BUCKETS),
        dynamic: dynamic.map(|d| d.0),
    })
}

/// A connection to every shard of a cluster (`hetkv.connect`).
#[pyclass(module = "hetkv", subclass, frozen)]
struct Cluster {
    inner: RustCluster,
}

/// The error of pickling or copying `what` (a cluster, a table or a cache: live connections and
/// the rows cached from them), saying what to do instead; `__reduce__` of each returns it, so
/// `pickle`, `copy.deepcopy` and `torch.save` of anything that holds one fail with it.
fn not_copied(what: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "a hetkv {what} holds connections to the shards (and a cache, the rows cached from \
         them): it is not pickled or copied. Save the tables with cluster.checkpoint(name) \
         beside the model's state_dict() (which holds no hetkv rows), and in another process \
         (a DataLoader worker, another rank) connect again with hetkv.connect(addrs)"
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
    #[pyo3(signature = (name, rows, dim, init = None, optimizer = None, buckets = None, dynamic = None))]
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
    ) -> PyResult<Table> {
        let spec = spec_of(py, name, rows, dim, init, optimizer, (buckets, dynamic))?;
        let inner = interruptible(py, || self.inner.create_table(&spec), py_err)?;
        Ok(Table { inner })
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

/// Connects to the shards at `addrs` (in shard order).
///
/// `transport` is "auto" (shared memory for shards on this host that expose it, else TCP),
/// "tcp", "shm" or "rdma"; `auth_token` is the daemons' token; `timeout` is every call's
/// deadline in seconds, retries included. `emulated_link_gbps` holds every frame to and from
/// each shard to that bandwidth (a token bucket in the TCP transport: transfer time, no
/// latency), to show a slow network on one machine. An address where no daemon listens fails at
/// once (`hetkv.ConnectionError`), unless `wait_for_daemon` gives it that many seconds to start.
#[pyfunction]
#[pyo3(signature = (addrs, transport = "auto", auth_token = None, timeout = 60.0, emulated_link_gbps = None, wait_for_daemon = 0.0))]
fn connect(
    py: Python<'_>,
    addrs: Vec<String>,
    transport: &str,
    auth_token: Option<String>,
    timeout: f64,
    emulated_link_gbps: Option<f64>,
    wait_for_daemon: f64,
) -> PyResult<Cluster> {
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

fn client_config(auth_token: Option<String>, timeout: f64) -> PyResult<ClientConfig> {
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

/// Shards running in this process, on loopback TCP (for notebooks and tests): a cluster with
/// every method of `hetkv.Cluster`, whose `addrs` other processes can connect to. Refused in a
/// process that is one of several ranks (`WORLD_SIZE` above 1, as torchrun sets it), where each
/// rank would train a private table.
#[pyclass(module = "hetkv", extends = Cluster, frozen)]
struct EmbeddedCluster {
    shards: Mutex<Option<hetkv_store::EmbeddedCluster>>,
}

#[pymethods]
impl EmbeddedCluster {
    /// Starts `shards` shards; `tables` is a list of dicts of `create_table`'s arguments.
    #[new]
    #[pyo3(signature = (shards = 2, tables = None, data_dir = None))]
    fn new(
        py: Python<'_>,
        shards: u32,
        tables: Option<Vec<Bound<'_, PyDict>>>,
        data_dir: Option<std::path::PathBuf>,
    ) -> PyResult<PyClassInitializer<Self>> {
        if shards == 0 {
            return Err(PyValueError::new_err(
                "an embedded cluster needs at least one shard",
            ));
        }
        // Under torchrun every rank would start shards of its own and train a private table.
        let world = std::env::var("WORLD_SIZE").ok();
        if let Some(world) = world.and_then(|w| w.trim().parse::<u64>().ok()) {
            if world > 1 {
                return Err(Error::new_err(format!(
                    "hetkv.EmbeddedCluster runs its shards inside this process, and this process \
                     is one of WORLD_SIZE={world} ranks: each rank would train a table of its \
                     own. Start the shards once (`hetkv serve`, one per shard) and connect every \
                     rank to them with hetkv.connect(addrs)"
                )));
            }
        }
        let mut specs = Vec::new();
        for t in tables.unwrap_or_default() {
            let get = |k: &str| t.get_item(k);
            let name: String = get("name")?
                .ok_or_else(|| PyValueError::new_err("a table needs a name"))?
                .extract()?;
            let rows: u64 = get("rows")?
                .ok_or_else(|| PyValueError::new_err(format!("table {name} needs rows")))?
                .extract()?;
            let dim: u32 = get("dim")?
                .ok_or_else(|| PyValueError::new_err(format!("table {name} needs dim")))?
                .extract()?;
            let init = match get("init")? {
                Some(v) => Some(v.extract::<Initializer>()?),
                None => None,
            };
            let optimizer = match get("optimizer")? {
                Some(v) => Some(v.extract::<Optimizer>()?),
                None => None,
            };
            let buckets = match get("buckets")? {
                Some(v) => Some(v.extract::<u32>()?),
                None => None,
            };
            let dynamic = match get("dynamic")? {
                Some(v) => Some(v.extract::<Dynamic>()?),
                None => None,
            };
            specs.push(spec_of(
                py,
                name,
                rows,
                dim,
                init,
                optimizer,
                (buckets, dynamic),
            )?);
        }
        let started = py.detach(|| {
            let cluster = match &data_dir {
                None => hetkv_store::EmbeddedCluster::start(shards),
                Some(dir) => {
                    hetkv_store::EmbeddedCluster::start_with(shards, Default::default(), |i| {
                        hetkv_store::ShardConfig {
                            data_dir: Some(dir.join(format!("shard{i}"))),
                            ..hetkv_store::ShardConfig::new(i, shards)
                        }
                    })
                }
            }
            .map_err(|e| e.to_string())?;
            let client = RustCluster::connect_tcp(cluster.addrs(), &ClientConfig::default())
                .map_err(|e| e.to_string())?;
            for spec in &specs {
                client.create_table(spec).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((cluster, client))
        });
        let (cluster, client) = started.map_err(Error::new_err)?;
        Ok(
            PyClassInitializer::from(Cluster { inner: client }).add_subclass(Self {
                shards: Mutex::new(Some(cluster)),
            }),
        )
    }

    /// Stops the shards (the cluster's tables are gone unless they were checkpointed); every
    /// later call on the cluster, its tables and caches fails at once (`hetkv.ConnectionError`).
    fn close(slf: &Bound<'_, Self>, py: Python<'_>) {
        slf.as_super().get().inner.close();
        let taken = slf
            .get()
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = taken {
            py.detach(|| c.shutdown());
        }
    }

    /// Whether the shards are running.
    #[getter]
    fn running(&self) -> bool {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        _kind: Option<Bound<'_, PyAny>>,
        _value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> bool {
        Self::close(slf, py);
        false
    }
}

/// A cluster's shard transports, in shard order (what export and import take).
fn shards_of(cluster: &RustCluster) -> Vec<&dyn hetkv_transport::ShardTransport> {
    (0..cluster.shard_count())
        .map(|i| &**cluster.shard(i) as &dyn hetkv_transport::ShardTransport)
        .collect()
}

/// A cache's capacity as Python gives it: a row count (int) or a fraction of the rows (float).
#[derive(FromPyObject)]
enum CapacityArg {
    Rows(u64),
    Fraction(f64),
}

/// One table of a cluster: direct reads and writes (no cache: the classic parameter server).
#[pyclass(module = "hetkv", frozen)]
struct Table {
    inner: RustTable,
}

#[pymethods]
impl Table {
    /// Refused: see [`not_copied`].
    fn __reduce__(&self) -> PyResult<()> {
        Err(not_copied("table"))
    }

    /// The table's name.
    #[getter]
    fn name(&self) -> String {
        self.inner.spec().name.clone()
    }

    /// Rows: a fixed table's keys are 0 to rows - 1; a dynamic table's `rows` is its capacity.
    #[getter]
    fn rows(&self) -> u64 {
        self.inner.spec().rows
    }

    /// What makes the table dynamic, or None for a fixed table.
    #[getter]
    fn dynamic(&self) -> Option<Dynamic> {
        self.inner.spec().dynamic.map(Dynamic)
    }

    /// Values per row.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.spec().dim as usize
    }

    /// The shards' optimizer.
    #[getter]
    fn optimizer(&self) -> Optimizer {
        Optimizer(self.inner.spec().optimizer)
    }

    /// Reads the rows of `keys` (uint64, 1-D) into `out` (float32, keys x dim; a new array when
    /// None) and, when given, their versions into `versions` (uint64, 1-D). Returns `out`.
    #[pyo3(signature = (keys, out = None, versions = None))]
    fn pull<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        versions: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = keys_arg(keys)?;
        let keys = keys.slice()?;
        let dim = self.dim();
        let name = self.name();
        let mut versions: Option<PyReadwriteArray1<'py, u64>> = match versions {
            None => None,
            Some(v) => Some(v.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "versions must be a 1-D numpy array of uint64 (got {})",
                    dtype_of(v)
                ))
            })?),
        };
        let versions = match versions.as_mut() {
            None => None,
            Some(v) => {
                if v.len() != keys.len() {
                    return Err(WrongDimError::new_err(format!(
                        "versions holds {} values for {} keys",
                        v.len(),
                        keys.len()
                    )));
                }
                Some(contiguous_mut(v, "versions")?)
            }
        };
        into_rows(py, out, keys.len(), dim, &name, |rows| {
            self.inner.pull(keys, rows, versions)
        })
    }

    /// Applies one update per row of `grads` (float32, keys x dim) with the shards' optimizer;
    /// `counts` (uint32) says how many updates each row sums (1 each when None). Returns the
    /// updates applied.
    #[pyo3(signature = (keys, grads, counts = None))]
    fn push(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyAny>,
        counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        Ok(self.push_rows(py, keys, grads, counts)?.applied)
    }

    /// [`push`], saying which keys a dynamic table refused admission: a dict of `applied`
    /// (updates applied), `refused_keys` (uint64) and `refused_counts` (uint32, the updates
    /// dropped for each), in the push's order.
    #[pyo3(signature = (keys, grads, counts = None))]
    fn push_report<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyAny>,
        counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let report = self.push_rows(py, keys, grads, counts)?;
        let d = PyDict::new(py);
        d.set_item("applied", report.applied)?;
        let keys: Vec<u64> = report.refused.iter().map(|r| r.0).collect();
        let counts: Vec<u32> = report.refused.iter().map(|r| r.1).collect();
        d.set_item("refused_keys", PyArray1::from_vec(py, keys))?;
        d.set_item("refused_counts", PyArray1::from_vec(py, counts))?;
        Ok(d)
    }

    /// Sets the rows of `keys` to `values` (float32, keys x dim): each row's version grows by one
    /// and its optimizer state starts again (imports, warm starts). Returns the rows set.
    fn assign(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let keys = keys_arg(keys)?;
        let keys = keys.slice()?;
        let values = rows2(values, "values")?;
        check_rows(
            values.shape(),
            keys.len(),
            self.dim(),
            "values",
            &self.name(),
        )?;
        let values = contiguous(&values, "values")?;
        interruptible(py, || self.inner.assign(keys, values), py_err)
    }

    /// Up to `max` evictions of this dynamic table on shard `shard` from `cursor` (0: the
    /// shard's first): a dict with `keys`, `versions` and `scores` (uint64 arrays, oldest
    /// first), `next` (the cursor to read from next) and `lost` (evictions the shard no longer
    /// held when this reader asked: it fell behind). Each shard has its own stream.
    #[pyo3(signature = (shard, cursor = 0, max = 65536))]
    fn evictions<'py>(
        &self,
        py: Python<'py>,
        shard: usize,
        cursor: u64,
        max: u32,
    ) -> PyResult<Bound<'py, PyDict>> {
        let page = interruptible(py, || self.inner.evictions(shard, cursor, max), py_err)?;
        let d = PyDict::new(py);
        let column = |f: fn(&hetkv_transport::wire::EvictedKey) -> u64| -> Vec<u64> {
            page.events.iter().map(f).collect()
        };
        d.set_item("keys", PyArray1::from_vec(py, column(|e| e.key)))?;
        d.set_item("versions", PyArray1::from_vec(py, column(|e| e.version)))?;
        d.set_item("scores", PyArray1::from_vec(py, column(|e| e.score)))?;
        d.set_item("next", page.next)?;
        d.set_item("lost", page.lost)?;
        Ok(d)
    }

    /// Writes the table (every row, or the rows of `keys` in their order) to the safetensors
    /// file `path`: `embeddings` (float32, rows x dim), `versions` (uint64) and, with `keys`,
    /// `keys` (uint64), as `hetkv export` does; a dynamic table without `keys` writes every held
    /// row with its key. Returns the rows written.
    #[pyo3(signature = (path, keys = None))]
    fn export(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let keys = keys
            .map(|k| array1::<u64>(k, "keys", "uint64"))
            .transpose()?;
        let keys = match &keys {
            Some(k) => Some(contiguous(k, "keys")?),
            None => None,
        };
        let shards = shards_of(self.inner.cluster());
        let name = self.name();
        interruptible(
            py,
            || hetkv_store::tensors::export_table(&shards, &name, keys, &path),
            store_err,
        )
        .map(|t| t.rows)
    }

    /// Sets rows from the safetensors file `path`: its tensor `tensor` (float32, n x dim) and,
    /// if present, `keys` (uint64, else keys 0 to n-1), as `hetkv import` does. Each row becomes
    /// one update and its optimizer state starts again. Returns the rows set.
    #[pyo3(signature = (path, tensor = "embeddings"))]
    fn import_file(&self, py: Python<'_>, path: std::path::PathBuf, tensor: &str) -> PyResult<u64> {
        let shards = shards_of(self.inner.cluster());
        let name = self.name();
        interruptible(
            py,
            || hetkv_store::tensors::import_table(&shards, &name, &path, tensor),
            store_err,
        )
        .map(|t| t.rows)
    }

    /// One worker's HET cache of this table.
    ///
    /// `capacity` is a fraction of the table's rows (a float below 1) or a number of rows (an
    /// int); 0 turns the cache off (with bounds 0, the classic parameter server). `policy` is
    /// "lru", "lfu" or "light-lfu". A cached row lags the shards by at most `pull_bound` updates;
    /// a line holds at most `push_bound` unpushed updates (None: unbounded).
    ///
    /// `update_rule` says how this worker's updates of a key count in its lines and its pushes:
    /// "push-whole" (HET's semantics: gradients pushed whole and applied by the shards'
    /// optimizer; a line shows exactly the row the shards produce from its own updates, so after
    /// `flush` a lone worker's lines equal the shards' rows, and at bounds 0 a cached run is the
    /// uncached one), "share-weighted" (pushes weighted by the worker's share of the key's
    /// updates, a training heuristic) or "push-scaled:F" (every push times F).
    #[pyo3(signature = (capacity = CapacityArg::Fraction(0.1), policy = "lfu", pull_bound = Some(100), push_bound = Some(100), update_rule = "push-whole"))]
    fn cached(
        &self,
        capacity: CapacityArg,
        policy: &str,
        pull_bound: Option<u64>,
        push_bound: Option<u64>,
        update_rule: &str,
    ) -> PyResult<Cache> {
        let rule: UpdateRuleKind = update_rule.parse().map_err(PyValueError::new_err)?;
        let capacity = match capacity {
            CapacityArg::Rows(0) => Capacity::Disabled,
            CapacityArg::Rows(rows) => Capacity::Rows(rows as usize),
            CapacityArg::Fraction(f) if !(0.0..=1.0).contains(&f) => {
                return Err(PyValueError::new_err(format!(
                    "capacity {f} is not a fraction of the rows in [0, 1] (give a row count as an int)"
                )))
            }
            CapacityArg::Fraction(0.0) => Capacity::Disabled,
            CapacityArg::Fraction(f) => Capacity::Fraction(f),
        };
        let policy: PolicyKind = policy.parse().map_err(PyValueError::new_err)?;
        let config = CacheConfig {
            capacity,
            policy,
            pull_bound: cache_bound(pull_bound),
            push_bound: cache_bound(push_bound),
        };
        let dim = self.dim();
        let cached = self.inner.cached(config).with_update_rule(rule);
        Ok(Cache {
            published: cached.stats_handle(),
            inner: Mutex::new(cached),
            dim,
            name: self.name(),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "hetkv.Table(name={:?}, rows={}, dim={}, optimizer={})",
            self.name(),
            self.rows(),
            self.dim(),
            self.inner.spec().optimizer
        )
    }
}

/// A bound of the Python API: a number of updates, or None for unbounded.
fn cache_bound(b: Option<u64>) -> CacheBound {
    b.map_or(CacheBound::INFINITE, CacheBound::updates)
}

/// [`contiguous`] for an array written into.
fn contiguous_mut<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    array: &'a mut numpy::PyReadwriteArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    let refuse = || {
        PyValueError::new_err(format!(
            "{what} must be C-contiguous (row-major): pass numpy.ascontiguousarray({what})"
        ))
    };
    if !array.is_c_contiguous() {
        return Err(refuse());
    }
    array.as_slice_mut().map_err(|_| refuse())
}

/// Fills `out` (checked to be float32, n x dim, C-contiguous), or a new array, with `fill`,
/// the GIL released; returns the array.
fn into_rows<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    n: usize,
    dim: usize,
    table: &str,
    fill: impl FnOnce(&mut [f32]) -> Result<(), ClientError> + Send,
) -> PyResult<Bound<'py, PyAny>> {
    match out {
        Some(given) => {
            let mut rw: PyReadwriteArray2<'py, f32> = given.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "out must be a writable 2-D numpy array of float32 (got {})",
                    dtype_of(given)
                ))
            })?;
            check_rows(rw.shape(), n, dim, "out", table)?;
            let rows = contiguous_mut(&mut rw, "out")?;
            interruptible(py, || fill(rows), py_err)?;
            Ok(given.clone())
        }
        None => {
            let rows = interruptible(
                py,
                || {
                    let mut rows = vec![0f32; n * dim];
                    fill(&mut rows).map(|()| rows)
                },
                py_err,
            )?;
            let array = PyArray1::from_vec(py, rows).reshape([n, dim])?;
            Ok(array.into_any())
        }
    }
}

/// One worker's HET cache of a table (`Table.cached`). Calls from several Python threads are
/// serialized; give each worker thread a cache of its own. `stats`, `bounds` and `repr` read a
/// copy the cache publishes at the end of each call, so they answer while another thread's call
/// waits on the network.
#[pyclass(module = "hetkv", frozen)]
struct Cache {
    inner: Mutex<CachedTable>,
    published: hetkv_client::metrics::CacheStatsHandle,
    dim: usize,
    name: String,
}

impl Cache {
    fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut CachedTable) -> Result<R, ClientError> + Send,
    ) -> PyResult<R> {
        interruptible(
            py,
            || {
                let mut cache = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut cache)
            },
            py_err,
        )
    }
}

#[pymethods]
impl Cache {
    /// Refused: see [`not_copied`].
    fn __reduce__(&self) -> PyResult<()> {
        Err(not_copied("cache"))
    }

    /// Reads the rows of `keys` (uint64, 1-D, duplicates allowed) into `out` (float32, keys x
    /// dim; a new array when None), each within the read bound and with this cache's own updates
    /// in it. Returns `out`.
    #[pyo3(signature = (keys, out = None))]
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let keys = array1::<u64>(keys, "keys", "uint64")?;
        let keys = contiguous(&keys, "keys")?;
        into_rows(py, out, keys.len(), self.dim, &self.name, |rows| {
            let mut cache = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            cache.lookup(keys, rows)
        })
    }

    /// Applies one gradient row per key (float32, keys x dim): locally at once, and on the
    /// shards when a line's unpushed updates exceed the push bound. Nothing changes when a value
    /// is NaN or infinite (`hetkv.InvalidGradientError`).
    fn update(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let keys = array1::<u64>(keys, "keys", "uint64")?;
        let keys = contiguous(&keys, "keys")?;
        let grads = rows2(grads, "grads")?;
        check_rows(grads.shape(), keys.len(), self.dim, "grads", &self.name)?;
        let grads = contiguous(&grads, "grads")?;
        self.with(py, |c| c.update(keys, grads))
    }

    /// Starts the lookup of `keys` (uint64, 1-D: the next batch's) and returns at once; the
    /// `lookup` of the same keys completes it. It carries every queued push; updates made while
    /// it is in flight are kept and applied when it lands, and the rows it returns include them.
    fn prefetch(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let keys = array1::<u64>(keys, "keys", "uint64")?;
        let keys = contiguous(&keys, "keys")?;
        self.with(py, |c| c.prefetch(keys))
    }

    /// Changes the read and write bounds for every later call (None: unbounded). A prefetch in
    /// flight lands first, unused; lines holding more unpushed updates than a lowered
    /// `push_bound` are pushed before this returns. A trainer that warms up synchronously makes
    /// the cache at bounds 0 and calls this once with its looser bounds (post-local SGD).
    fn set_bounds(
        &self,
        py: Python<'_>,
        pull_bound: Option<u64>,
        push_bound: Option<u64>,
    ) -> PyResult<()> {
        let (pull, push) = (cache_bound(pull_bound), cache_bound(push_bound));
        self.with(py, |c| c.set_bounds(pull, push))
    }

    /// The bounds in force, `(pull_bound, push_bound)` (None: unbounded).
    #[getter]
    fn bounds(&self) -> (Option<u64>, Option<u64>) {
        let (pull, push) = self.published.get().bounds;
        let py_bound = |b: CacheBound| (!b.is_infinite()).then(|| b.get());
        (py_bound(pull), py_bound(push))
    }

    /// Pushes every unpushed update; returns when the shards have applied them.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.flush())
    }

    /// The cache's counters (hits, misses, pushes, bytes, restarts noticed, ...) and its
    /// `hit_rate`, `resident` and `capacity`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let published = self.published.get();
        let (stats, resident, capacity) = (published.stats, published.resident, published.capacity);
        let out = PyDict::new(py);
        for (name, _, value) in stats.counters() {
            out.set_item(name, value)?;
        }
        out.set_item("hit_rate", stats.hit_rate())?;
        out.set_item("resident", resident)?;
        out.set_item("capacity", capacity)?;
        Ok(out)
    }

    /// Values per row.
    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    /// The table's name.
    #[getter]
    fn table(&self) -> String {
        self.name.clone()
    }

    fn __repr__(&self) -> String {
        let p = self.published.get();
        format!(
            "hetkv.Cache(table={:?}, capacity={}, resident={})",
            self.name, p.capacity, p.resident
        )
    }
}

/// The native module, `hetkv._hetkv`.
#[pymodule]
fn _hetkv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(connect, m)?)?;
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

impl Table {
    /// Checks and pushes rows (`push` and `push_report`).
    fn push_rows(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        grads: &Bound<'_, PyAny>,
        counts: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<hetkv_client::PushReport> {
        let keys = keys_arg(keys)?;
        let keys = keys.slice()?;
        let grads = rows2(grads, "grads")?;
        check_rows(grads.shape(), keys.len(), self.dim(), "grads", &self.name())?;
        let grads = contiguous(&grads, "grads")?;
        let counts: Vec<u32> = match counts {
            None => vec![1; keys.len()],
            Some(c) => {
                let c = array1::<u32>(c, "counts", "uint32")?;
                contiguous(&c, "counts")?.to_vec()
            }
        };
        interruptible(py, || self.inner.push_report(keys, &counts, grads), py_err)
    }
}
