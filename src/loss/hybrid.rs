//! The hybrid objective of Nichol & Dhariwal (2021), sec. 3.1: L_simple + λ L_vlb with
//! λ = 0.001 and L_vlb = T · L_t for the uniformly drawn t, i.e. per sample
//! `mse + (T/1000) · L_t` (OpenAI's RESCALED_MSE), mse averaged over dimensions and L_t in
//! bits/dim. L_t sees a stop-gradient mean, so it trains only the variance channels.

use super::bpd::{p_mean_log_variance, BpdConfig};
use super::likelihood::{approx_standard_normal_cdf, normal_kl, PROBABILITY_FLOOR};
use crate::diffusion::Prediction;
use crate::error::{Error, Result};
use crate::sample::{model_output_layout, VarianceType};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// λ of the hybrid loss: L_vlb is weighted by T · λ = T/1000.
pub const HYBRID_VLB_WEIGHT: f64 = 1e-3;

/// Per-sample parts of the hybrid loss.
#[derive(Clone, Debug, Default)]
pub struct HybridLoss {
    /// mse + (T/1000) · vb, per sample.
    pub loss: Vec<f64>,
    pub mse: Vec<f64>,
    /// L_t in bits/dim with the mean frozen.
    pub vb: Vec<f64>,
}

/// d/dy of the tanh approximation of the standard normal CDF.
fn approx_standard_normal_pdf(y: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let th = (k * (y + 0.044715 * y.powi(3))).tanh();
    0.5 * k * (1.0 + 3.0 * 0.044715 * y * y) * (1.0 - th * th)
}

/// d log P / d log_scale of the discretized Gaussian likelihood (same cases as its value).
fn discretized_log_likelihood_dlogscale(x: f64, mean: f64, log_scale: f64, half_width: f64) -> f64 {
    let inv = (-log_scale).exp();
    let (u, l) = (inv * (x - mean + half_width), inv * (x - mean - half_width));
    // du/ds = -u and dl/ds = -l for s = log_scale.
    let (p, dp) = if x <= -1.0 + half_width {
        (
            approx_standard_normal_cdf(u),
            -u * approx_standard_normal_pdf(u),
        )
    } else if x >= 1.0 - half_width {
        (
            approx_standard_normal_cdf(-l),
            l * approx_standard_normal_pdf(-l),
        )
    } else if l > 0.0 {
        (
            approx_standard_normal_cdf(-l) - approx_standard_normal_cdf(-u),
            l * approx_standard_normal_pdf(-l) - u * approx_standard_normal_pdf(-u),
        )
    } else {
        (
            approx_standard_normal_cdf(u) - approx_standard_normal_cdf(l),
            -u * approx_standard_normal_pdf(u) + l * approx_standard_normal_pdf(l),
        )
    };
    if !(PROBABILITY_FLOOR..=1.0).contains(&p) {
        return 0.0; // clamped: the value does not move
    }
    dp / p
}

