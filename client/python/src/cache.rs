//! `hetkv.Cache`: a worker's cache of one table (the HET cache), with prefetch and bounds.

use std::sync::Mutex;

use hetkv_client::{Bound as CacheBound, CachedTable, ClientError};
use numpy::PyUntypedArrayMethods;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::*;

/// A bound of the Python API: a number of updates, or None for unbounded.
pub(crate) fn cache_bound(b: Option<u64>) -> CacheBound {
    b.map_or(CacheBound::INFINITE, CacheBound::updates)
}

/// One worker's HET cache of a table (`Table.cached`). Calls from several Python threads are
/// serialized; give each worker thread a cache of its own. `stats`, `bounds` and `repr` read a
/// copy the cache publishes at the end of each call, so they answer while another thread's call
/// waits on the network.
#[pyclass(module = "hetkv", frozen)]
pub(crate) struct Cache {
    pub(crate) inner: Mutex<CachedTable>,
    pub(crate) published: hetkv_client::metrics::CacheStatsHandle,
    pub(crate) dim: usize,
    pub(crate) name: String,
    /// The table cached (a handle: no lock is taken to hand it out).
    pub(crate) source: hetkv_client::Table,
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

    /// Flushes, then forgets every line: each key's next lookup reads the shards' row. For after
    /// the table's rows were replaced (`Table.assign`, `import_file`, a saved model loaded): each
    /// such row's version moves by one only, so a line could still be within its bound.
    fn invalidate(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.invalidate())
    }

    /// The table this cache caches (a `hetkv.Table` of the same cluster connection).
    #[getter]
    fn source_table(&self) -> Table {
        Table {
            inner: self.source.clone(),
        }
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
