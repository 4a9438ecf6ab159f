//! Candle twins of the losses, for training candle denoisers: the same numbers as the
//! slice functions of this module (tested against them) and differentiable end to end with
//! candle's autograd. Tensors are batch-first `[B, ...]`; per-row coefficients come from the
//! f64 schedule and are broadcast over each row.

use candle_core::{DType, Tensor};

use super::weights::{self, Target, Weighting};
use crate::diffusion::{eps_coefficients, x0_coefficients, Prediction};
use crate::error::{Error, Result};
use crate::sample::VarianceType;
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

const LN_2: f64 = std::f64::consts::LN_2;

/// Per-sample mean over every dimension but the first: [B, ...] -> [B].
pub fn mean_flat(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(1)?)
}

/// A [B] list of scalars shaped [B, 1, ...] to broadcast over rows of `like`.
pub(crate) fn per_row(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = values.len();
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

fn timesteps(schedule: &Schedule, t: &[i64], like: &Tensor) -> Result<Vec<usize>> {
    let batch = like.dims().first().copied().unwrap_or(0);
    if t.len() != batch {
        shape_error!("t has {} entries but the batch has {batch} rows", t.len());
    }
    t.iter().map(|&ti| schedule.check_timestep(ti)).collect()
}

/// The regression target of a `prediction` model (see `super::training_target`).
pub fn training_target(
    schedule: &Schedule,
    x0: &Tensor,
    noise: &Tensor,
    t: &[i64],
    prediction: Prediction,
) -> Result<Tensor> {
    let idx = timesteps(schedule, t, x0)?;
    Ok(match prediction {
        Prediction::Epsilon => noise.clone(),
        Prediction::X0 => x0.clone(),
        Prediction::V => {
            let ab: Vec<f64> = idx.iter().map(|&i| schedule.alphas_cumprod[i]).collect();
            let sa: Vec<f64> = ab.iter().map(|a| a.sqrt()).collect();
            let so: Vec<f64> = ab.iter().map(|a| (1.0 - a).sqrt()).collect();
            (noise.broadcast_mul(&per_row(&sa, x0)?)? - x0.broadcast_mul(&per_row(&so, x0)?)?)?
        }
    })
}

/// Per-sample loss weights as a [B] tensor (constants: no gradient flows into them).
pub fn loss_weights(
    schedule: &Schedule,
    t: &[i64],
    kind: &Weighting,
    target: Target,
    like: &Tensor,
) -> Result<Tensor> {
    let idx = timesteps(schedule, t, like)?;
    let w: Vec<f32> = idx
        .iter()
        .map(|&i| {
            let vlb = weights::VlbCoefs {
                beta: schedule.betas[i],
                alpha: schedule.alphas[i],
                alpha_bar: schedule.alphas_cumprod[i],
                posterior_variance_clipped: schedule.posterior_log_variance_clipped[i].exp(),
            };
            weights::loss_weight(schedule.alphas_cumprod[i], kind, target, Some(vlb))
                .map(|w| w as f32)
                .map_err(Error::Value)
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(w, idx.len(), like.device())?.to_dtype(like.dtype())?)
}

/// The simple loss: per-sample mean squared error, times `weights` [B] if given.
pub fn simple_loss(
    model_output: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    if model_output.dims() != target.dims() {
        shape_error!(
            "model_output has shape {:?} but target has shape {:?}",
            model_output.dims(),
            target.dims()
        );
    }
    let l = mean_flat(&(model_output - target)?.sqr()?)?;
    Ok(match weights {
        Some(w) => (l * w)?,
        None => l,
    })
}

/// KL(N(m1, e^lv1) || N(m2, e^lv2)) elementwise (broadcasting).
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    let a = logvar2.broadcast_sub(logvar1)?;
    let b = logvar1.broadcast_sub(logvar2)?.exp()?;
    let c = mean1
        .broadcast_sub(mean2)?
        .sqr()?
        .broadcast_mul(&logvar2.neg()?.exp()?)?;
    Ok(((a + b)? + c)?.affine(0.5, -0.5)?)
}

/// 0.5 (1 + tanh(sqrt(2/π) (x + 0.044715 x³))).
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x + x.powf(3.0)?.affine(0.044715, 0.0)?)?.affine(k, 0.0)?;
    Ok(inner.tanh()?.affine(0.5, 0.5)?)
}

