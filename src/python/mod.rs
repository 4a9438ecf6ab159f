//! pyo3 bindings (cargo feature `python`): numpy <-> Rust conversion, GIL release, error
//! mapping. No math here: every computation is a call into the core.

mod arrays;
mod langevin;
mod losses;
mod metrics;
mod nn;
mod oracles;
mod samplers;
mod schedule;

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
            e @ (Error::NonFinite { .. } | Error::NonFiniteIterate { .. }) => {
                PyFloatingPointError::new_err(e.to_string())
            }
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    schedule::register(m)?;
    samplers::register(m)?;
    oracles::register(m)?;
    losses::register(m)?;
    langevin::register(m)?;
    metrics::register(m)?;
    nn::register(m)?;
    Ok(())
}
