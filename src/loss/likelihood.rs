//! The variational bound of a Gaussian diffusion in bits per dimension, in the conventions of
//! OpenAI's improved-diffusion (Nichol & Dhariwal 2021, section 2; Ho et al. 2020, eq. 5):
//!
//! ```text
//! L_vlb = L_0 + L_1 + ... + L_{T-1} + L_T
//! L_0     = -log p(x0 | x1)                        (discretized Gaussian decoder)
//! L_{t}   = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))     for t > 0
//! L_T     = KL(q(x_T | x0) || N(0, I))             (the prior term)
//! ```
//!
//! each averaged over the dimensions of a sample and divided by ln 2. Data are f32, batch-first,
//! `row_len` elements per sample; per-sample results are f64, computed in f64.

use std::f64::consts::{LN_2, PI};

use rayon::prelude::*;

use crate::kernels::{parallel_allowed, PARALLEL_MIN_ELEMENTS};

/// Probabilities are clamped here before taking the log (improved-diffusion's
/// `clamp(min=1e-12)`), so a sharp decoder far from the data costs about 27.6 nats, not Inf.
pub const PROBABILITY_FLOOR: f64 = 1e-12;

/// Slack on the [-1, 1] check of the decoder's data: scaled f32 pixels may round just outside.
pub const DATA_RANGE_TOLERANCE: f64 = 1e-6;

/// KL divergence between two univariate Gaussians, in nats, given means and log variances.
/// Algebraically `0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)² exp(-lv2))`; written with
/// `exp_m1` so that the nearly equal variances of a trained model do not cancel catastrophically.
pub fn normal_kl(mean1: f64, logvar1: f64, mean2: f64, logvar2: f64) -> f64 {
    let log_ratio = logvar1 - logvar2;
    let mean_diff = mean1 - mean2;
    0.5 * (log_ratio.exp_m1() - log_ratio + mean_diff * mean_diff * (-logvar2).exp())
}

