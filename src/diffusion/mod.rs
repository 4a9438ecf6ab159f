//! The Gaussian algebra of the forward process: q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0)
//! and conversions between the ε / x0 / v / score parameterizations (Ho et al. 2020; Salimans &
//! Ho 2022 for v). Each function works on a batch `[B, ...]` with one timestep per row.
//!
//! All of them are per-row affine maps `out = a_t · u + b_t · w`; the coefficients come from the
//! f64 schedule and one pass over the data applies them.

use crate::error::Result;
use crate::kernels::affine_rows;
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// Where ᾱ_t = 0 (zero terminal SNR), ε-prediction cannot give x0 (it divides by sqrt(ᾱ_t));
/// the conversion uses ᾱ = 2^-24 there instead, as diffusers' Euler scheduler does, so results
/// stay finite (diffusers issues #3851, #5103). Use v-prediction with such schedules.
pub const ALPHA_BAR_FLOOR: f64 = 1.0 / 16_777_216.0;

/// `value`, or [`ALPHA_BAR_FLOOR`] where it is 0 in f32 (a division by it would be infinite).
/// Small but representable values are kept: the cosine schedule's ᾱ_999 = 2.4e-9 is a real
/// noise level, and flooring it changed x0 by 5x against diffusers, OpenAI and exact arithmetic.
pub fn floor_if_zero(value: f64) -> f64 {
    if (value as f32) > 0.0 {
        value
    } else {
        ALPHA_BAR_FLOOR
    }
}

/// What a denoiser predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise ε (Ho et al. 2020).
    Epsilon,
    /// The clean sample x0 (diffusers' `"sample"`).
    X0,
    /// The velocity v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 (Salimans & Ho 2022; diffusers' `"v_prediction"`).
    V,
}

impl Prediction {
    /// Parses `"epsilon" | "x0" | "v"` and diffusers' aliases `"sample"`, `"v_prediction"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "x0" | "sample" => Ok(Prediction::X0),
            "v" | "v_prediction" => Ok(Prediction::V),
            other => value_error!(
                "unknown prediction type {other:?}: expected one of 'epsilon', 'x0', 'v' (diffusers' 'sample' and 'v_prediction' are accepted too)"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::X0 => "x0",
            Prediction::V => "v",
        }
    }
}

/// x0 = a · x_t + b · model_output for a model output of type `prediction` at ᾱ.
pub fn x0_coefficients(prediction: Prediction, alpha_bar: f64) -> (f64, f64) {
    match prediction {
        Prediction::Epsilon => {
            let a = floor_if_zero(alpha_bar);
            (1.0 / a.sqrt(), -(1.0 - alpha_bar).sqrt() / a.sqrt())
        }
        Prediction::X0 => (0.0, 1.0),
        Prediction::V => (alpha_bar.sqrt(), -(1.0 - alpha_bar).sqrt()),
    }
}

/// ε = a · x_t + b · model_output for a model output of type `prediction` at ᾱ.
pub fn eps_coefficients(prediction: Prediction, alpha_bar: f64) -> (f64, f64) {
    match prediction {
        Prediction::Epsilon => (0.0, 1.0),
        Prediction::X0 => {
            // Where ᾱ = 1 nothing is noised and ε is undefined; floor 1 - ᾱ the same way.
            let s = floor_if_zero(1.0 - alpha_bar).sqrt();
            (1.0 / s, -alpha_bar.sqrt() / s)
        }
        Prediction::V => ((1.0 - alpha_bar).sqrt(), alpha_bar.sqrt()),
    }
}

/// Checks that `t` has one entry per row of an array of `shape` and returns the ᾱ of each row.
pub fn row_alpha_bars(schedule: &Schedule, shape: &[usize], t: &[i64]) -> Result<Vec<f64>> {
    let batch = shape.first().copied().unwrap_or(0);
    if shape.is_empty() {
        shape_error!("arrays must have a batch dimension, got a 0-d array");
    }
    if t.len() != batch {
        shape_error!(
            "t has {} entries but the batch has {batch} rows (shape {shape:?})",
            t.len()
        );
    }
    t.iter()
        .map(|&ti| Ok(schedule.alphas_cumprod[schedule.check_timestep(ti)?]))
        .collect()
}

