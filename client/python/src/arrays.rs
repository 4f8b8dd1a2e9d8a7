//! NumPy arguments and results: keys (uint64, or int64 as its bit pattern), rows (float32, keys x
//! dim), checked and borrowed without copies where their layout allows.

use hetkv_client::ClientError;
use numpy::{
    PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::*;

pub(crate) fn dtype_of(obj: &Bound<'_, PyAny>) -> String {
    match obj.getattr("dtype") {
        Ok(d) => d.str().map_or_else(|_| "?".into(), |s| s.to_string()),
        Err(_) => obj
            .get_type()
            .name()
            .map_or_else(|_| "?".into(), |n| n.to_string()),
    }
}

/// `obj` as a read-only view of a 1-D array of `T` (its `what` for messages).
pub(crate) fn array1<'py, T: numpy::Element>(
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
pub(crate) enum Keys<'py> {
    U64(PyReadonlyArray1<'py, u64>),
    I64(Vec<u64>),
}

impl Keys<'_> {
    /// The keys, refusing a strided uint64 array.
    pub(crate) fn slice(&self) -> PyResult<&[u64]> {
        match self {
            Self::U64(a) => contiguous(a, "keys"),
            Self::I64(v) => Ok(v),
        }
    }
}

/// `obj` as keys: a 1-D numpy array of uint64 or int64.
pub(crate) fn keys_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Keys<'py>> {
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
pub(crate) fn rows2<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArray2<'py, f32>> {
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
pub(crate) fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
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

pub(crate) fn check_rows(
    shape: &[usize],
    keys: usize,
    dim: usize,
    what: &str,
    table: &str,
) -> PyResult<()> {
    if shape != [keys, dim] {
        return Err(WrongDimError::new_err(format!(
            "table {table} has dim {dim}: {what} of shape {shape:?} does not fit {keys} keys \
             (want ({keys}, {dim}))"
        )));
    }
    Ok(())
}

/// [`contiguous`] for an array written into.
pub(crate) fn contiguous_mut<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
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
pub(crate) fn into_rows<'py>(
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