/// The tanh approximation of the standard normal CDF that improved-diffusion uses (the same as
/// in the tanh form of GELU): `0.5 (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
pub fn approx_standard_normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + ((2.0 / PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

/// Log-likelihood, in nats, of `x` under a Gaussian with `mean` and `log_scale` (= ln σ =
/// 0.5 · log variance) discretized to `bins` equally spaced levels on [-1, 1] (Ho et al. 2020,
/// eq. 13; 256 levels for 8-bit images). Each level owns the interval of half-width
/// `1/(bins - 1)` around it; the lowest level's interval extends to -∞ and the highest to +∞.
///
/// `x` is meant to lie on the grid. Points at or below `-1 + 1/(bins - 1)` are scored as the
/// lowest level, at or above `1 - 1/(bins - 1)` as the highest; for 256 bins this classifies
/// every grid point as improved-diffusion's `±0.999` thresholds do (they differ only for
/// off-grid x between 0.99608 and 0.999 in magnitude).
///
/// Errors when `bins < 2`.
pub fn discretized_gaussian_log_likelihood(
    x: f64,
    mean: f64,
    log_scale: f64,
    bins: u32,
) -> Result<f64, String> {
    let half_width = bin_half_width(bins)?;
    Ok(discretized_log_likelihood(x, mean, log_scale, half_width))
}

fn bin_half_width(bins: u32) -> Result<f64, String> {
    if bins < 2 {
        return Err(format!(
            "bins must be at least 2 (levels of the data on [-1, 1], 256 for 8-bit images), got {bins}"
        ));
    }
    Ok(1.0 / f64::from(bins - 1))
}

/// Ho et al. 2020, eq. 13, with improved-diffusion's approximate CDF and clamping.
fn discretized_log_likelihood(x: f64, mean: f64, log_scale: f64, half_width: f64) -> f64 {
    let inv_stdv = (-log_scale).exp();
    let upper = inv_stdv * (x - mean + half_width);
    let lower = inv_stdv * (x - mean - half_width);
    let probability = if x <= -1.0 + half_width {
        approx_standard_normal_cdf(upper)
    } else if x >= 1.0 - half_width {
        // 1 - Φ(lower) = Φ(-lower): the approximation is odd-symmetric, and this form keeps
        // the digits that 1 - Φ loses in the upper tail.
        approx_standard_normal_cdf(-lower)
    } else if lower > 0.0 {
        approx_standard_normal_cdf(-lower) - approx_standard_normal_cdf(-upper)
    } else {
        approx_standard_normal_cdf(upper) - approx_standard_normal_cdf(lower)
    };
    // clamp, unlike max, keeps a NaN from the model a NaN.
    probability.clamp(PROBABILITY_FLOOR, 1.0).ln()
}

/// Per-sample coefficients of one VLB term: the sample's timestep and its true posterior
/// q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7), as improved-diffusion tabulates them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VbRow {
    /// 0-based timestep; t = 0 selects the decoder term.
    pub t: usize,
    /// `β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t)`, the weight of x0 in the posterior mean.
    pub posterior_mean_coef1: f64,
    /// `(1 - ᾱ_{t-1}) sqrt(α_t) / (1 - ᾱ_t)`, the weight of x_t in the posterior mean.
    pub posterior_mean_coef2: f64,
    /// `ln β̃_t`, with index 0 replaced by index 1 (improved-diffusion's clipping).
    pub posterior_log_variance_clipped: f64,
}

/// One VLB term per sample, in bits per dimension (improved-diffusion's `_vb_terms_bpd`).
///
/// - `x0`, `x_t`: the clean data and the noised sample, `rows.len() · row_len` elements each.
/// - `rows`: per sample, the timestep and posterior coefficients.
/// - `model_mean`, `model_log_variance`: the model's p(x_{t-1} | x_t), per element (a model
///   with a fixed variance repeats the row's value).
/// - `bins`: levels of the data for the decoder term (256 for 8-bit images).
///
/// For t > 0 the term is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); for t = 0 it is the
/// decoder's negative log-likelihood of x0, which must then lie in [-1, 1]. An empty batch
/// (no rows) gives an empty result whatever `row_len`.
pub fn vb_terms_bpd(
    x0: &[f32],
    x_t: &[f32],
    row_len: usize,
    rows: &[VbRow],
    model_mean: &[f32],
    model_log_variance: &[f32],
    bins: u32,
) -> Result<Vec<f64>, String> {
    let len = batch_len(rows.len(), row_len)?;
    for (name, array) in [
        ("x0", x0),
        ("x_t", x_t),
        ("model_mean", model_mean),
        ("model_log_variance", model_log_variance),
    ] {
        if array.len() != len {
            return Err(format!(
                "{name} has {} elements but rows ({}) × row_len ({row_len}) = {len}",
                array.len(),
                rows.len()
            ));
        }
    }
    let half_width = bin_half_width(bins)?;
    for (b, row) in rows.iter().enumerate() {
        for (field, value) in [
            ("posterior_mean_coef1", row.posterior_mean_coef1),
            ("posterior_mean_coef2", row.posterior_mean_coef2),
            (
                "posterior_log_variance_clipped",
                row.posterior_log_variance_clipped,
            ),
        ] {
            if !value.is_finite() {
                return Err(format!("rows[{b}].{field} must be finite, got {value}"));
            }
        }
        if row.t == 0 {
            let data = &x0[b * row_len..(b + 1) * row_len];
            let bound = 1.0 + DATA_RANGE_TOLERANCE;
            if let Some(i) = data
                .iter()
                .position(|&v| f64::from(v).is_nan() || f64::from(v).abs() > bound)
            {
                return Err(format!(
                    "x0 must lie in [-1, 1] for the decoder term (t = 0), got {} at sample {b}, element {i}",
                    data[i]
                ));
            }
        }
    }

    let term = |b: usize| -> f64 {
        let row = &rows[b];
        let span = b * row_len..(b + 1) * row_len;
        let (x0, x_t) = (&x0[span.clone()], &x_t[span.clone()]);
        let (mean, log_variance) = (&model_mean[span.clone()], &model_log_variance[span]);
        let nats: f64 = if row.t == 0 {
            x0.iter()
                .zip(mean.iter().zip(log_variance))
                .map(|(&x, (&m, &lv))| {
                    -discretized_log_likelihood(
                        f64::from(x),
                        f64::from(m),
                        0.5 * f64::from(lv),
                        half_width,
                    )
                })
                .sum()
        } else {
            // Ho et al. 2020, eq. 7: the posterior mean. The variance terms of `normal_kl` are
            // recomputed only when the log variance changes (it is one value per row for fixed
            // variances); the arithmetic is `normal_kl`'s, so the result is identical.
            let lq = row.posterior_log_variance_clipped;
            let (mut cached_lv, mut variance_part, mut inv_var) = (f64::NAN, 0.0, 0.0);
            let mut sum = 0.0;
            for ((&x, &xt), (&m, &lv)) in x0.iter().zip(x_t).zip(mean.iter().zip(log_variance)) {
                let lv = f64::from(lv);
                if lv.to_bits() != cached_lv.to_bits() {
                    cached_lv = lv;
                    let log_ratio = lq - lv;
                    variance_part = log_ratio.exp_m1() - log_ratio;
                    inv_var = (-lv).exp();
                }
                let true_mean = row.posterior_mean_coef1 * f64::from(x)
                    + row.posterior_mean_coef2 * f64::from(xt);
                let mean_diff = true_mean - f64::from(m);
                sum += 0.5 * (variance_part + mean_diff * mean_diff * inv_var);
            }
            sum
        };
        nats / row_len as f64 / LN_2
    };
    Ok(map_rows(rows.len(), len, term))
}

/// The prior term L_T = KL(q(x_T | x0) || N(0, I)) per sample, in bits per dimension: q(x_T | x0)
/// has mean `sqrt(ᾱ_T) x0` and variance `1 - ᾱ_T` (Ho et al. 2020, eq. 4). `alpha_bar_last` is
/// ᾱ at the last timestep, in [0, 1) (0 for a zero-terminal-SNR schedule, where the term is 0).
/// An empty `x0` gives an empty result whatever `row_len`.
pub fn prior_bpd(x0: &[f32], row_len: usize, alpha_bar_last: f64) -> Result<Vec<f64>, String> {
    if row_len == 0 {
        if x0.is_empty() {
            return Ok(Vec::new());
        }
        return Err(format!(
            "row_len must be positive when x0 is not empty, got 0 with {} elements",
            x0.len()
        ));
    }
    if !x0.len().is_multiple_of(row_len) {
        return Err(format!(
            "x0 has {} elements, not a multiple of row_len ({row_len})",
            x0.len()
        ));
    }
    if !(0.0..1.0).contains(&alpha_bar_last) {
        return Err(format!(
            "alpha_bar_last must lie in [0, 1) (ᾱ at the last timestep), got {alpha_bar_last}"
        ));
    }
    let mean_scale = alpha_bar_last.sqrt();
    let log_variance = (-alpha_bar_last).ln_1p();
    let n_rows = x0.len() / row_len;
    let term = |b: usize| -> f64 {
        let nats: f64 = x0[b * row_len..(b + 1) * row_len]
            .iter()
            .map(|&x| normal_kl(mean_scale * f64::from(x), log_variance, 0.0, 0.0))
            .sum();
        nats / row_len as f64 / LN_2
    };
    Ok(map_rows(n_rows, x0.len(), term))
}

/// Elements of a batch of `n_rows` rows; row_len may be 0 only for an empty batch.
fn batch_len(n_rows: usize, row_len: usize) -> Result<usize, String> {
    if row_len == 0 && n_rows > 0 {
        return Err(format!(
            "row_len must be positive when there are samples, got 0 with {n_rows} rows"
        ));
    }
    n_rows
        .checked_mul(row_len)
        .ok_or_else(|| format!("rows ({n_rows}) × row_len ({row_len}) overflows the address space"))
}

/// `f(b)` for every row, on the rayon pool when the batch is large enough to pay for it.
fn map_rows(n_rows: usize, elements: usize, f: impl Fn(usize) -> f64 + Sync + Send) -> Vec<f64> {
    if elements < PARALLEL_MIN_ELEMENTS || !parallel_allowed() {
        (0..n_rows).map(f).collect()
    } else {
        (0..n_rows).into_par_iter().map(f).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-300),
            "got {got}, want {want} (relative tolerance {rel})"
        );
    }

    fn linear_alphas_cumprod(t_max: usize) -> Vec<f64> {
        let (start, end) = (1e-4, 0.02);
        let mut product = 1.0;
        (0..t_max)
            .map(|i| {
                let beta = start + (end - start) * i as f64 / (t_max - 1) as f64;
                product *= 1.0 - beta;
                product
            })
            .collect()
    }

    /// improved-diffusion's decoder with its literal ±0.999 thresholds and 1/255 half-width.
    fn openai_decoder_256(x: f64, mean: f64, log_scale: f64) -> f64 {
        let inv = (-log_scale).exp();
        let cdf_plus = approx_standard_normal_cdf(inv * (x - mean + 1.0 / 255.0));
        let cdf_min = approx_standard_normal_cdf(inv * (x - mean - 1.0 / 255.0));
        if x < -0.999 {
            cdf_plus.max(1e-12).ln()
        } else if x > 0.999 {
            (1.0 - cdf_min).max(1e-12).ln()
        } else {
            (cdf_plus - cdf_min).max(1e-12).ln()
        }
    }

    #[test]
    fn test_normal_kl_golden_values() {
        assert_close(normal_kl(1.0, 0.0, 0.0, 0.0), 0.5, 1e-15);
        assert_close(normal_kl(0.0, 4f64.ln(), 0.0, 0.0), 0.8068528, 1e-7);
        assert_eq!(normal_kl(0.3, -1.7, 0.3, -1.7), 0.0);
    }

    #[test]
    fn test_normal_kl_matches_textbook_form() {
        for &(m1, lv1, m2, lv2) in &[
            (0.2, -3.0, -0.4, -2.5),
            (1.5, 0.7, 0.1, -0.3),
            (-2.0, -8.0, -1.9, -8.1),
        ] {
            let textbook = 0.5
                * (-1.0 + lv2 - lv1 + f64::exp(lv1 - lv2) + (m1 - m2) * (m1 - m2) * f64::exp(-lv2));
            assert_close(normal_kl(m1, lv1, m2, lv2), textbook, 1e-12);
        }
    }

    #[test]
    fn test_normal_kl_gradient_in_model_mean_vanishes_at_true_mean() {
        let h = 1e-5;
        let derivative =
            (normal_kl(0.4, -2.0, 0.4 + h, -1.5) - normal_kl(0.4, -2.0, 0.4 - h, -1.5)) / (2.0 * h);
        assert!(derivative.abs() < 1e-9, "{derivative}");
        // d/dm2 of (m1 - m2)² exp(-lv2) / 2 is -(m1 - m2) exp(-lv2).
        let derivative =
            (normal_kl(0.4, -2.0, 0.1 + h, -1.5) - normal_kl(0.4, -2.0, 0.1 - h, -1.5)) / (2.0 * h);
        assert_close(derivative, -(0.4 - 0.1) * 1.5f64.exp(), 1e-8);
    }

    #[test]
    fn test_approx_cdf_golden_value_and_symmetry() {
        assert_close(approx_standard_normal_cdf(2.0), 0.97729885, 1e-8);
        assert_eq!(approx_standard_normal_cdf(0.0), 0.5);
        for &x in &[0.1, 1.3, 4.0] {
            let sum = approx_standard_normal_cdf(x) + approx_standard_normal_cdf(-x);
            assert!((sum - 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn test_discretized_log_likelihood_golden_values_256_bins() {
        for &(x, mean, sigma, want) in &[
            (0.0, 0.0, 0.01, -1.187371),
            (1.0, 0.9, 0.1, -1.780969),
            (-1.0, -1.0, 0.05, -0.632509),
            (0.5, 0.0, 1.0, -5.892573),
        ] {
            let got = discretized_gaussian_log_likelihood(x, mean, f64::ln(sigma), 256).unwrap();
            assert_close(got, want, 1e-6);
        }
    }

    #[test]
    fn test_discretized_thresholds_match_openai_on_every_256_grid_point() {
        for k in 0..256 {
            // Data arrive as f32.
            let x = f64::from((-1.0 + 2.0 * k as f64 / 255.0) as f32);
            for &(mean, log_scale) in &[(0.0, -2.0), (x + 0.003, -5.0), (-0.98, -4.0), (0.99, -3.0)]
            {
                let ours = discretized_gaussian_log_likelihood(x, mean, log_scale, 256).unwrap();
                let theirs = openai_decoder_256(x, mean, log_scale);
                // Compared as probabilities: in the upper tail the reference's Φ(u) - Φ(l)
                // cancels and is only accurate to about 1e-16 absolute.
                let (p_ours, p_theirs) = (ours.exp(), theirs.exp());
                assert!(
                    (p_ours - p_theirs).abs() <= 1e-14 + 1e-12 * p_theirs,
                    "grid point {k} (x = {x}), mean {mean}: {ours} vs {theirs}"
                );
            }
        }
    }

    #[test]
    fn test_discretized_probabilities_sum_to_one_over_the_grid() {
        for &bins in &[2u32, 3, 5, 256] {
            for &(mean, log_scale) in &[(0.0, -1.0), (0.37, -3.0), (-0.8, 0.5)] {
                let total: f64 = (0..bins)
                    .map(|k| {
                        let x = -1.0 + 2.0 * f64::from(k) / f64::from(bins - 1);
                        discretized_gaussian_log_likelihood(x, mean, log_scale, bins)
                            .unwrap()
                            .exp()
                    })
                    .sum();
                // Bins far in a tail are floored at 1e-12 each.
                assert!(
                    (total - 1.0).abs() < 1e-12 * f64::from(bins) + 1e-14,
                    "bins {bins}, mean {mean}: {total}"
                );
            }
        }
    }

    #[test]
    fn test_discretized_far_from_data_is_clamped_not_infinite() {
        let got = discretized_gaussian_log_likelihood(1.0, -1.0, -10.0, 256).unwrap();
        assert_close(got, PROBABILITY_FLOOR.ln(), 1e-12);
        let got = discretized_gaussian_log_likelihood(0.0, 0.9, -10.0, 256).unwrap();
        assert_close(got, PROBABILITY_FLOOR.ln(), 1e-12);
    }

    #[test]
    fn test_discretized_off_grid_points_use_the_half_width_thresholds() {
        // 256 bins: -0.998 lies between -1 + 1/255 and improved-diffusion's -0.999.
        let (mean, log_scale): (f64, f64) = (-0.99, -5.0);
        let lowest = approx_standard_normal_cdf((-0.998 - mean + 1.0 / 255.0) * (-log_scale).exp());
        let got = discretized_gaussian_log_likelihood(-0.998, mean, log_scale, 256).unwrap();
        assert_close(got, lowest.ln(), 1e-12);
        let highest =
            approx_standard_normal_cdf(-(0.998 + mean - 1.0 / 255.0) * (-log_scale).exp());
        let got = discretized_gaussian_log_likelihood(0.998, -mean, log_scale, 256).unwrap();
        assert_close(got, highest.ln(), 1e-12);
        // 2 bins: every point belongs to one of the two levels; the midpoint to the lower.
        let two_bins = |x: f64| discretized_gaussian_log_likelihood(x, 0.3, 0.0, 2).unwrap();
        assert_close(two_bins(-0.2), approx_standard_normal_cdf(0.5).ln(), 1e-12);
        assert_close(two_bins(0.0), approx_standard_normal_cdf(0.7).ln(), 1e-12);
        assert_close(two_bins(0.2), approx_standard_normal_cdf(1.1).ln(), 1e-12);
    }

    #[test]
    fn test_discretized_upper_tail_is_as_accurate_as_the_lower_tail() {
        // The grid is symmetric, so mirroring x and the mean must give the same likelihood; a
        // naive Φ(upper) - Φ(lower) loses 8 digits at the first point, a probability of 7.5e-9.
        for &(x, mean, log_scale) in &[(0.5, 0.4, -4.0), (0.2, 0.13, -4.0), (-0.6, -0.48, -3.5)] {
            let direct = discretized_gaussian_log_likelihood(x, mean, log_scale, 256).unwrap();
            let mirrored = discretized_gaussian_log_likelihood(-x, -mean, log_scale, 256).unwrap();
            assert!(direct > PROBABILITY_FLOOR.ln() + 1.0, "{direct}");
            assert!(
                (direct - mirrored).abs() <= 1e-14 * direct.abs(),
                "{direct} vs {mirrored}"
            );
        }
    }

    #[test]
    fn test_discretized_propagates_nan_from_the_model() {
        assert!(
            discretized_gaussian_log_likelihood(0.0, f64::NAN, -3.0, 256)
                .unwrap()
                .is_nan()
        );
        assert!(discretized_gaussian_log_likelihood(1.0, 0.0, f64::NAN, 256)
            .unwrap()
            .is_nan());
        let nan_mean = [f32::NAN, 0.0];
        let zeros = [0f32; 2];
        let row = VbRow {
            t: 0,
            posterior_mean_coef1: 1.0,
            posterior_mean_coef2: 0.0,
            posterior_log_variance_clipped: -9.0,
        };
        let bpd = vb_terms_bpd(&zeros, &zeros, 2, &[row], &nan_mean, &zeros, 256).unwrap();
        assert!(bpd[0].is_nan());
    }

    #[test]
    fn test_discretized_rejects_fewer_than_two_bins() {
        for bins in [0, 1] {
            let err = discretized_gaussian_log_likelihood(0.0, 0.0, 0.0, bins).unwrap_err();
            assert!(
                err.contains("bins") && err.contains(&format!("got {bins}")),
                "{err}"
            );
        }
    }

    #[test]
    fn test_prior_bpd_golden_linear_schedule() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let last = alphas_cumprod[999];
        assert_close(last, 4.03583e-5, 1e-5);
        let bpd = prior_bpd(&[1.0; 6], 3, last).unwrap();
        assert_eq!(bpd.len(), 2);
        for value in bpd {
            assert_close(value, 2.9113e-5, 1e-4);
        }
    }

    #[test]
    fn test_prior_bpd_is_zero_for_zero_terminal_snr_and_averages_dims() {
        assert_eq!(prior_bpd(&[0.7, -0.2], 2, 0.0).unwrap(), vec![0.0]);
        let a: f64 = 0.01;
        let row = [0.5f32, -1.0, 0.25];
        let want: f64 = row
            .iter()
            .map(|&x| normal_kl(a.sqrt() * f64::from(x), (1.0 - a).ln(), 0.0, 0.0))
            .sum::<f64>()
            / 3.0
            / LN_2;
        assert_close(prior_bpd(&row, 3, a).unwrap()[0], want, 1e-12);
    }

    #[test]
    fn test_prior_bpd_rejects_bad_arguments() {
        let err = prior_bpd(&[0.0; 4], 0, 0.5).unwrap_err();
        assert_eq!(
            err,
            "row_len must be positive when x0 is not empty, got 0 with 4 elements"
        );
        assert_eq!(prior_bpd(&[], 0, 0.5).unwrap(), Vec::<f64>::new());
        assert_eq!(prior_bpd(&[], 3, 0.5).unwrap(), Vec::<f64>::new());
        assert!(prior_bpd(&[0.0; 5], 2, 0.5)
            .unwrap_err()
            .contains("multiple of row_len (2)"));
        let err = prior_bpd(&[0.0; 4], 2, 1.0).unwrap_err();
        assert!(
            err.contains("alpha_bar_last") && err.contains("got 1"),
            "{err}"
        );
        assert!(prior_bpd(&[0.0; 4], 2, f64::NAN).is_err());
    }

    /// Posterior rows of the linear schedule, as improved-diffusion tabulates them.
    fn posterior_row(alphas_cumprod: &[f64], t: usize) -> VbRow {
        let variance = |t: usize| {
            let previous = if t == 0 { 1.0 } else { alphas_cumprod[t - 1] };
            let beta = 1.0 - alphas_cumprod[t] / previous;
            beta * (1.0 - previous) / (1.0 - alphas_cumprod[t])
        };
        let previous = if t == 0 { 1.0 } else { alphas_cumprod[t - 1] };
        let alpha = alphas_cumprod[t] / previous;
        let beta = 1.0 - alpha;
        VbRow {
            t,
            posterior_mean_coef1: beta * previous.sqrt() / (1.0 - alphas_cumprod[t]),
            posterior_mean_coef2: (1.0 - previous) * alpha.sqrt() / (1.0 - alphas_cumprod[t]),
            posterior_log_variance_clipped: variance(if t == 0 { 1 } else { t }).ln(),
        }
    }

    #[test]
    fn test_vb_terms_zero_when_model_equals_true_posterior() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let rows = [
            posterior_row(&alphas_cumprod, 10),
            posterior_row(&alphas_cumprod, 700),
        ];
        let x0 = [0.5f32, -0.25, 1.0, 0.0, -1.0, 0.75];
        let x_t = [0.1f32, 0.9, -0.3, 1.2, -0.7, 0.05];
        let mut mean = [0f32; 6];
        let mut log_variance = [0f32; 6];
        for (b, row) in rows.iter().enumerate() {
            for i in 3 * b..3 * b + 3 {
                mean[i] = (row.posterior_mean_coef1 * f64::from(x0[i])
                    + row.posterior_mean_coef2 * f64::from(x_t[i]))
                    as f32;
                log_variance[i] = row.posterior_log_variance_clipped as f32;
            }
        }
        let bpd = vb_terms_bpd(&x0, &x_t, 3, &rows, &mean, &log_variance, 256).unwrap();
        // Only f32 rounding of the model's outputs remains.
        for value in bpd {
            assert!(value.abs() < 1e-6, "{value}");
        }
    }

    #[test]
    fn test_vb_terms_kl_term_matches_hand_computation() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let row = posterior_row(&alphas_cumprod, 500);
        let x0 = [0.5f32, -0.25];
        let x_t = [0.3f32, -1.1];
        let mean = [0.2f32, -0.6];
        let log_variance = [-4.0f32, -5.5];
        let want: f64 = (0..2)
            .map(|i| {
                let true_mean = row.posterior_mean_coef1 * f64::from(x0[i])
                    + row.posterior_mean_coef2 * f64::from(x_t[i]);
                normal_kl(
                    true_mean,
                    row.posterior_log_variance_clipped,
                    f64::from(mean[i]),
                    f64::from(log_variance[i]),
                )
            })
            .sum::<f64>()
            / 2.0
            / LN_2;
        let got = vb_terms_bpd(&x0, &x_t, 2, &[row], &mean, &log_variance, 256).unwrap();
        assert_close(got[0], want, 1e-14);
        assert!(got[0] > 0.0);
    }

    #[test]
    fn test_vb_terms_decoder_term_uses_golden_likelihoods() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let row = posterior_row(&alphas_cumprod, 0);
        // The four golden cases, as one sample of four dimensions; σ given as log variance 2 ln σ.
        let x0 = [0.0f32, 1.0, -1.0, 0.5];
        let mean = [0.0f32, 0.9, -1.0, 0.0];
        let log_variance = [0.01f32, 0.1, 0.05, 1.0].map(|s: f32| 2.0 * s.ln());
        let x_t = [9.0f32; 4]; // unused by the decoder term
        let got = vb_terms_bpd(&x0, &x_t, 4, &[row], &mean, &log_variance, 256).unwrap();
        let want = (1.187371 + 1.780969 + 0.632509 + 5.892573) / 4.0 / LN_2;
        assert_close(got[0], want, 1e-6);
    }

    #[test]
    fn test_vb_terms_rejects_out_of_range_data_only_for_decoder_rows() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let x0 = [0.0f32, 1.5];
        let zeros = [0f32; 2];
        let err = vb_terms_bpd(
            &x0,
            &zeros,
            2,
            &[posterior_row(&alphas_cumprod, 0)],
            &zeros,
            &zeros,
            256,
        )
        .unwrap_err();
        assert!(
            err.contains("x0") && err.contains("1.5") && err.contains("element 1"),
            "{err}"
        );
        let nan = [f32::NAN, 0.0];
        assert!(vb_terms_bpd(
            &nan,
            &zeros,
            2,
            &[posterior_row(&alphas_cumprod, 0)],
            &zeros,
            &zeros,
            256
        )
        .is_err());
        // Just outside by rounding is accepted.
        let edge = [1.0000005f32, -1.0000005];
        assert!(vb_terms_bpd(
            &edge,
            &zeros,
            2,
            &[posterior_row(&alphas_cumprod, 0)],
            &zeros,
            &zeros,
            256
        )
        .is_ok());
        // KL terms do not need data in range.
        assert!(vb_terms_bpd(
            &x0,
            &zeros,
            2,
            &[posterior_row(&alphas_cumprod, 3)],
            &zeros,
            &zeros,
            256
        )
        .is_ok());
    }

    #[test]
    fn test_vb_terms_rejects_mismatched_lengths_and_bad_rows() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let rows = [posterior_row(&alphas_cumprod, 4); 2];
        let good = [0f32; 6];
        let short = [0f32; 5];
        let err = vb_terms_bpd(&good, &good, 3, &rows, &short, &good, 256).unwrap_err();
        assert_eq!(
            err,
            "model_mean has 5 elements but rows (2) × row_len (3) = 6"
        );
        let err = vb_terms_bpd(&good, &good, 3, &rows, &good, &short, 256).unwrap_err();
        assert!(err.starts_with("model_log_variance has 5"), "{err}");
        let err = vb_terms_bpd(&short, &good, 3, &rows, &good, &good, 256).unwrap_err();
        assert!(err.starts_with("x0 has 5"), "{err}");
        let err = vb_terms_bpd(&good, &good, 0, &rows, &good, &good, 256).unwrap_err();
        assert_eq!(
            err,
            "row_len must be positive when there are samples, got 0 with 2 rows"
        );
        let empty = vb_terms_bpd(&[], &[], 0, &[], &[], &[], 256).unwrap();
        assert_eq!(empty, Vec::<f64>::new());
        assert!(vb_terms_bpd(&good, &good, 3, &rows, &good, &good, 1)
            .unwrap_err()
            .contains("bins"));
        let mut bad = rows;
        bad[1].posterior_log_variance_clipped = f64::NEG_INFINITY;
        let err = vb_terms_bpd(&good, &good, 3, &bad, &good, &good, 256).unwrap_err();
        assert!(
            err.contains("rows[1].posterior_log_variance_clipped"),
            "{err}"
        );
    }

    #[test]
    fn test_vb_terms_parallel_path_matches_serial_rows() {
        let alphas_cumprod = linear_alphas_cumprod(1000);
        let row_len = 3 * 32 * 32;
        let n_rows = 16; // 49152 elements: above PARALLEL_MIN_ELEMENTS
        assert!(n_rows * row_len >= PARALLEL_MIN_ELEMENTS);
        let rows: Vec<VbRow> = (0..n_rows)
            .map(|b| posterior_row(&alphas_cumprod, b * 60))
            .collect();
        let value = |i: usize, k: usize| ((i * 7919 + k * 104729) % 255) as f32 / 127.5 - 1.0;
        let x0: Vec<f32> = (0..n_rows * row_len).map(|i| value(i, 1)).collect();
        let x_t: Vec<f32> = (0..n_rows * row_len).map(|i| value(i, 2)).collect();
        let mean: Vec<f32> = (0..n_rows * row_len).map(|i| 0.9 * value(i, 3)).collect();
        let log_variance = vec![-3.0f32; n_rows * row_len];
        let all = vb_terms_bpd(&x0, &x_t, row_len, &rows, &mean, &log_variance, 256).unwrap();
        for b in 0..n_rows {
            let span = b * row_len..(b + 1) * row_len;
            let one = vb_terms_bpd(
                &x0[span.clone()],
                &x_t[span.clone()],
                row_len,
                &rows[b..b + 1],
                &mean[span.clone()],
                &log_variance[span],
                256,
            )
            .unwrap();
            assert_eq!(one[0], all[b]);
        }
    }
}
