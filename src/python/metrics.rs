//! `ferrodiff.metrics`: sample-quality metrics (MMD, Fréchet distance between Gaussian fits).

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::arrays::{f32_array, f64_vec, type_name};

/// A sample array [N, D] (or [N, ...], each row flattened) as C-contiguous float32, with N and D.
fn sample_rows<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, usize, usize)> {
    let a = f32_array(obj, name)?;
    let shape = a.shape().to_vec();
    if shape.len() < 2 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a sample array of shape [N, D] (or [N, ...]), got shape {shape:?}; \
             reshape 1-D data to [N, 1]"
        )));
    }
    let row = shape[1..].iter().product();
    Ok((a, shape[0], row))
}

/// x and y as samples with rows of the same size: (x, N, y, M, D).
#[allow(clippy::type_complexity)]
fn sample_pair<'py>(
    x: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
) -> PyResult<(
    Bound<'py, PyArrayDyn<f32>>,
    usize,
    Bound<'py, PyArrayDyn<f32>>,
    usize,
    usize,
)> {
    let (xa, n, dx) = sample_rows(x, "x")?;
    let (ya, m, dy) = sample_rows(y, "y")?;
    if dx != dy {
        return Err(PyValueError::new_err(format!(
            "x has shape {:?} but y has shape {:?}: rows must have the same size",
            xa.shape(),
            ya.shape()
        )));
    }
    Ok((xa, n, ya, m, dx))
}

/// `bandwidths`: None (the median heuristic: an empty list for the core), one float, or a
/// non-empty 1-D sequence of floats.
fn bandwidths_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<f64>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    let np = obj.py().import("numpy")?;
    let ndim: usize = np.call_method1("ndim", (obj,))?.extract()?;
    let bandwidths = if ndim == 0 {
        vec![obj.extract::<f64>().map_err(|_| {
            PyTypeError::new_err(format!(
                "bandwidths must be a float, a sequence of floats or None, got {}",
                type_name(obj)
            ))
        })?]
    } else {
        f64_vec(obj, "bandwidths")?
    };
    if bandwidths.is_empty() {
        return Err(PyValueError::new_err(
            "bandwidths is empty: pass at least one bandwidth, or None for the median heuristic",
        ));
    }
    Ok(bandwidths)
}

/// A [D, D] matrix argument (a covariance) as a row-major float64 Vec.
fn f64_matrix(obj: &Bound<'_, PyAny>, name: &str, d: usize, mu_name: &str) -> PyResult<Vec<f64>> {
    let np = obj.py().import("numpy")?;
    let a = np.call_method1("asarray", (obj,))?;
    let shape: Vec<usize> = a.getattr("shape")?.extract()?;
    if shape != [d, d] {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {shape:?} but {mu_name} has shape [{d}]: expected [{d}, {d}]"
        )));
    }
    f64_vec(&a.call_method1("reshape", (-1,))?, name)
}

/// Unbiased MMD² between samples x [N, D] and y [M, D] with the kernel
/// Σ_h exp(-|a - b|² / (2 h²)) over `bandwidths` (None: the median pairwise distance of the
/// pooled sample). Near 0, possibly slightly negative, for two samples of one distribution.
#[pyfunction]
#[pyo3(signature = (x, y, bandwidths=None))]
fn mmd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    bandwidths: Option<&Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let (xa, n, ya, m, d) = sample_pair(x, y)?;
    let h = bandwidths_arg(bandwidths)?;
    let (xr, yr) = (xa.readonly(), ya.readonly());
    let (xv, yv) = (xr.as_slice()?, yr.as_slice()?);
    Ok(py.detach(|| crate::metrics::mmd_rbf(xv, yv, n, m, d, &h))?)
}

/// Fréchet distance between the Gaussian fits (mean, unbiased covariance) of samples x [N, D]
/// and y [M, D]: FID when the rows are Inception features. N, M >= 2.
#[pyfunction]
fn frechet_distance(py: Python<'_>, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<f64> {
    let (xa, _, ya, _, d) = sample_pair(x, y)?;
    let (xr, yr) = (xa.readonly(), ya.readonly());
    let (xv, yv) = (xr.as_slice()?, yr.as_slice()?);
    Ok(py.detach(|| crate::metrics::frechet_distance_samples(xv, yv, d))?)
}

/// Mean (float64 [D]) and unbiased covariance (float64 [D, D]) of the rows of x [N, D], N >= 2.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn gaussian_stats<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArray2<f64>>)> {
    let (xa, n, d) = sample_rows(x, "x")?;
    let (mean, cov) = {
        let xr = xa.readonly();
        let xv = xr.as_slice()?;
        py.detach(|| crate::metrics::mean_cov(xv, n, d))?
    };
    Ok((mean.into_pyarray(py), cov.into_pyarray(py).reshape([d, d])?))
}

/// Fréchet distance between N(mu1, cov1) and N(mu2, cov2): mu [D], cov [D, D] (e.g. from
/// `gaussian_stats`, or the statistics files of FID implementations).
#[pyfunction]
fn frechet_distance_from_stats(
    py: Python<'_>,
    mu1: &Bound<'_, PyAny>,
    cov1: &Bound<'_, PyAny>,
    mu2: &Bound<'_, PyAny>,
    cov2: &Bound<'_, PyAny>,
) -> PyResult<f64> {
    let (m1, m2) = (f64_vec(mu1, "mu1")?, f64_vec(mu2, "mu2")?);
    let d = m1.len();
    if m2.len() != d {
        return Err(PyValueError::new_err(format!(
            "mu1 has shape [{d}] but mu2 has shape [{}]",
            m2.len()
        )));
    }
    let c1 = f64_matrix(cov1, "cov1", d, "mu1")?;
    let c2 = f64_matrix(cov2, "cov2", d, "mu1")?;
    Ok(py.detach(|| crate::metrics::frechet_distance(&m1, &c1, &m2, &c2, d))?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mmd, m)?)?;
    m.add_function(wrap_pyfunction!(frechet_distance, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian_stats, m)?)?;
    m.add_function(wrap_pyfunction!(frechet_distance_from_stats, m)?)?;
    Ok(())
}
