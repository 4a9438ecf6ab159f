//! The variational bound of a denoiser in bits per dimension, over every timestep (the
//! `calc_bpd_loop` of Nichol & Dhariwal's code): L = L_T + Σ_{t>0} L_{t-1} + L_0 (Ho et al. 2020,
//! eq. 5), each term averaged over dimensions and converted to bits.

use super::likelihood::{prior_bpd, vb_terms_bpd, VbRow};
use crate::diffusion::{eps_coefficients, x0_coefficients, Prediction};
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::sample::{model_output_layout, Denoiser, LoopHooks, VarianceType};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// Per-sample results of `bits_per_dim`.
#[derive(Clone, Debug, Default)]
pub struct BitsPerDim {
    /// Prior term plus every timestep's term, per sample.
    pub total: Vec<f64>,
    /// KL(q(x_T | x0) || N(0, I)) per sample.
    pub prior: Vec<f64>,
    /// [B, T]: the term of each timestep (t = 0 is the decoder's negative log-likelihood).
    pub terms: Vec<f64>,
    /// [B, T]: mean squared error of the implied ε prediction.
    pub mse: Vec<f64>,
}

/// Settings of `bits_per_dim`.
#[derive(Clone, Copy, Debug)]
pub struct BpdConfig {
    pub prediction: Prediction,
    pub variance: VarianceType,
    /// Levels of the data grid (256 for 8-bit images).
    pub bins: u32,
    /// The noise of timestep t is `randn(seed, stream = t)`.
    pub seed: u64,
    /// Clamp the predicted x0 to [-1, 1] before forming the model's mean.
    pub clip_denoised: bool,
}

/// Evaluates the bound for data `x0` ([B, ...] in [-1, 1]) under `denoiser`.
pub fn bits_per_dim(
    denoiser: &mut dyn Denoiser,
    schedule: &Schedule,
    x0: &[f32],
    shape: &[usize],
    config: BpdConfig,
    hooks: &mut dyn LoopHooks,
) -> Result<BitsPerDim> {
    let n: usize = shape.iter().product();
    if shape.is_empty() || x0.len() != n {
        shape_error!("x0 has {} values but shape {shape:?}", x0.len());
    }
    let batch = shape[0];
    let row_len = n.checked_div(batch).unwrap_or(0);
    if let Some((i, v)) = x0
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || v.abs() > 1.0 + 1e-6)
    {
        value_error!("x0 must lie in [-1, 1] for a discretized likelihood, but element {i} is {v}");
    }
    let t_total = schedule.len();
    let mut out = BitsPerDim {
        total: vec![0.0; batch],
        prior: prior_bpd(x0, row_len, schedule.alphas_cumprod[t_total - 1])
            .map_err(Error::Value)?,
        terms: vec![0.0; batch * t_total],
        mse: vec![0.0; batch * t_total],
    };
    let mut noise = vec![0f32; n];
    let mut x_t = vec![0f32; n];
    let mut mean = vec![0f32; n];
    let mut log_var = vec![0f32; n];
    let mut eps = vec![0f32; n];
    for (step, t) in (0..t_total).rev().enumerate() {
        let abar = schedule.alphas_cumprod[t];
        fill_normal(config.seed, t as u64, 0, &mut noise);
        let (sa, so) = (abar.sqrt(), (1.0 - abar).sqrt());
        for ((xt, &x), &z) in x_t.iter_mut().zip(x0).zip(&noise) {
            *xt = (sa * x as f64 + so * z as f64) as f32;
        }
        let tb = vec![t as i64; batch];
        let model = denoiser.predict(&x_t, shape, &tb)?;
        let (_, stride) = model_output_layout(shape, &model.shape)?;
        let rows = vec![
            VbRow {
                t,
                posterior_mean_coef1: schedule.posterior_mean_coef1[t],
                posterior_mean_coef2: schedule.posterior_mean_coef2[t],
                posterior_log_variance_clipped: schedule.posterior_log_variance_clipped[t],
            };
            batch
        ];
        // The bound's term of this timestep: one pass that the bindings run without the GIL.
        let (mean, log_var, eps, noise, x_t, out) =
            (&mut mean, &mut log_var, &mut eps, &noise, &x_t, &mut out);
        let (model, tb, config) = (&model, &tb, &config);
        hooks.run_pass(&mut || {
            p_mean_log_variance(
                schedule,
                x_t,
                tb,
                &model.data,
                row_len,
                stride,
                config,
                mean,
                log_var,
                eps,
            )?;
            for b in 0..batch {
                let sq: f64 = (b * row_len..(b + 1) * row_len)
                    .map(|i| (eps[i] as f64 - noise[i] as f64).powi(2))
                    .sum();
                out.mse[b * t_total + t] = sq / row_len.max(1) as f64;
            }
            let terms = vb_terms_bpd(x0, x_t, row_len, &rows, mean, log_var, config.bins)
                .map_err(Error::Value)?;
            for (b, v) in terms.into_iter().enumerate() {
                if !v.is_finite() {
                    return Err(Error::NonFinite { timestep: t as i64 });
                }
                out.terms[b * t_total + t] = v;
            }
            Ok(())
        })?;
        hooks.after_step(step, t as i64, x_t, &[])?;
    }
    for b in 0..batch {
        out.total[b] = out.prior[b]
            + out.terms[b * t_total..(b + 1) * t_total]
                .iter()
                .sum::<f64>();
    }
    Ok(out)
}