/// Log-likelihood of `x` on a grid of `bins` levels in [-1, 1] under a discretized Gaussian
/// (Ho et al. 2020, eq. 13), elementwise; same cases as `likelihood::discretized_gaussian_log_likelihood`.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
    bins: u32,
) -> Result<Tensor> {
    if bins < 2 {
        value_error!("bins must be at least 2, got {bins}");
    }
    let half_width = 1.0 / f64::from(bins - 1);
    let centered = x.broadcast_sub(means)?;
    let inv = log_scales.neg()?.exp()?;
    let upper = centered.affine(1.0, half_width)?.broadcast_mul(&inv)?;
    let lower = centered.affine(1.0, -half_width)?.broadcast_mul(&inv)?;
    let floor = super::likelihood::PROBABILITY_FLOOR;
    let cdf_upper = approx_standard_normal_cdf(&upper)?;
    let tail_upper = approx_standard_normal_cdf(&lower.neg()?)?; // 1 - Φ(lower)
    let delta = (&cdf_upper - approx_standard_normal_cdf(&lower)?)?;
    let log = |p: &Tensor| -> Result<Tensor> { Ok(p.clamp(floor, 1.0)?.log()?) };
    let is_lowest = x.le(-1.0 + half_width)?;
    let is_highest = x.ge(1.0 - half_width)?;
    let inner = is_highest.where_cond(&log(&tail_upper)?, &log(&delta)?)?;
    Ok(is_lowest.where_cond(&log(&cdf_upper)?, &inner)?)
}

/// The model's mean and log variance of p(x_{t-1} | x_t) (see `super::p_mean_log_variance`).
#[allow(clippy::too_many_arguments)]
fn p_mean_log_variance(
    schedule: &Schedule,
    x_t: &Tensor,
    idx: &[usize],
    mean_part: &Tensor,
    var_part: Option<&Tensor>,
    prediction: Prediction,
    variance: VarianceType,
    clip_denoised: bool,
) -> Result<(Tensor, Tensor)> {
    let (mut ax, mut am, mut c1, mut c2, mut min_log, mut max_log, mut large) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for &t in idx {
        let (a, b) = x0_coefficients(prediction, schedule.alphas_cumprod[t]);
        ax.push(a);
        am.push(b);
        c1.push(schedule.posterior_mean_coef1[t]);
        c2.push(schedule.posterior_mean_coef2[t]);
        min_log.push(schedule.posterior_log_variance_clipped[t]);
        max_log.push(schedule.betas[t].ln());
        large.push(if t == 0 && schedule.len() > 1 {
            schedule.posterior_variance[1].ln()
        } else {
            schedule.betas[t].ln()
        });
    }
    let mut x0_pred = (x_t.broadcast_mul(&per_row(&ax, x_t)?)?
        + mean_part.broadcast_mul(&per_row(&am, x_t)?)?)?;
    if clip_denoised {
        x0_pred = x0_pred.clamp(-1.0, 1.0)?;
    }
    let mean =
        (x0_pred.broadcast_mul(&per_row(&c1, x_t)?)? + x_t.broadcast_mul(&per_row(&c2, x_t)?)?)?;
    let ones = x_t.ones_like()?;
    let log_var = match variance {
        VarianceType::FixedSmall => ones.broadcast_mul(&per_row(&min_log, x_t)?)?,
        VarianceType::FixedLarge => ones.broadcast_mul(&per_row(&large, x_t)?)?,
        VarianceType::LearnedRange => {
            let v = match var_part {
                Some(v) => v,
                None => shape_error!(
                    "variance='learned_range' needs a model output with twice the channels of x"
                ),
            };
            let frac = v.affine(0.5, 0.5)?;
            let one_minus = frac.affine(-1.0, 1.0)?;
            (frac.broadcast_mul(&per_row(&max_log, x_t)?)?
                + one_minus.broadcast_mul(&per_row(&min_log, x_t)?)?)?
        }
    };
    Ok((mean, log_var))
}

/// Splits a model output into its mean half and, for 2C channels, its variance half.
fn split_output(x: &Tensor, model_output: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    if model_output.dims() == x.dims() {
        return Ok((model_output.clone(), None));
    }
    let c = x.dims().get(1).copied().unwrap_or(0);
    if model_output.rank() == x.rank() && x.rank() >= 2 && model_output.dims()[1] == 2 * c {
        return Ok((
            model_output.narrow(1, 0, c)?,
            Some(model_output.narrow(1, c, c)?),
        ));
    }
    shape_error!(
        "model_output has shape {:?} but x has shape {:?}",
        model_output.dims(),
        x.dims()
    )
}

