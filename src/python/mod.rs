//! pyo3 bindings (cargo feature `python`): numpy <-> Rust conversion, GIL release, error
//! mapping. No math here: every computation is a call into the core.

mod arrays;
mod distill;
mod langevin;
mod losses;
mod metrics;
mod nn;
mod ode_likelihood;
mod oracles;
mod samplers;
mod sampling;
mod schedule;
mod sigma_samplers;

use pyo3::exceptions::{
    PyFileNotFoundError, PyFloatingPointError, PyKeyboardInterrupt, PyOSError, PyRuntimeError,
    PyTypeError, PyValueError,
};
use pyo3::prelude::*;

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Value(m) | Error::Shape(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            e @ (Error::NonFinite { .. }
            | Error::NonFiniteSigma { .. }
            | Error::NonFiniteIterate { .. }) => PyFloatingPointError::new_err(e.to_string()),
            Error::Callback(inner) => match inner.downcast::<PyErr>() {
                Ok(py_err) => *py_err,
                Err(other) => PyRuntimeError::new_err(other.to_string()),
            },
            e @ Error::Io {
                not_found: true, ..
            } => PyFileNotFoundError::new_err(e.to_string()),
            e @ Error::Io { .. } => PyOSError::new_err(e.to_string()),
            e @ Error::BadFile { .. } => PyValueError::new_err(e.to_string()),
            Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
            e @ Error::Candle(_) => PyRuntimeError::new_err(e.to_string()),
        }
    }
}

/// Carries a Python exception through Rust code unchanged.
pub(crate) fn callback_error(e: PyErr) -> Error {
    Error::Callback(Box::new(e))
}

/// Keeps freed tensor buffers in the process heap. Candle allocates a fresh buffer for every
/// op's output; a training step at batch 1024 makes hundreds of 1 MB buffers, and with glibc's
/// defaults each is a new mmap (or a heap trimmed back to the system), so every step pays page
/// faults and zeroing for memory it just released: a quarter of the MLP's step time. Raising
/// the mmap and trim thresholds lets malloc reuse those pages, much as PyTorch's caching
/// allocator does. Thresholds the user set through glibc's `MALLOC_*_` variables are kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    const MMAP_THRESHOLD: libc::c_int = 64 << 20;
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    // SAFETY: mallopt only changes allocator parameters; it is called once, at import.
    unsafe {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    tune_malloc();
    // Registers the fork handler now, so a child forked before any parallel work knows it.
    crate::kernels::parallel_allowed();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    schedule::register(m)?;
    sampling::register(m)?;
    samplers::register(m)?;
    sigma_samplers::register(m)?;
    ode_likelihood::register(m)?;
    oracles::register(m)?;
    losses::register(m)?;
    langevin::register(m)?;
    metrics::register(m)?;
    nn::register(m)?;
    distill::register(m)?;
    Ok(())
}