/// The model's p(x_{t-1} | x_t) per element: mean (from the predicted x0, clipped if asked,
/// through the posterior mean, DDPM eq. 7), log variance (fixed_small, fixed_large or
/// learned_range) and the implied ε. `t` has one entry per row; `stride` is the model output's
/// row length (2 · row_len with a variance half).
#[allow(clippy::too_many_arguments)]
pub fn p_mean_log_variance(
    schedule: &Schedule,
    x_t: &[f32],
    t: &[i64],
    model_output: &[f32],
    row_len: usize,
    stride: usize,
    config: &BpdConfig,
    mean: &mut [f32],
    log_var: &mut [f32],
    eps: &mut [f32],
) -> Result<()> {
    if config.variance == VarianceType::LearnedRange && stride == row_len {
        shape_error!("variance='learned_range' needs a model output with twice the channels of x");
    }
    let t_total = schedule.len();
    let idx: Vec<usize> = t
        .iter()
        .map(|&tb| schedule.check_timestep(tb))
        .collect::<Result<_>>()?;
    let row = |b: usize, mean: &mut [f32], log_var: &mut [f32], eps: &mut [f32]| {
        let t = idx[b];
        let abar = schedule.alphas_cumprod[t];
        let (ax, am) = x0_coefficients(config.prediction, abar);
        let (ex, em) = eps_coefficients(config.prediction, abar);
        let (c1, c2) = (
            schedule.posterior_mean_coef1[t],
            schedule.posterior_mean_coef2[t],
        );
        let min_log = schedule.posterior_log_variance_clipped[t];
        let max_log = schedule.betas[t].ln();
        // OpenAI's fixed_large uses β̃_1 at t = 0 (β_0 would make the decoder too sharp).
        let fixed_large_log = if t == 0 && t_total > 1 {
            schedule.posterior_variance[1].ln()
        } else {
            max_log
        };
        for j in 0..row_len {
            let i = b * row_len + j;
            let mi = b * stride + j;
            let (x, m) = (x_t[i] as f64, model_output[mi] as f64);
            let mut x0_pred = ax * x + am * m;
            if config.clip_denoised {
                x0_pred = x0_pred.clamp(-1.0, 1.0);
            }
            mean[j] = (c1 * x0_pred + c2 * x) as f32;
            eps[j] = (ex * x + em * m) as f32;
            log_var[j] = match config.variance {
                VarianceType::FixedSmall => min_log,
                VarianceType::FixedLarge => fixed_large_log,
                VarianceType::LearnedRange => {
                    let frac = (model_output[mi + row_len] as f64 + 1.0) / 2.0;
                    frac * max_log + (1.0 - frac) * min_log
                }
            } as f32;
        }
    };
    if row_len == 0 {
        return Ok(());
    }
    if idx.len() * row_len < crate::kernels::PARALLEL_MIN_ELEMENTS
        || !crate::kernels::parallel_allowed()
    {
        mean.chunks_mut(row_len)
            .zip(log_var.chunks_mut(row_len))
            .zip(eps.chunks_mut(row_len))
            .enumerate()
            .for_each(|(b, ((m, l), e))| row(b, m, l, e));
    } else {
        use rayon::prelude::*;
        mean.par_chunks_mut(row_len)
            .zip(log_var.par_chunks_mut(row_len))
            .zip(eps.par_chunks_mut(row_len))
            .enumerate()
            .for_each(|(b, ((m, l), e))| row(b, m, l, e));
    }
    Ok(())
}

