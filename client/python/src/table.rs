//! `hetkv.Table`: one table of a cluster, pulled, pushed, exported and cached.

use std::sync::Mutex;

use hetkv_client::{CacheConfig, Capacity, PolicyKind, Table as RustTable, UpdateRuleKind};
use hetkv_transport::codec::assign::{Assignment, StateChange};
use numpy::{PyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::*;

/// A cache's capacity as Python gives it: a row count (int) or a fraction of the rows (float).
#[derive(FromPyObject)]
pub(crate) enum CapacityArg {
    Rows(u64),
    Fraction(f64),
}

/// One table of a cluster: direct reads and writes (no cache: the classic parameter server).
#[pyclass(module = "hetkv", frozen)]
pub(crate) struct Table {
    pub(crate) inner: RustTable,
}

impl Table {
    /// Runs `f` (a read of the whole table, or of `keys`: uint64, 1-D) over this table's shards
    /// with the GIL released.
    fn whole<R: Send>(
        &self,
        py: Python<'_>,
        keys: Option<&Bound<'_, PyAny>>,
        f: impl FnOnce(
                &[&dyn hetkv_transport::ShardTransport],
                &str,
                Option<&[u64]>,
            ) -> Result<R, hetkv_store::StoreError>
            + Send,
    ) -> PyResult<R> {
        let keys = keys
            .map(|k| array1::<u64>(k, "keys", "uint64"))
            .transpose()?;
        let keys = match &keys {
            Some(k) => Some(contiguous(k, "keys")?),
            None => None,
        };
        let shards = shards_of(self.inner.cluster());
        let name = self.name();
        interruptible(py, || f(&shards, &name, keys), store_err)
    }

    /// `read_rows(keys, state=True)`: the keys given, or every row's (a fixed table's 0 to rows -
    /// 1, a dynamic table's held keys), read with their state ([`hetkv_client::Table::read_state`]).
    fn read_rows_with_state<'py>(
        &self,
        py: Python<'py>,
        keys: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let spec = self.inner.spec().clone();
        let given = keys.is_some();
        let keys: Vec<u64> = match keys {
            Some(k) => keys_arg(k)?.slice()?.to_vec(),
            None if spec.is_dynamic() => {
                // The held keys, as an export finds them; their rows are read again below,
                // with their state.
                let read = self.whole(py, None, hetkv_store::tensors::read_table)?;
                read.keys.unwrap_or_default()
            }
            None => (0..spec.rows).collect(),
        };
        let read = interruptible(py, || self.inner.read_state(&keys), py_err)?;
        let n = keys.len();
        let optimizer = hetkv_transport::Optimizer::new(spec.optimizer);
        let d = PyDict::new(py);
        let matrix = |values: Vec<f32>, cols: usize| {
            numpy::PyArrayMethods::reshape(&PyArray1::from_vec(py, values), [n, cols])
        };
        d.set_item("embeddings", matrix(read.values, spec.dim as usize)?)?;
        d.set_item("versions", PyArray1::from_vec(py, read.versions))?;
        d.set_item(
            "state",
            matrix(read.state, optimizer.state_len(spec.dim as usize))?,
        )?;
        if optimizer.has_steps() {
            d.set_item("steps", PyArray1::from_vec(py, read.steps))?;
        }
        if given || spec.is_dynamic() {
            d.set_item("keys", PyArray1::from_vec(py, keys))?;
        }
        Ok(d)
    }
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

    /// Sets the rows of `keys`: their values to `values` (float32, keys x dim; None keeps them,
    /// and a dynamic table's key not held takes its initial value) and their optimizer state:
    /// started again (the default: imports, warm starts), kept (`keep_state=True`: a model's
    /// weights loaded, as torch leaves its optimizer alone), or set to `state` (float32, keys x
    /// the table's state length) with `steps` (uint64, one a key, for Adam), as `read_rows(...,
    /// state=True)` reads them. Each row's version grows by one. Everything is checked before
    /// anything is sent (whole rows, finite values, no negative accumulator or second moment).
    /// Returns the rows set.
    #[pyo3(signature = (keys, values = None, *, state = None, steps = None, keep_state = false))]
    fn assign(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: Option<&Bound<'_, PyAny>>,
        state: Option<&Bound<'_, PyAny>>,
        steps: Option<&Bound<'_, PyAny>>,
        keep_state: bool,
    ) -> PyResult<u64> {
        let keys = keys_arg(keys)?;
        let keys = keys.slice()?;
        let name = self.name();
        let values = values.map(|v| rows2(v, "values")).transpose()?;
        if let Some(v) = &values {
            check_rows(v.shape(), keys.len(), self.dim(), "values", &name)?;
        }
        let values = match &values {
            Some(v) => Some(contiguous(v, "values")?),
            None => None,
        };
        let state = state.map(|s| rows2(s, "state")).transpose()?;
        let steps = steps
            .map(|s| array1::<u64>(s, "steps", "uint64"))
            .transpose()?;
        let change = match (&state, keep_state) {
            (Some(_), true) => {
                return Err(PyValueError::new_err(
                    "give a state to set or keep_state=True, not both",
                ))
            }
            (Some(s), false) => {
                let len = hetkv_transport::Optimizer::new(self.inner.spec().optimizer)
                    .state_len(self.dim());
                check_rows(s.shape(), keys.len(), len, "state", &name)?;
                StateChange::Set {
                    values: contiguous(s, "state")?,
                    steps: match &steps {
                        Some(st) => contiguous(st, "steps")?,
                        None => &[],
                    },
                }
            }
            (None, _) if steps.is_some() => {
                return Err(PyValueError::new_err("steps come with a state to set"))
            }
            (None, true) => StateChange::Keep,
            (None, false) => StateChange::Reset,
        };
        let rows = Assignment {
            keys,
            values,
            state: change,
        };
        interruptible(py, || self.inner.assign_rows(&rows), py_err)
    }

    /// Moves this dynamic table's training step to `step` on every shard (a step below the one a
    /// shard holds changes nothing there) and returns the rows expired: with
    /// `Dynamic(eviction="ttl", ttl=N)`, every row not updated in the N steps before `step` is
    /// evicted before this returns (each in the eviction stream, scored by the step of its last
    /// update), and rows updated from now on are stamped with `step`. Call it from one rank as
    /// training goes (every step, or every few: expiry happens at the calls).
    fn advance_step(&self, py: Python<'_>, step: u64) -> PyResult<u64> {
        interruptible(py, || self.inner.advance_step(step), py_err)
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

    /// The table's rows, read from its shards (every row, or the rows of `keys`, uint64, in
    /// their order), each as of one moment: a dict of `embeddings` (float32, n x dim),
    /// `versions` (uint64) and, for a dynamic table or given keys, `keys` (uint64; a dynamic
    /// table's every held row with its key). What `export` writes, in memory.
    ///
    /// With `state=True` the rows come with their optimizer state, each row's value, version
    /// and state read together: `state` (float32, n x the table's state length: Adagrad's
    /// accumulators, row-wise Adagrad's one, Adam's first then second moments; n x 0 for SGD)
    /// and, for Adam, `steps` (uint64), what `assign(keys, values, state=, steps=)` sets back.
    #[pyo3(signature = (keys = None, state = false))]
    fn read_rows<'py>(
        &self,
        py: Python<'py>,
        keys: Option<&Bound<'py, PyAny>>,
        state: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        if state {
            return self.read_rows_with_state(py, keys);
        }
        let read = self.whole(py, keys, hetkv_store::tensors::read_table)?;
        let n = read.versions.len();
        let d = PyDict::new(py);
        d.set_item(
            "embeddings",
            numpy::PyArrayMethods::reshape(
                &PyArray1::from_vec(py, read.values),
                [n, read.spec.dim as usize],
            )?,
        )?;
        d.set_item("versions", PyArray1::from_vec(py, read.versions))?;
        if let Some(k) = read.keys {
            d.set_item("keys", PyArray1::from_vec(py, k))?;
        }
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
        self.whole(py, keys, |shards, name, keys| {
            hetkv_store::tensors::export_table(shards, name, keys, &path)
        })
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
            source: self.inner.clone(),
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
