//! `hetkv.lookup_many`, `hetkv.prefetch_many` and `hetkv.update_many`: caches of several tables of one cluster driven
//! together, each round of their requests one batch a shard (the client crate's
//! `lookup_many`/`update_many`).

use std::sync::MutexGuard;

use hetkv_client::CachedTable;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::*;

/// Locks `caches` (in address order, so that two threads never wait on each other), refusing a
/// cache given twice; the guards in the caches' order.
fn lock_all<'a>(caches: &'a [&'a Cache]) -> Vec<MutexGuard<'a, CachedTable>> {
    let mut order: Vec<usize> = (0..caches.len()).collect();
    order.sort_by_key(|&i| std::ptr::from_ref(caches[i]) as usize);
    let mut guards: Vec<(usize, MutexGuard<'a, CachedTable>)> = order
        .into_iter()
        .map(|i| (i, caches[i].inner.lock().unwrap_or_else(|p| p.into_inner())))
        .collect();
    guards.sort_by_key(|(i, _)| *i);
    guards.into_iter().map(|(_, g)| g).collect()
}

/// The caches as Rust sees them, refusing an empty list and one given twice.
fn distinct<'a>(
    caches: &'a [Bound<'_, Cache>],
    inputs: usize,
    what: &str,
) -> PyResult<Vec<&'a Cache>> {
    let list: Vec<&Cache> = caches.iter().map(|c| c.get()).collect();
    if list.is_empty() || inputs != list.len() {
        return Err(PyValueError::new_err(format!(
            "{} caches and {inputs} {what}: give one a cache (and at least one)",
            list.len()
        )));
    }
    for (i, c) in list.iter().enumerate() {
        if list[..i].iter().any(|o| std::ptr::eq(*o, *c)) {
            return Err(PyValueError::new_err(format!(
                "cache {i} (table {:?}) is given twice",
                c.name
            )));
        }
    }
    Ok(list)
}

/// `keys` as read-only uint64 arrays (each 1-D), for [`slices`].
fn key_arrays<'py>(keys: &[Bound<'py, PyAny>]) -> PyResult<Vec<PyReadonlyArray1<'py, u64>>> {
    keys.iter()
        .map(|k| array1::<u64>(k, "keys", "uint64"))
        .collect()
}

/// Each array's elements, refusing a strided one.
fn slices<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    arrays: &'a [numpy::PyReadonlyArray<'_, T, D>],
    what: &str,
) -> PyResult<Vec<&'a [T]>> {
    arrays.iter().map(|a| contiguous(a, what)).collect()
}

/// Runs `f` over the caches, locked, with the GIL released.
fn with_all<R: Send>(
    py: Python<'_>,
    caches: &[&Cache],
    f: impl FnOnce(&mut [&mut CachedTable]) -> Result<R, hetkv_client::ClientError> + Send,
) -> PyResult<R> {
    interruptible(
        py,
        || {
            let mut guards = lock_all(caches);
            let mut refs: Vec<&mut CachedTable> = guards.iter_mut().map(|g| &mut **g).collect();
            f(&mut refs)
        },
        py_err,
    )
}

