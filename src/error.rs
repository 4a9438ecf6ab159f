//! The one error type of the crate. The Python bindings map each kind to an exception class:
//! `Value` and `Shape` -> `ValueError`, `Type` -> `TypeError`, `NonFinite` and `NonFiniteIterate`
//! -> `FloatingPointError`, `Callback` -> the callback's own exception, unchanged; `Interrupted` ->
//! `KeyboardInterrupt`.

/// Errors raised by ferrodiff. Messages name the argument, what was expected and what was given.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad value: out of range, unknown name, inconsistent parameters.
    #[error("{0}")]
    Value(String),
    /// Arrays whose shapes do not fit together.
    #[error("{0}")]
    Shape(String),
    /// An argument of the wrong kind (integer data where floats are needed, ...).
    #[error("{0}")]
    Type(String),
    /// A non-finite value appeared in a sampler step (usually a NaN/Inf model output).
    #[error("non-finite value (NaN or Inf) in the result of the step at timestep {timestep}: the model output or x contains NaN/Inf, or the schedule divides by zero there")]
    NonFinite { timestep: i64 },
    /// A non-finite value appeared in a σ-space solver step.
    #[error("non-finite value (NaN or Inf) in the result of step {step} (σ = {sigma}): the model output or x contains NaN/Inf")]
    NonFiniteSigma { step: usize, sigma: f64 },
    /// A non-finite value appeared in a Langevin iterate (a NaN/Inf score, or a step size too
    /// large for the score's curvature).
    #[error("non-finite value (NaN or Inf) in the Langevin iterate after iteration {iteration}{}: the score returned NaN/Inf, or the step size is too large for it", level.map(|l| format!(" (noise level {l})")).unwrap_or_default())]
    NonFiniteIterate {
        iteration: usize,
        level: Option<usize>,
    },
    /// An error raised by a user callback (a Python denoiser, a progress callback, ...),
    /// carried through unchanged.
    #[error("{0}")]
    Callback(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// An error from candle (tensor shapes, devices, dtypes).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written (checkpoints, datasets).
    #[error("{path}: {message}")]
    Io {
        path: String,
        message: String,
        not_found: bool,
    },
    /// A file exists but is not what it should be (a corrupt or foreign checkpoint).
    #[error("{path}: {message}")]
    BadFile { path: String, message: String },
    /// The user interrupted a long loop.
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            not_found: e.kind() == std::io::ErrorKind::NotFound,
            message: e.to_string(),
        }
    }
}

/// Shorthand for `Err(Error::Value(format!(...)))`.
#[macro_export]
macro_rules! value_error {
    ($($arg:tt)*) => { return Err($crate::error::Error::Value(format!($($arg)*))) };
}

/// Shorthand for `Err(Error::Shape(format!(...)))`.
#[macro_export]
macro_rules! shape_error {
    ($($arg:tt)*) => { return Err($crate::error::Error::Shape(format!($($arg)*))) };
}
