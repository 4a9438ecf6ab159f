//! Getting numpy arrays in and out: zero-copy for C-contiguous float32, one copy for other
//! float dtypes or layouts, `TypeError` for everything else.

use numpy::{PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyInt;

/// A C-contiguous float32 array for `obj`: the object itself when it already is one, else a
/// converted copy (float16/float64, strided or Fortran-ordered input, array-likes).
pub fn f32_array<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        if a.is_c_contiguous() {
            return Ok(a.clone());
        }
    }
    let py = obj.py();
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|e| {
        PyTypeError::new_err(format!(
            "{name} must be a float array, got {} ({e})",
            type_name(obj)
        ))
    })?;
    let arr = arr.cast::<numpy::PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a float array, got {}",
            type_name(obj)
        ))
    })?;
    let kind = arr.dtype().kind();
    if kind != b'f' {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a floating-point array, got dtype {} (cast it to float32 first)",
            arr.dtype()
        )));
    }
    let c = np.call_method1("ascontiguousarray", (arr, "float32"))?;
    Ok(c.cast::<PyArrayDyn<f32>>()?.clone())
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

/// A float64 1-D array argument (schedule tables) as a Vec.
pub fn f64_vec(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<f64>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let arr = arr.cast::<numpy::PyUntypedArray>()?;
    let kind = arr.dtype().kind();
    if kind != b'f' && kind != b'i' && kind != b'u' {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a real numeric array, got dtype {}",
            arr.dtype()
        )));
    }
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be 1-D, got shape {:?}",
            arr.shape()
        )));
    }
    let c = np.call_method1("ascontiguousarray", (arr, "float64"))?;
    let c = c.cast::<numpy::PyArray1<f64>>()?;
    Ok(c.to_vec()?)
}

/// Timesteps: a Python int (broadcast to the batch), or an integer array of shape [B] (or 0-d).
pub fn timesteps_arg(obj: &Bound<'_, PyAny>, batch: usize) -> PyResult<Vec<i64>> {
    if obj.is_instance_of::<PyInt>() {
        let t: i64 = obj.extract()?;
        return Ok(vec![t; batch]);
    }
    let py = obj.py();
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "t must be an int or an integer array, got {}",
            type_name(obj)
        ))
    })?;
    let arr = arr.cast::<numpy::PyUntypedArray>()?;
    let kind = arr.dtype().kind();
    if kind != b'i' && kind != b'u' {
        return Err(PyTypeError::new_err(format!(
            "t must be integer timesteps (an int or an int64 array of shape [B]), got dtype {}",
            arr.dtype()
        )));
    }
    let c = np.call_method1("ascontiguousarray", (arr, "int64"))?;
    let c = c.cast::<PyArrayDyn<i64>>()?;
    let v = c.to_vec()?;
    match c.ndim() {
        0 => Ok(vec![v[0]; batch]),
        1 => {
            if v.len() != batch {
                return Err(PyValueError::new_err(format!(
                    "t has {} entries but the batch has {batch} rows",
                    v.len()
                )));
            }
            Ok(v)
        }
        _ => Err(PyValueError::new_err(format!(
            "t must be an int or a 1-D array of shape [B], got shape {:?}",
            c.shape()
        ))),
    }
}

/// Timesteps for a network's time embedding: integers as `timesteps_arg`, or real values (a
/// float or float array, as σ-space samplers pass between trained timesteps).
pub fn real_timesteps_arg(obj: &Bound<'_, PyAny>, batch: usize) -> PyResult<Vec<f32>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let is_float = obj.is_instance_of::<pyo3::types::PyFloat>()
        || np
            .call_method1("asarray", (obj,))
            .ok()
            .and_then(|a| {
                a.cast::<numpy::PyUntypedArray>()
                    .ok()
                    .map(|a| a.dtype().kind() == b'f')
            })
            .unwrap_or(false);
    if !is_float {
        return Ok(timesteps_arg(obj, batch)?
            .into_iter()
            .map(|v| v as f32)
            .collect());
    }
    let c = np.call_method1("ascontiguousarray", (obj, "float64"))?;
    let c = c.cast::<PyArrayDyn<f64>>()?;
    let v = c.to_vec()?;
    if v.iter().any(|t| !t.is_finite()) {
        return Err(PyValueError::new_err("t contains NaN or Inf"));
    }
    match c.ndim() {
        0 => Ok(vec![v[0] as f32; batch]),
        1 if v.len() == batch => Ok(v.into_iter().map(|t| t as f32).collect()),
        _ => Err(PyValueError::new_err(format!(
            "t must be a number or a 1-D array of shape [{batch}], got shape {:?}",
            c.shape()
        ))),
    }
}

/// A fresh, uninitialised float32 array that the caller fills completely.
pub fn new_f32<'py>(py: Python<'py>, shape: &[usize]) -> Bound<'py, PyArrayDyn<f32>> {
    // SAFETY: every caller writes all elements before the array is returned to Python.
    unsafe { PyArrayDyn::<f32>::new(py, shape.to_vec(), false) }
}

/// A float32 numpy array holding `data` with `shape`, without copying.
pub fn vec_to_array<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    use numpy::IntoPyArray;
    Ok(data
        .into_pyarray(py)
        .reshape(shape.to_vec())?
        .into_any()
        .cast::<PyArrayDyn<f32>>()?
        .clone())
}

/// The batch size of a shape (rows of the first axis); 0-d arrays are an error.
pub fn batch_of(shape: &[usize], name: &str) -> PyResult<usize> {
    shape.first().copied().ok_or_else(|| {
        PyValueError::new_err(format!(
            "{name} must have a batch dimension (shape [B, ...]), got a 0-d array"
        ))
    })
}

/// A shape argument as sizes, a `ValueError` naming `name` for a negative size (an unsigned
/// extraction would raise OverflowError).
pub fn shape_arg(shape: Vec<i64>, name: &str) -> PyResult<Vec<usize>> {
    if shape.iter().any(|&d| d < 0) {
        return Err(PyValueError::new_err(format!(
            "{name} must have non-negative sizes, got {shape:?}"
        )));
    }
    Ok(shape.into_iter().map(|d| d as usize).collect())
}