fn apply(
    shape: &[usize],
    coefs: impl Fn(f64) -> (f64, f64),
    alpha_bars: &[f64],
    u: &[f32],
    w: &[f32],
    out: &mut [f32],
) {
    let rows: Vec<(f32, f32)> = alpha_bars
        .iter()
        .map(|&ab| {
            let (a, b) = coefs(ab);
            (a as f32, b as f32)
        })
        .collect();
    let row_len = u.len().checked_div(shape[0]).unwrap_or(0);
    affine_rows(&rows, row_len, u, w, out);
}

/// Forward process, DDPM eq. 4: x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε.
pub fn q_sample(
    s: &Schedule,
    shape: &[usize],
    x0: &[f32],
    t: &[i64],
    noise: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    apply(shape, |a| (a.sqrt(), (1.0 - a).sqrt()), &ab, x0, noise, out);
    Ok(())
}

/// Posterior mean μ̃_t(x_t, x0) = coef1 x0 + coef2 x_t (DDPM eq. 7), and the per-row variance
/// and clipped log variance.
pub fn q_posterior_mean(
    s: &Schedule,
    shape: &[usize],
    x0: &[f32],
    x_t: &[f32],
    t: &[i64],
    out: &mut [f32],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let _ = row_alpha_bars(s, shape, t)?;
    let idx: Vec<usize> = t.iter().map(|&ti| ti as usize).collect();
    let rows: Vec<(f32, f32)> = idx
        .iter()
        .map(|&i| {
            (
                s.posterior_mean_coef1[i] as f32,
                s.posterior_mean_coef2[i] as f32,
            )
        })
        .collect();
    let row_len = x0.len().checked_div(shape[0]).unwrap_or(0);
    affine_rows(&rows, row_len, x0, x_t, out);
    Ok((
        idx.iter().map(|&i| s.posterior_variance[i]).collect(),
        idx.iter()
            .map(|&i| s.posterior_log_variance_clipped[i])
            .collect(),
    ))
}

/// x0 from a model output of any prediction type.
pub fn predict_x0(
    s: &Schedule,
    shape: &[usize],
    x_t: &[f32],
    t: &[i64],
    model_output: &[f32],
    prediction: Prediction,
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    apply(
        shape,
        |a| x0_coefficients(prediction, a),
        &ab,
        x_t,
        model_output,
        out,
    );
    Ok(())
}

/// ε from a model output of any prediction type.
pub fn predict_eps(
    s: &Schedule,
    shape: &[usize],
    x_t: &[f32],
    t: &[i64],
    model_output: &[f32],
    prediction: Prediction,
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    apply(
        shape,
        |a| eps_coefficients(prediction, a),
        &ab,
        x_t,
        model_output,
        out,
    );
    Ok(())
}

/// The v target, v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0 (Salimans & Ho 2022, sec. 4).
pub fn velocity(
    s: &Schedule,
    shape: &[usize],
    x0: &[f32],
    t: &[i64],
    noise: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    apply(
        shape,
        |a| (-(1.0 - a).sqrt(), a.sqrt()),
        &ab,
        x0,
        noise,
        out,
    );
    Ok(())
}

/// The score ∇ log q(x_t) = -ε / sqrt(1-ᾱ_t) from a model output of any prediction type.
pub fn score(
    s: &Schedule,
    shape: &[usize],
    x_t: &[f32],
    t: &[i64],
    model_output: &[f32],
    prediction: Prediction,
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    for (&ti, &a) in t.iter().zip(&ab) {
        if a >= 1.0 {
            value_error!("the score is undefined at timestep {ti}, where 1 - alphas_cumprod = 0");
        }
    }
    apply(
        shape,
        |a| {
            let (ex, em) = eps_coefficients(prediction, a);
            let k = -1.0 / (1.0 - a).sqrt();
            (k * ex, k * em)
        },
        &ab,
        x_t,
        model_output,
        out,
    );
    Ok(())
}

/// ε from a score of the noised marginal: ε = -sqrt(1-ᾱ_t) ∇ log q(x_t) (the inverse of `score`
/// for ε-prediction).
pub fn eps_from_score(
    s: &Schedule,
    shape: &[usize],
    score: &[f32],
    t: &[i64],
    out: &mut [f32],
) -> Result<()> {
    let ab = row_alpha_bars(s, shape, t)?;
    apply(shape, |a| (-(1.0 - a).sqrt(), 0.0), &ab, score, score, out);
    Ok(())
}

/// Checks that two arrays of a binary operation have the same shape.
pub fn check_shapes(name_a: &str, a: &[usize], name_b: &str, b: &[usize]) -> Result<()> {
    if a != b {
        shape_error!("{name_a} has shape {a:?} but {name_b} has shape {b:?}");
    }
    Ok(())
}