/// The bound's term at each row's timestep in bits/dim, [B]: KL for t > 0, the decoder's
/// negative log-likelihood at t = 0. With `freeze_mean` the model's mean is detached, so only
/// the variance half receives gradient (the hybrid loss).
#[allow(clippy::too_many_arguments)]
pub fn vb_terms_bpd(
    schedule: &Schedule,
    x0: &Tensor,
    x_t: &Tensor,
    t: &[i64],
    model_output: &Tensor,
    prediction: Prediction,
    variance: VarianceType,
    bins: u32,
    clip_denoised: bool,
    freeze_mean: bool,
) -> Result<Tensor> {
    let idx = timesteps(schedule, t, x0)?;
    let (mean_part, var_part) = split_output(x_t, model_output)?;
    let mean_part = if freeze_mean {
        mean_part.detach()
    } else {
        mean_part
    };
    let (mean, log_var) = p_mean_log_variance(
        schedule,
        x_t,
        &idx,
        &mean_part,
        var_part.as_ref(),
        prediction,
        variance,
        clip_denoised,
    )?;
    let c1: Vec<f64> = idx
        .iter()
        .map(|&i| schedule.posterior_mean_coef1[i])
        .collect();
    let c2: Vec<f64> = idx
        .iter()
        .map(|&i| schedule.posterior_mean_coef2[i])
        .collect();
    let lq: Vec<f64> = idx
        .iter()
        .map(|&i| schedule.posterior_log_variance_clipped[i])
        .collect();
    let true_mean =
        (x0.broadcast_mul(&per_row(&c1, x0)?)? + x_t.broadcast_mul(&per_row(&c2, x0)?)?)?;
    let kl = mean_flat(&normal_kl(&true_mean, &per_row(&lq, x0)?, &mean, &log_var)?)?
        .affine(1.0 / LN_2, 0.0)?;
    let nll = mean_flat(
        &discretized_gaussian_log_likelihood(x0, &mean, &log_var.affine(0.5, 0.0)?, bins)?.neg()?,
    )?
    .affine(1.0 / LN_2, 0.0)?;
    let is_decoder: Vec<u8> = idx.iter().map(|&i| u8::from(i == 0)).collect();
    let mask = Tensor::from_vec(is_decoder, idx.len(), x0.device())?;
    Ok(mask.where_cond(&nll, &kl)?)
}

/// The hybrid loss (see `super::hybrid_loss`): mse of the mean half against the training
/// target plus (T/1000) times the bound's term with a frozen mean, per sample [B].
#[allow(clippy::too_many_arguments)]
pub fn hybrid_loss(
    schedule: &Schedule,
    x0: &Tensor,
    x_t: &Tensor,
    noise: &Tensor,
    t: &[i64],
    model_output: &Tensor,
    prediction: Prediction,
    bins: u32,
) -> Result<Tensor> {
    let (mean_part, var_part) = split_output(x_t, model_output)?;
    if var_part.is_none() {
        shape_error!(
            "the hybrid loss trains learned variances: model_output needs twice the channels of x0"
        );
    }
    let target = training_target(schedule, x0, noise, t, prediction)?;
    let mse = simple_loss(&mean_part, &target, None)?;
    let vb = vb_terms_bpd(
        schedule,
        x0,
        x_t,
        t,
        model_output,
        prediction,
        VarianceType::LearnedRange,
        bins,
        false,
        true,
    )?;
    let scale = schedule.len() as f64 * super::HYBRID_VLB_WEIGHT;
    Ok((mse + vb.affine(scale, 0.0)?)?)
}

/// ε implied by a model output of type `prediction` (for losses stated on ε).
pub fn predict_eps(
    schedule: &Schedule,
    x_t: &Tensor,
    t: &[i64],
    model_output: &Tensor,
    prediction: Prediction,
) -> Result<Tensor> {
    let idx = timesteps(schedule, t, x_t)?;
    let (ex, em): (Vec<f64>, Vec<f64>) = idx
        .iter()
        .map(|&i| eps_coefficients(prediction, schedule.alphas_cumprod[i]))
        .unzip();
    Ok((x_t.broadcast_mul(&per_row(&ex, x_t)?)?
        + model_output.broadcast_mul(&per_row(&em, x_t)?)?)?)
}

/// Denoising score matching over a σ ladder (Song & Ermon 2019, eq. 2 with λ(σ) = σ²): per
/// sample ½ σ² · mean over dims of (s + (x̃ - x0)/σ²)², `sigmas` one per sample; the twin of
/// `sample::langevin::dsm_loss`.
pub fn dsm_loss(
    score_output: &Tensor,
    x_noisy: &Tensor,
    x0: &Tensor,
    sigmas: &[f64],
) -> Result<Tensor> {
    if score_output.dims() != x0.dims() || x_noisy.dims() != x0.dims() {
        shape_error!(
            "score_output {:?}, x_noisy {:?} and x0 {:?} must have one shape",
            score_output.dims(),
            x_noisy.dims(),
            x0.dims()
        );
    }
    if sigmas.len() != x0.dims().first().copied().unwrap_or(0) {
        shape_error!(
            "sigmas has {} entries but the batch has {:?} rows",
            sigmas.len(),
            x0.dims().first()
        );
    }
    if let Some(s) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        value_error!("sigmas must be positive and finite, got {s}");
    }
    let inv_var: Vec<f64> = sigmas.iter().map(|s| 1.0 / (s * s)).collect();
    let residual = (score_output + (x_noisy - x0)?.broadcast_mul(&per_row(&inv_var, x0)?)?)?;
    let half_var: Vec<f32> = sigmas.iter().map(|s| (0.5 * s * s) as f32).collect();
    let half_var = Tensor::from_vec(half_var, sigmas.len(), x0.device())?.to_dtype(x0.dtype())?;
    Ok((mean_flat(&residual.sqr()?)? * half_var)?)
}

/// f32 data of a tensor, for tests and bindings.
pub fn to_vec_f32(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests;
