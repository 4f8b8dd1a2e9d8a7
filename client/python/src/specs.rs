//! Table specs from Python: `Initializer`, `Optimizer` and `Dynamic`, and the spec a
//! `create_table` call makes of them.

use hetkv_transport::{
    Admission, DynamicSpec, Eviction, Initializer as RustInit, OptimizerSpec, TableSpec,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// How a table's rows start (`hetkv.Initializer.zeros()`, `.uniform(bound, seed)`,
/// `.normal(std, seed)`): a pure function of the seed and the row.
#[pyclass(module = "hetkv", frozen, from_py_object)]
#[derive(Clone)]
pub(crate) struct Initializer(pub(crate) RustInit);

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
/// admit_probability=None, seed=0, ttl=None)`): any u64 key (raw feature ids), rows created when
/// a key is admitted (on its first update; after `admit_after` updates counted while not held; or
/// with probability `admit_probability` per update, seeded), at most the table's `rows` over the
/// cluster, evicting a full bucket's least recently (`"lru"`) or least frequently (`"lfu"`)
/// updated row. `eviction="ttl"` with `ttl=N` gives rows a time to live of N training steps:
/// `Table.advance_step(step)` moves the table's step and evicts every row not updated in the N
/// steps before it (a full bucket gives up the row updated at the earliest step).
#[pyclass(module = "hetkv", frozen, from_py_object)]
#[derive(Clone)]
pub(crate) struct Dynamic(pub(crate) DynamicSpec);

#[pymethods]
impl Dynamic {
    #[new]
    #[pyo3(signature = (eviction = "lru", admit_after = None, admit_probability = None, seed = 0, ttl = None))]
    fn new(
        eviction: &str,
        admit_after: Option<u32>,
        admit_probability: Option<f32>,
        seed: u64,
        ttl: Option<u64>,
    ) -> PyResult<Self> {
        let eviction = match (eviction, ttl) {
            ("lru", None) => Eviction::Lru,
            ("lfu", None) => Eviction::Lfu,
            ("ttl", Some(steps)) => Eviction::Ttl { steps },
            ("ttl", None) => return Err(PyValueError::new_err(
                "eviction=\"ttl\" takes ttl=N, the training steps a row lives without an update",
            )),
            ("lru" | "lfu", Some(_)) => {
                return Err(PyValueError::new_err("ttl=N comes with eviction=\"ttl\""))
            }
            (other, _) => {
                return Err(PyValueError::new_err(format!(
                    "eviction must be \"lru\", \"lfu\" or \"ttl\", not {other:?}"
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
pub(crate) struct Optimizer(pub(crate) OptimizerSpec);

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

    /// f32 state values a row of `dim` carries on the shards: 0 (SGD), `dim` (Adagrad), 1
    /// (row-wise Adagrad), `2 dim` (Adam: first moments, then second moments).
    fn state_len(&self, dim: usize) -> usize {
        hetkv_transport::Optimizer::new(self.0).state_len(dim)
    }

    /// Whether a row's state carries a step count too (Adam).
    #[getter]
    fn has_steps(&self) -> bool {
        hetkv_transport::Optimizer::new(self.0).has_steps()
    }

    fn __repr__(&self) -> String {
        format!("hetkv.Optimizer.{}", self.0)
    }

    fn __eq__(&self, other: &Optimizer) -> bool {
        self.0 == other.0
    }
}

/// The optimizer a table created without one gets.
pub(crate) fn default_optimizer() -> OptimizerSpec {
    OptimizerSpec::sgd(0.01)
}

/// The spec of a table to create; a table created without an optimizer says, through Python's
/// `logging` (logger `hetkv`, level WARNING), what it got.
pub(crate) fn spec_of(
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