/// Reads `keys[i]` (uint64, 1-D) from `caches[i]` for every `i`, as each cache's `lookup` would,
/// with one request a shard for all of them, into `outs[i]` (float32, keys x that table's dim,
/// C-contiguous and writable: pinned memory for a copy to a GPU, say) or new arrays when `outs`
/// is None; returns them in the caches' order. The caches must be of one cluster connection,
/// each given once.
#[pyfunction]
#[pyo3(signature = (caches, keys, outs = None))]
pub(crate) fn lookup_many<'py>(
    py: Python<'py>,
    caches: Vec<Bound<'py, Cache>>,
    keys: Vec<Bound<'py, PyAny>>,
    outs: Option<Vec<Bound<'py, PyAny>>>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let list = distinct(&caches, keys.len(), "key arrays")?;
    let arrays = key_arrays(&keys)?;
    let keys = slices(&arrays, "keys")?;
    let Some(given) = outs else {
        let mut rows: Vec<Vec<f32>> = list
            .iter()
            .zip(&keys)
            .map(|(c, k)| vec![0f32; k.len() * c.dim])
            .collect();
        let mut slices: Vec<&mut [f32]> = rows.iter_mut().map(Vec::as_mut_slice).collect();
        read_into(py, &list, &keys, &mut slices)?;
        return rows
            .into_iter()
            .zip(&list)
            .zip(&keys)
            .map(|((r, c), k)| {
                Ok(PyArray1::from_vec(py, r)
                    .reshape([k.len(), c.dim])?
                    .into_any())
            })
            .collect();
    };
    if given.len() != list.len() {
        return Err(PyValueError::new_err(format!(
            "{} caches and {} row arrays: give one a cache",
            list.len(),
            given.len()
        )));
    }
    let mut writable = given
        .iter()
        .map(|o| {
            o.extract::<PyReadwriteArray2<'py, f32>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "outs must be writable 2-D numpy arrays of float32 (got {})",
                    dtype_of(o)
                ))
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    for ((w, c), k) in writable.iter().zip(&list).zip(&keys) {
        check_rows(w.shape(), k.len(), c.dim, "out", &c.name)?;
    }
    let mut slices = writable
        .iter_mut()
        .map(|w| contiguous_mut(w, "out"))
        .collect::<PyResult<Vec<&mut [f32]>>>()?;
    read_into(py, &list, &keys, &mut slices)?;
    Ok(given)
}

/// The group lookup itself, the GIL released.
fn read_into(
    py: Python<'_>,
    caches: &[&Cache],
    keys: &[&[u64]],
    outs: &mut [&mut [f32]],
) -> PyResult<()> {
    with_all(py, caches, |refs| {
        hetkv_client::lookup_many(refs, keys, outs)
    })
}

/// Starts the lookup of `keys[i]` (uint64, 1-D: the next batch's) in `caches[i]` for every `i`,
/// as each cache's `prefetch` would, and returns at once: the requests of all of them go as one
/// batch a shard. Each cache's `lookup` (or a `lookup_many`) of the same keys completes it.
#[pyfunction]
pub(crate) fn prefetch_many<'py>(
    py: Python<'py>,
    caches: Vec<Bound<'py, Cache>>,
    keys: Vec<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let list = distinct(&caches, keys.len(), "key arrays")?;
    let arrays = key_arrays(&keys)?;
    let keys = slices(&arrays, "keys")?;
    with_all(py, &list, |refs| hetkv_client::prefetch_many(refs, &keys))
}

/// Applies `grads[i]` (float32, keys x dim: one row per key of `keys[i]`) to `caches[i]` for
/// every `i`, as each cache's `update` would, sending what is due to push with one request a
/// shard for all of them. Every input is checked first: when one is invalid (a wrong shape, a
/// NaN), nothing changes in any cache.
#[pyfunction]
pub(crate) fn update_many<'py>(
    py: Python<'py>,
    caches: Vec<Bound<'py, Cache>>,
    keys: Vec<Bound<'py, PyAny>>,
    grads: Vec<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let list = distinct(&caches, keys.len(), "key arrays")?;
    if grads.len() != list.len() {
        return Err(PyValueError::new_err(format!(
            "{} caches and {} gradient arrays: give one a cache",
            list.len(),
            grads.len()
        )));
    }
    let arrays = key_arrays(&keys)?;
    let keys = slices(&arrays, "keys")?;
    let grad_arrays = grads
        .iter()
        .map(|g| rows2(g, "grads"))
        .collect::<PyResult<Vec<_>>>()?;
    for ((g, c), k) in grad_arrays.iter().zip(&list).zip(&keys) {
        check_rows(g.shape(), k.len(), c.dim, "grads", &c.name)?;
    }
    let grads = slices(&grad_arrays, "grads")?;
    with_all(py, &list, |refs| {
        hetkv_client::update_many(refs, &keys, &grads)
    })
}