/// The bound's term at each row's timestep in bits/dim (see `likelihood::vb_terms_bpd`),
/// straight from the model output. Rows with a fixed variance and t > 0 take one fused pass:
/// the posterior means differ only through x0, so the mean gap is coef1 · (x0 - x̂0) and the
/// variance terms are one value per row. Decoder rows (t = 0) and learned variances go through
/// `p_mean_log_variance` and `likelihood::vb_terms_bpd` row by row.
#[allow(clippy::too_many_arguments)]
pub fn vb_terms_from_output(
    schedule: &Schedule,
    x0: &[f32],
    x_t: &[f32],
    t: &[i64],
    model_output: &[f32],
    row_len: usize,
    stride: usize,
    config: &BpdConfig,
) -> Result<Vec<f64>> {
    if x0.len() != t.len() * row_len
        || x_t.len() != x0.len()
        || model_output.len() != t.len() * stride
    {
        shape_error!(
            "x0, x_t and model_output do not fit {} rows of {row_len} elements",
            t.len()
        );
    }
    let idx: Vec<usize> = t
        .iter()
        .map(|&tb| schedule.check_timestep(tb))
        .collect::<Result<_>>()?;
    let row = |b: usize| -> Result<f64> {
        let ti = idx[b];
        let span = b * row_len..(b + 1) * row_len;
        let model = &model_output[b * stride..(b + 1) * stride];
        if ti == 0 || config.variance == VarianceType::LearnedRange {
            let (mut mean, mut log_var, mut eps) = (
                vec![0f32; row_len],
                vec![0f32; row_len],
                vec![0f32; row_len],
            );
            p_mean_log_variance(
                schedule,
                &x_t[span.clone()],
                &t[b..b + 1],
                model,
                row_len,
                stride,
                config,
                &mut mean,
                &mut log_var,
                &mut eps,
            )?;
            let vb_row = VbRow {
                t: ti,
                posterior_mean_coef1: schedule.posterior_mean_coef1[ti],
                posterior_mean_coef2: schedule.posterior_mean_coef2[ti],
                posterior_log_variance_clipped: schedule.posterior_log_variance_clipped[ti],
            };
            let r = vb_terms_bpd(
                &x0[span.clone()],
                &x_t[span],
                row_len,
                &[vb_row],
                &mean,
                &log_var,
                config.bins,
            );
            return r.map(|v| v[0]).map_err(Error::Value);
        }
        let abar = schedule.alphas_cumprod[ti];
        let (ax, am) = x0_coefficients(config.prediction, abar);
        let c1 = schedule.posterior_mean_coef1[ti];
        let lq = schedule.posterior_log_variance_clipped[ti];
        // t > 0 here, so fixed_large is plain log β_t (its t = 0 exception is a decoder row).
        let lv = match config.variance {
            VarianceType::FixedSmall => lq,
            _ => schedule.betas[ti].ln(),
        };
        // normal_kl(μq, lq, μp, lv) = ½ (expm1(lq - lv) - (lq - lv) + (μq - μp)² e^{-lv}).
        let log_ratio = lq - lv;
        let variance_part = log_ratio.exp_m1() - log_ratio;
        let scale = c1 * c1 * (-lv).exp();
        let mut sq = 0.0;
        for ((&x, &xs), &m) in x0[span.clone()]
            .iter()
            .zip(&x_t[span])
            .zip(&model[..row_len])
        {
            let mut x0_pred = ax * xs as f64 + am * m as f64;
            if config.clip_denoised {
                x0_pred = x0_pred.clamp(-1.0, 1.0);
            }
            let d = x as f64 - x0_pred;
            sq += d * d;
        }
        let nats = 0.5 * (variance_part + scale * sq / row_len.max(1) as f64);
        Ok(nats / std::f64::consts::LN_2)
    };
    if t.len() * row_len < crate::kernels::PARALLEL_MIN_ELEMENTS
        || !crate::kernels::parallel_allowed()
    {
        (0..t.len()).map(row).collect()
    } else {
        use rayon::prelude::*;
        (0..t.len()).into_par_iter().map(row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_vb_terms_equal_the_general_path_for_every_variance_type() {
        let s = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
        let (b, l) = (5usize, 6usize);
        let t = [0i64, 1, 10, 600, 999];
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let x0: Vec<f32> = (0..b * l)
            .map(|_| (next() * 127.5).round() / 127.5)
            .collect();
        let x_t: Vec<f32> = (0..b * l).map(|_| next() * 2.0).collect();
        let out: Vec<f32> = (0..2 * b * l).map(|_| next() * 0.9).collect();
        for variance in [
            VarianceType::FixedSmall,
            VarianceType::FixedLarge,
            VarianceType::LearnedRange,
        ] {
            for clip_denoised in [true, false] {
                let config = BpdConfig {
                    prediction: Prediction::Epsilon,
                    variance,
                    bins: 256,
                    seed: 0,
                    clip_denoised,
                };
                let fused =
                    vb_terms_from_output(&s, &x0, &x_t, &t, &out, l, 2 * l, &config).unwrap();
                let n = b * l;
                let (mut mean, mut lv, mut eps) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                p_mean_log_variance(
                    &s,
                    &x_t,
                    &t,
                    &out,
                    l,
                    2 * l,
                    &config,
                    &mut mean,
                    &mut lv,
                    &mut eps,
                )
                .unwrap();
                let rows: Vec<VbRow> = t
                    .iter()
                    .map(|&ti| VbRow {
                        t: ti as usize,
                        posterior_mean_coef1: s.posterior_mean_coef1[ti as usize],
                        posterior_mean_coef2: s.posterior_mean_coef2[ti as usize],
                        posterior_log_variance_clipped: s.posterior_log_variance_clipped
                            [ti as usize],
                    })
                    .collect();
                let general = vb_terms_bpd(&x0, &x_t, l, &rows, &mean, &lv, 256).unwrap();
                for (f, g) in fused.iter().zip(&general) {
                    assert!(
                        (f - g).abs() <= 1e-4 * g.abs() + 1e-9,
                        "{variance:?} clip={clip_denoised}: {f} vs {g}"
                    );
                }
            }
        }
    }
}