/// The hybrid loss for a learned-range model output `[B, 2C, ...]` at x_t = q_sample(x0, t,
/// noise); `grad` (same shape as the output) receives the gradient of the sum of per-sample
/// losses: 2 (o - y)/D on the mean channels, the variational term's on the variance channels.
#[allow(clippy::too_many_arguments)]
pub fn hybrid_loss(
    schedule: &Schedule,
    shape: &[usize],
    x0: &[f32],
    x_t: &[f32],
    noise: &[f32],
    t: &[i64],
    model_output: &[f32],
    model_shape: &[usize],
    prediction: Prediction,
    bins: u32,
    grad: Option<&mut [f32]>,
) -> Result<HybridLoss> {
    let n: usize = shape.iter().product();
    if x0.len() != n || x_t.len() != n || noise.len() != n {
        shape_error!("x0, x_t and noise must all have shape {shape:?}");
    }
    let (row_len, stride) = model_output_layout(shape, model_shape)?;
    if stride == row_len {
        shape_error!(
            "the hybrid loss trains learned variances: model_output needs twice the channels of x0 {shape:?}, got {model_shape:?}"
        );
    }
    let batch = shape[0];
    if t.len() != batch {
        shape_error!("t has {} entries but the batch has {batch} rows", t.len());
    }
    if bins < 2 {
        value_error!("bins must be at least 2, got {bins}");
    }
    let config = BpdConfig {
        prediction,
        variance: VarianceType::LearnedRange,
        bins,
        seed: 0,
        clip_denoised: false,
    };
    let (mut mean, mut log_var, mut eps) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    p_mean_log_variance(
        schedule,
        x_t,
        t,
        model_output,
        row_len,
        stride,
        &config,
        &mut mean,
        &mut log_var,
        &mut eps,
    )?;
    let scale = schedule.len() as f64 * HYBRID_VLB_WEIGHT;
    let half_width = 1.0 / f64::from(bins - 1);
    let d = row_len.max(1) as f64;
    let mut out = HybridLoss {
        loss: vec![0.0; batch],
        mse: vec![0.0; batch],
        vb: vec![0.0; batch],
    };
    let mut grad = grad;
    if let Some(g) = grad.as_deref() {
        if g.len() != model_output.len() {
            shape_error!(
                "grad has {} values but model_output has {}",
                g.len(),
                model_output.len()
            );
        }
    }
    for (b, &tb) in t.iter().enumerate() {
        let ti = schedule.check_timestep(tb)?;
        let abar = schedule.alphas_cumprod[ti];
        let (c1, c2) = (
            schedule.posterior_mean_coef1[ti],
            schedule.posterior_mean_coef2[ti],
        );
        let lq = schedule.posterior_log_variance_clipped[ti];
        let (min_log, max_log) = (lq, schedule.betas[ti].ln());
        let (mut sq, mut vb) = (0.0, 0.0);
        for j in 0..row_len {
            let i = b * row_len + j;
            let (mo, vo) = (b * stride + j, b * stride + row_len + j);
            let (x, z, xs) = (x0[i] as f64, noise[i] as f64, x_t[i] as f64);
            let target = match prediction {
                Prediction::Epsilon => z,
                Prediction::X0 => x,
                Prediction::V => abar.sqrt() * z - (1.0 - abar).sqrt() * x,
            };
            let diff = model_output[mo] as f64 - target;
            sq += diff * diff;
            let (mp, lv) = (mean[i] as f64, log_var[i] as f64);
            let dterm_dlv = if ti == 0 {
                if x.is_nan() || x.abs() > 1.0 + 1e-6 {
                    value_error!("x0 must lie in [-1, 1] for the decoder term, got {x}");
                }
                let ll =
                    super::likelihood::discretized_gaussian_log_likelihood(x, mp, 0.5 * lv, bins)
                        .map_err(Error::Value)?;
                vb -= ll;
                -0.5 * discretized_log_likelihood_dlogscale(x, mp, 0.5 * lv, half_width)
            } else {
                let mq = c1 * x + c2 * xs;
                vb += normal_kl(mq, lq, mp, lv);
                // d KL / d log σ_p² (Gaussian KL, mean held fixed).
                0.5 * (1.0 - (lq - lv).exp() - (mq - mp).powi(2) * (-lv).exp())
            };
            if let Some(g) = grad.as_deref_mut() {
                g[mo] = (2.0 * diff / d) as f32;
                // lv = frac · max_log + (1 - frac) · min_log, frac = (v + 1)/2.
                g[vo] =
                    (scale / (d * std::f64::consts::LN_2) * dterm_dlv * 0.5 * (max_log - min_log))
                        as f32;
            }
        }
        out.mse[b] = sq / d;
        out.vb[b] = vb / d / std::f64::consts::LN_2;
        out.loss[b] = out.mse[b] + scale * out.vb[b];
        if !out.loss[b].is_finite() {
            return Err(Error::NonFinite { timestep: tb });
        }
    }
    Ok(out)
}
