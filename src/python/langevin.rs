//! `ferrodiff.langevin`: SGLD, annealed Langevin dynamics, the geometric σ ladder and the
//! denoising score-matching loss. The score function is a Python callable called from the Rust
//! loop; each update pass runs with the GIL released.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::arrays::{batch_of, f32_array, f64_vec, new_f32, type_name, vec_to_array};
use super::callback_error;
use super::sampling::PyHooks;
use crate::error::Result;
use crate::sample::langevin::{self, AnnealedConfig};

fn callable_arg(f: &Bound<'_, PyAny>, name: &str, usage: &str) -> PyResult<()> {
    if !f.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be callable as {usage}, got {}",
            type_name(f)
        )));
    }
    Ok(())
}

/// The score function's return value as f32 data of x's shape.
fn score_output(r: &Bound<'_, PyAny>, shape: &[usize]) -> PyResult<Vec<f32>> {
    let a = f32_array(r, "score_fn's output").map_err(|e| {
        PyTypeError::new_err(format!(
            "score_fn must return a float array of x's shape {shape:?}, got {} ({})",
            type_name(r),
            e.value(r.py())
        ))
    })?;
    if a.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "score_fn returned an array of shape {:?} but x has shape {shape:?}",
            a.shape()
        )));
    }
    Ok(a.readonly().as_slice()?.to_vec())
}

/// An initial iterate: a float array with a batch dimension, copied into a Vec.
fn initial_x(x: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let a = f32_array(x, name)?;
    let shape = a.shape().to_vec();
    batch_of(&shape, name)?;
    Ok((a.readonly().as_slice()?.to_vec(), shape))
}

/// Stochastic gradient Langevin dynamics (Welling & Teh 2011): `steps` iterations of
/// `x ← x + (δ/2) score_fn(x) + sqrt(δ) ε` from `x_init` (float32 [B, ...], B chains), with
/// `δ = step_size`. Noise of iteration k: stream k of `seed` (identical for any thread count).
/// `callback(k, x)` runs after iteration k.
#[pyfunction]
#[pyo3(signature = (score_fn, x_init, step_size, steps, seed=0, *, progress=false, callback=None))]
#[allow(clippy::too_many_arguments)]
fn sgld<'py>(
    py: Python<'py>,
    score_fn: &Bound<'py, PyAny>,
    x_init: &Bound<'py, PyAny>,
    step_size: f64,
    steps: usize,
    seed: u64,
    progress: bool,
    callback: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    callable_arg(score_fn, "score_fn", "score_fn(x)")?;
    if let Some(cb) = &callback {
        callable_arg(cb, "callback", "callback(iteration, x)")?;
    }
    let (x, shape) = initial_x(x_init, "x_init")?;
    let mut hooks =
        PyHooks::new(py, steps, progress, callback, &shape, "SGLD")?.with_iterate_callback();
    let mut score = |x: &[f32]| -> Result<Vec<f32>> {
        let run = || -> PyResult<Vec<f32>> {
            let xa = vec_to_array(py, x.to_vec(), &shape)?;
            score_output(&score_fn.call1((xa,))?, &shape)
        };
        run().map_err(callback_error)
    };
    let r = langevin::sgld(&mut score, x, step_size, steps, seed, &mut hooks);
    hooks.close();
    vec_to_array(py, r?, &shape)
}

/// Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): for each σ_i of the descending
/// ladder `sigmas`, `steps_per_level` iterations of `x ← x + α_i score_fn(x, σ_i) + sqrt(2 α_i) z`
/// with `α_i = eps (σ_i/σ_L)²`. Starts from `x_init`, or from `σ_1 · z` of `shape` (the VE prior
/// N(0, σ_1² I); z from `seed`'s initial stream). `score_fn(x, sigma)` gets sigma as a float.
#[pyfunction]
#[pyo3(signature = (score_fn, sigmas, shape=None, steps_per_level=langevin::NCSN_STEPS_PER_LEVEL, eps=langevin::NCSN_EPS, seed=0, *, x_init=None, progress=false))]
#[allow(clippy::too_many_arguments)]
fn annealed<'py>(
    py: Python<'py>,
    score_fn: &Bound<'py, PyAny>,
    sigmas: &Bound<'py, PyAny>,
    shape: Option<Vec<i64>>,
    steps_per_level: usize,
    eps: f64,
    seed: u64,
    x_init: Option<&Bound<'py, PyAny>>,
    progress: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    callable_arg(score_fn, "score_fn", "score_fn(x, sigma)")?;
    let shape = shape
        .map(|s| super::arrays::shape_arg(s, "shape"))
        .transpose()?;
    let sigmas = f64_vec(sigmas, "sigmas")?;
    // Checked before sigmas[0] is read for the initial x.
    langevin::annealed_step_sizes(&sigmas, eps)?;
    let (x, shape) = match (x_init, shape) {
        (Some(xi), shape) => {
            let (x, sh) = initial_x(xi, "x_init")?;
            if let Some(s) = shape {
                if s != sh {
                    return Err(PyValueError::new_err(format!(
                        "shape {s:?} does not match x_init's shape {sh:?} (pass one of them)"
                    )));
                }
            }
            (x, sh)
        }
        (None, Some(s)) => {
            batch_of(&s, "shape")?;
            let n = s.iter().product();
            (py.detach(|| langevin::annealed_init(n, sigmas[0], seed)), s)
        }
        (None, None) => {
            return Err(PyValueError::new_err(
                "annealed needs the shape of the samples (shape=(B, ...)) or an initial x_init",
            ))
        }
    };
    let config = AnnealedConfig {
        sigmas,
        steps_per_level,
        eps,
        seed,
    };
    let total = config.sigmas.len() * steps_per_level;
    let mut hooks = PyHooks::new(py, total, progress, None, &shape, "annealed Langevin")?
        .with_iterate_callback();
    let mut score = |x: &[f32], sigma: f64| -> Result<Vec<f32>> {
        let run = || -> PyResult<Vec<f32>> {
            let xa = vec_to_array(py, x.to_vec(), &shape)?;
            score_output(&score_fn.call1((xa, sigma))?, &shape)
        };
        run().map_err(callback_error)
    };
    let r = langevin::annealed(&mut score, x, &config, &mut hooks);
    hooks.close();
    vec_to_array(py, r?, &shape)
}

/// `n` noise levels in geometric progression from `sigma_max` down to `sigma_min` (float64);
/// the defaults are NCSN's ladder.
#[pyfunction]
#[pyo3(signature = (sigma_max=langevin::NCSN_SIGMA_MAX, sigma_min=langevin::NCSN_SIGMA_MIN, n=langevin::NCSN_LEVELS))]
fn geometric_sigmas(
    py: Python<'_>,
    sigma_max: f64,
    sigma_min: f64,
    n: usize,
) -> PyResult<Bound<'_, PyArray1<f64>>> {
    Ok(langevin::geometric_sigmas(sigma_max, sigma_min, n)?.into_pyarray(py))
}

/// Per-sample losses (float64 [B]) and the gradient (float32, the score output's shape).
type LossAndGradient<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArrayDyn<f32>>);

/// NCSN's denoising score-matching loss per sample, `½ σ² mean_i (s_i + (x̃_i - x0_i)/σ²)²`, and
/// its gradient with respect to `score_output` of the sum over samples (divide by B for the
/// batch mean). Returns (loss float64 [B], gradient float32 of score_output's shape).
#[pyfunction]
fn dsm_loss<'py>(
    py: Python<'py>,
    score_output: &Bound<'py, PyAny>,
    x_noisy: &Bound<'py, PyAny>,
    x0: &Bound<'py, PyAny>,
    sigmas_per_sample: &Bound<'py, PyAny>,
) -> PyResult<LossAndGradient<'py>> {
    let s = f32_array(score_output, "score_output")?;
    let shape = s.shape().to_vec();
    let batch = batch_of(&shape, "score_output")?;
    let xn = f32_array(x_noisy, "x_noisy")?;
    let x = f32_array(x0, "x0")?;
    for (a, name) in [(&xn, "x_noisy"), (&x, "x0")] {
        if a.shape() != shape.as_slice() {
            return Err(PyValueError::new_err(format!(
                "{name} has shape {:?} but score_output has shape {shape:?}",
                a.shape()
            )));
        }
    }
    let sigmas = f64_vec(sigmas_per_sample, "sigmas_per_sample")?;
    if sigmas.len() != batch {
        return Err(PyValueError::new_err(format!(
            "sigmas_per_sample has {} entries but the batch has {batch} rows",
            sigmas.len()
        )));
    }
    let grad = new_f32(py, &shape);
    let losses = {
        let (sr, xnr, xr) = (s.readonly(), xn.readonly(), x.readonly());
        let mut gw = grad.readwrite();
        let (sv, xnv, xv, gv) = (
            sr.as_slice()?,
            xnr.as_slice()?,
            xr.as_slice()?,
            gw.as_slice_mut()?,
        );
        py.detach(|| langevin::dsm_loss(sv, xnv, xv, &sigmas, Some(gv)))?
    };
    Ok((losses.into_pyarray(py), grad))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sgld, m)?)?;
    m.add_function(wrap_pyfunction!(annealed, m)?)?;
    m.add_function(wrap_pyfunction!(geometric_sigmas, m)?)?;
    m.add_function(wrap_pyfunction!(dsm_loss, m)?)?;
    Ok(())
}
