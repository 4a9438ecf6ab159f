//! Score-based sampling and training: stochastic gradient Langevin dynamics (Welling & Teh 2011),
//! annealed Langevin dynamics over a σ ladder (Song & Ermon 2019, NCSN Algorithm 1), the
//! denoising score-matching loss over that ladder, and the score ↔ ε conversions.
//!
//! Every iteration is one call of the score plus one fused pass over the data
//! (`x ← x + drift · s + noise_std · z`), split over the rayon pool. The noise z of an iteration
//! is `fill_normal(seed, stream, element index)` with one stream per iteration, so results are
//! identical for any thread count or chunking:
//!
//! - SGLD iteration k uses stream k;
//! - annealed Langevin iteration t of level i uses stream `i · steps_per_level + t`, and its
//!   initial x (when the caller gives none) the stream [`ANNEALED_INIT_STREAM`].

use rayon::prelude::*;

use super::denoiser::LoopHooks;
use crate::error::{Error, Result};
use crate::kernels::{for_each_chunk, parallel_allowed, rng::fill_normal, PARALLEL_MIN_ELEMENTS};
use crate::{shape_error, value_error};

/// NCSN's step size scale ε of α_i = ε (σ_i/σ_L)² (Song & Ermon 2019, section 4.3).
pub const NCSN_EPS: f64 = 2e-5;
/// NCSN's iterations per noise level T (Song & Ermon 2019, section 4.3).
pub const NCSN_STEPS_PER_LEVEL: usize = 100;
/// NCSN's ladder: L = 10 levels, geometric from σ_1 = 1 to σ_L = 0.01 (section 4.3).
pub const NCSN_SIGMA_MAX: f64 = 1.0;
pub const NCSN_SIGMA_MIN: f64 = 0.01;
pub const NCSN_LEVELS: usize = 10;

/// The stream of annealed Langevin's initial x. Iteration streams count up from 0, and
/// `u64::MAX ..= u64::MAX - 2` belong to `randn` and the oracles, so this one is never shared.
pub const ANNEALED_INIT_STREAM: u64 = u64::MAX - 3;

/// A score function ∇log p(x) of the whole batch, returning one value per element of x.
pub type ScoreFn<'a> = dyn FnMut(&[f32]) -> Result<Vec<f32>> + 'a;
/// A noise-conditional score s(x, σ) of the whole batch (NCSN), one value per element of x.
pub type NoiseConditionalScoreFn<'a> = dyn FnMut(&[f32], f64) -> Result<Vec<f32>> + 'a;

/// Noise generated at a time into an L1-resident buffer.
const NOISE_BLOCK: usize = 1024;

// ---------------------------------------------------------------------------------------------
// The fused pass

/// `x ← x + drift · score + noise_std · z` over one chunk whose first element has global index
/// `start`; z from (seed, stream, global index). Returns the global index of the first
/// non-finite result.
fn update_chunk(
    start: usize,
    x: &mut [f32],
    score: &[f32],
    drift: f32,
    noise_std: f32,
    seed: u64,
    stream: u64,
) -> Option<usize> {
    let mut z = [0f32; NOISE_BLOCK];
    let mut first_bad = None;
    for (b, (xb, sb)) in x
        .chunks_mut(NOISE_BLOCK)
        .zip(score.chunks(NOISE_BLOCK))
        .enumerate()
    {
        let offset = start + b * NOISE_BLOCK;
        let z = &mut z[..xb.len()];
        fill_normal(seed, stream, offset as u64, z);
        for ((x, &s), &z) in xb.iter_mut().zip(sb).zip(z.iter()) {
            *x = *x + drift * s + noise_std * z;
        }
        if first_bad.is_none() {
            first_bad = xb.iter().position(|v| !v.is_finite()).map(|i| offset + i);
        }
    }
    first_bad
}

/// One Langevin update `x ← x + drift · score + noise_std · z` in a single pass (parallel when
/// large). Returns the index of the first non-finite element of the new x, if any.
pub fn langevin_update(
    x: &mut [f32],
    score: &[f32],
    drift: f32,
    noise_std: f32,
    seed: u64,
    stream: u64,
) -> Option<usize> {
    debug_assert_eq!(x.len(), score.len());
    for_each_chunk(x, |start, chunk| {
        let s = &score[start..start + chunk.len()];
        update_chunk(start, chunk, s, drift, noise_std, seed, stream)
    })
    .into_iter()
    .flatten()
    .next()
}

fn check_score(score: &[f32], n: usize) -> Result<()> {
    if score.len() != n {
        shape_error!(
            "the score function returned {} values but x has {n} elements",
            score.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SGLD

/// Stochastic gradient Langevin dynamics (Welling & Teh 2011; without minibatch gradients it is
/// the unadjusted Langevin algorithm): `steps` iterations of
/// `x ← x + (δ/2) ∇log p(x) + sqrt(δ) ε` from `x`, with `score(x) = ∇log p(x)`.
///
/// - `x`: the initial iterate, any number of chains laid out batch first (the score sees it whole).
/// - `step_size`: δ > 0. The chain's stationary law is biased by O(δ): for N(μ, s²) its variance
///   is s² / (1 - δ/(4 s²)).
/// - noise of iteration k: `fill_normal(seed, stream = k, element index)`.
///
/// `hooks.after_step(k, k, x, [])` runs after iteration k; the pass runs inside `hooks.run_pass`.
pub fn sgld(
    score: &mut ScoreFn<'_>,
    x: Vec<f32>,
    step_size: f64,
    steps: usize,
    seed: u64,
    hooks: &mut dyn LoopHooks,
) -> Result<Vec<f32>> {
    if !(step_size.is_finite() && step_size > 0.0) {
        value_error!("step_size must be a positive finite number, got {step_size}");
    }
    // Welling & Teh 2011, eq. 4 with the full-data gradient: drift δ/2, noise variance δ.
    let drift = (step_size / 2.0) as f32;
    let noise_std = step_size.sqrt() as f32;
    let mut x = x;
    for k in 0..steps {
        let s = score(&x)?;
        check_score(&s, x.len())?;
        let mut bad = None;
        {
            let (xr, bad_ref) = (&mut x, &mut bad);
            hooks.run_pass(&mut || {
                *bad_ref = langevin_update(xr, &s, drift, noise_std, seed, k as u64);
                Ok(())
            })?;
        }
        if bad.is_some() {
            return Err(Error::NonFiniteIterate {
                iteration: k,
                level: None,
            });
        }
        hooks.after_step(k, k as i64, &x, &[])?;
    }
    Ok(x)
}

// ---------------------------------------------------------------------------------------------
// Annealed Langevin dynamics

/// Settings of annealed Langevin dynamics.
#[derive(Clone, Debug, PartialEq)]
pub struct AnnealedConfig {
    /// The noise ladder σ_1 > σ_2 > ... > σ_L > 0, strictly descending.
    pub sigmas: Vec<f64>,
    /// Iterations per level, T.
    pub steps_per_level: usize,
    /// Step size scale ε: level i uses α_i = ε (σ_i/σ_L)².
    pub eps: f64,
    pub seed: u64,
}

impl Default for AnnealedConfig {
    fn default() -> Self {
        AnnealedConfig {
            sigmas: geometric_sigmas(NCSN_SIGMA_MAX, NCSN_SIGMA_MIN, NCSN_LEVELS)
                .expect("NCSN's ladder is valid"),
            steps_per_level: NCSN_STEPS_PER_LEVEL,
            eps: NCSN_EPS,
            seed: 0,
        }
    }
}

/// Checks a noise ladder: non-empty, finite, positive and strictly descending.
pub fn check_sigmas(sigmas: &[f64]) -> Result<()> {
    if sigmas.is_empty() {
        value_error!("sigmas must hold at least one noise level, got an empty ladder");
    }
    if let Some(i) = sigmas.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        value_error!(
            "sigmas must be positive and finite, got {} at index {i}",
            sigmas[i]
        );
    }
    if let Some(i) = sigmas.windows(2).position(|w| w[1] >= w[0]) {
        value_error!(
            "sigmas must be strictly descending (largest noise first), got {} at index {i} then {} at index {}",
            sigmas[i],
            sigmas[i + 1],
            i + 1
        );
    }
    Ok(())
}

/// The step size of each level, α_i = ε (σ_i/σ_L)² (NCSN Algorithm 1, line 3).
pub fn annealed_step_sizes(sigmas: &[f64], eps: f64) -> Result<Vec<f64>> {
    check_sigmas(sigmas)?;
    if !(eps.is_finite() && eps > 0.0) {
        value_error!("eps must be a positive finite number, got {eps}");
    }
    let sigma_last = sigmas[sigmas.len() - 1];
    Ok(sigmas
        .iter()
        .map(|s| eps * (s / sigma_last).powi(2))
        .collect())
}

/// The default initial x of annealed Langevin: σ_1 · z, z standard normal from
/// (seed, [`ANNEALED_INIT_STREAM`], element index), i.e. the VE prior N(0, σ_1² I) of data near
/// the origin. (Song & Ermon drew U[0, 1] for images in [0, 1]; pass your own x for such data.)
pub fn annealed_init(len: usize, sigma_max: f64, seed: u64) -> Vec<f32> {
    let mut x = vec![0f32; len];
    let scale = sigma_max as f32;
    for_each_chunk(&mut x, |start, chunk| {
        fill_normal(seed, ANNEALED_INIT_STREAM, start as u64, chunk);
        chunk.iter_mut().for_each(|v| *v *= scale);
    });
    x
}

/// Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): for each level σ_i of the ladder,
/// `steps_per_level` iterations of `x ← x + α_i s(x, σ_i) + sqrt(2 α_i) z`, with
/// α_i = ε (σ_i/σ_L)², from `x` (see [`annealed_init`] for the default start).
///
/// Noise of iteration t of level i: stream `i · steps_per_level + t`. `hooks.after_step` receives
/// the global iteration index and the level index.
pub fn annealed(
    score: &mut NoiseConditionalScoreFn<'_>,
    x: Vec<f32>,
    config: &AnnealedConfig,
    hooks: &mut dyn LoopHooks,
) -> Result<Vec<f32>> {
    let alphas = annealed_step_sizes(&config.sigmas, config.eps)?;
    let mut x = x;
    for (level, (&sigma, &alpha)) in config.sigmas.iter().zip(&alphas).enumerate() {
        // NCSN Algorithm 1, line 5: drift α_i, noise variance 2 α_i.
        let drift = alpha as f32;
        let noise_std = (2.0 * alpha).sqrt() as f32;
        for t in 0..config.steps_per_level {
            let iteration = level * config.steps_per_level + t;
            let s = score(&x, sigma)?;
            check_score(&s, x.len())?;
            let mut bad = None;
            {
                let (xr, bad_ref) = (&mut x, &mut bad);
                hooks.run_pass(&mut || {
                    *bad_ref =
                        langevin_update(xr, &s, drift, noise_std, config.seed, iteration as u64);
                    Ok(())
                })?;
            }
            if bad.is_some() {
                return Err(Error::NonFiniteIterate {
                    iteration,
                    level: Some(level),
                });
            }
            hooks.after_step(iteration, level as i64, &x, &[])?;
        }
    }
    Ok(x)
}

/// `n` noise levels in geometric progression from `sigma_max` down to `sigma_min`:
/// σ_i = σ_max (σ_min/σ_max)^(i/(n-1)). NCSN: `geometric_sigmas(1.0, 0.01, 10)`.
pub fn geometric_sigmas(sigma_max: f64, sigma_min: f64, n: usize) -> Result<Vec<f64>> {
    if !(sigma_min.is_finite() && sigma_min > 0.0) {
        value_error!("sigma_min must be positive and finite, got {sigma_min}");
    }
    if !(sigma_max.is_finite() && sigma_max > sigma_min) {
        value_error!(
            "sigma_max must be finite and greater than sigma_min ({sigma_min}), got {sigma_max}"
        );
    }
    match n {
        0 => value_error!("n must be at least 1, got 0"),
        1 => Ok(vec![sigma_max]),
        _ => {
            let ratio = (sigma_min / sigma_max).ln();
            let mut out: Vec<f64> = (0..n)
                .map(|i| sigma_max * (ratio * i as f64 / (n - 1) as f64).exp())
                .collect();
            out[n - 1] = sigma_min;
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Denoising score matching

/// Perturbs data for denoising score matching: x̃_b = x0_b + σ_{l_b} z_b, where `levels[b]` indexes
/// the ladder. Returns the per-sample σ (the `sigmas` argument of [`dsm_loss`]).
pub fn dsm_perturb(
    x0: &[f32],
    noise: &[f32],
    ladder: &[f64],
    levels: &[usize],
    out: &mut [f32],
) -> Result<Vec<f64>> {
    check_sigmas(ladder)?;
    if noise.len() != x0.len() || out.len() != x0.len() {
        shape_error!(
            "noise has {} and out {} elements but x0 has {}",
            noise.len(),
            out.len(),
            x0.len()
        );
    }
    let row_len = row_len_of(x0.len(), levels.len(), "levels")?;
    let sigmas = levels
        .iter()
        .map(|&l| match ladder.get(l) {
            Some(&s) => Ok(s),
            None => value_error!(
                "level {l} is out of range for a ladder of {} sigmas",
                ladder.len()
            ),
        })
        .collect::<Result<Vec<f64>>>()?;
    for (b, o) in out.chunks_mut(row_len.max(1)).enumerate() {
        let s = sigmas[b] as f32;
        let span = b * row_len..(b + 1) * row_len;
        for ((o, &x), &z) in o.iter_mut().zip(&x0[span.clone()]).zip(&noise[span]) {
            *o = x + s * z;
        }
    }
    Ok(sigmas)
}

fn row_len_of(n: usize, batch: usize, name: &str) -> Result<usize> {
    if batch == 0 {
        if n == 0 {
            return Ok(0);
        }
        shape_error!("{name} is empty but the data has {n} elements");
    }
    if !n.is_multiple_of(batch) {
        shape_error!("the data has {n} elements, not a multiple of the {batch} samples in {name}");
    }
    Ok(n / batch)
}

/// The denoising score-matching loss of NCSN (Song & Ermon 2019, eq. 5-6), per sample:
///
/// ```text
/// target  = -(x̃ - x0) / σ²                       (= -z/σ, the score of N(x̃; x0, σ² I))
/// loss_b  = ½ σ_b² · mean_i (s_bi - target_bi)²   (λ(σ) = σ²; mean over dimensions)
/// ```
///
/// in f64. `score_output` (the model's s(x̃, σ)), `x_noisy` and `x0` are batch first with the same
/// length; `sigmas` holds each sample's σ. `grad`, if given, receives the gradient with respect to
/// `score_output` of the **sum over samples** of the losses, `σ_b² (s_bi - target_bi) / D`
/// (divide by B to train on the batch mean, as NCSN does).
pub fn dsm_loss(
    score_output: &[f32],
    x_noisy: &[f32],
    x0: &[f32],
    sigmas: &[f64],
    grad: Option<&mut [f32]>,
) -> Result<Vec<f64>> {
    let n = score_output.len();
    if x_noisy.len() != n || x0.len() != n {
        shape_error!(
            "x_noisy has {} and x0 {} elements but score_output has {n}",
            x_noisy.len(),
            x0.len()
        );
    }
    if let Some(g) = grad.as_deref() {
        if g.len() != n {
            shape_error!("grad has {} elements but score_output has {n}", g.len());
        }
    }
    let row_len = row_len_of(n, sigmas.len(), "sigmas")?;
    if sigmas.is_empty() {
        return Ok(Vec::new());
    }
    if row_len == 0 {
        value_error!("samples with no elements have no score-matching loss");
    }
    if let Some(b) = sigmas.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        value_error!(
            "sigmas must be positive and finite, got {} for sample {b}",
            sigmas[b]
        );
    }
    let row = |b: usize, g: Option<&mut [f32]>| -> f64 {
        let span = b * row_len..(b + 1) * row_len;
        dsm_row(
            &score_output[span.clone()],
            &x_noisy[span.clone()],
            &x0[span],
            sigmas[b],
            g,
        )
    };
    let serial = n < PARALLEL_MIN_ELEMENTS || !parallel_allowed();
    Ok(match (grad, serial) {
        (Some(g), true) => g
            .chunks_mut(row_len)
            .enumerate()
            .map(|(b, g)| row(b, Some(g)))
            .collect(),
        (Some(g), false) => g
            .par_chunks_mut(row_len)
            .enumerate()
            .map(|(b, g)| row(b, Some(g)))
            .collect(),
        (None, true) => (0..sigmas.len()).map(|b| row(b, None)).collect(),
        (None, false) => (0..sigmas.len())
            .into_par_iter()
            .map(|b| row(b, None))
            .collect(),
    })
}

/// NCSN eq. 6 for one sample, written as ½ mean_i (σ s_i + (x̃_i - x0_i)/σ)² (the same quantity).
fn dsm_row(s: &[f32], x_noisy: &[f32], x0: &[f32], sigma: f64, grad: Option<&mut [f32]>) -> f64 {
    let d = s.len() as f64;
    let inv_var = 1.0 / (sigma * sigma);
    // residual_i = s_i - target_i = s_i + (x̃_i - x0_i)/σ²
    let residual =
        |i: usize| f64::from(s[i]) + (f64::from(x_noisy[i]) - f64::from(x0[i])) * inv_var;
    let squared: f64 = (0..s.len()).map(|i| residual(i).powi(2)).sum();
    if let Some(g) = grad {
        let scale = sigma * sigma / d;
        for (i, g) in g.iter_mut().enumerate() {
            *g = (scale * residual(i)) as f32;
        }
    }
    0.5 * sigma * sigma * squared / d
}

// ---------------------------------------------------------------------------------------------
// Score ↔ ε

/// The noise level of x whose score is converted: x = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε (VP) or
/// x = x0 + σ ε (VE). In both cases score = -ε / std with std the noise's standard deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseLevel {
    /// Variance preserving, at ᾱ_t (alphas_cumprod).
    Vp { alpha_bar: f64 },
    /// Variance exploding, at σ.
    Ve { sigma: f64 },
}

impl NoiseLevel {
    /// The standard deviation of the noise in x: sqrt(1-ᾱ) or σ (must be positive).
    pub fn noise_std(self) -> Result<f64> {
        let std = match self {
            NoiseLevel::Vp { alpha_bar } => {
                if !(0.0..=1.0).contains(&alpha_bar) {
                    value_error!("alpha_bar must be in [0, 1], got {alpha_bar}");
                }
                (1.0 - alpha_bar).sqrt()
            }
            NoiseLevel::Ve { sigma } => sigma,
        };
        if !(std.is_finite() && std > 0.0) {
            value_error!(
                "the noise level {self:?} has no noise (std {std}): the score is undefined there"
            );
        }
        Ok(std)
    }
}

/// score = -ε / std (REFERENCE: score = -ε / sqrt(1-ᾱ_t) for VP; -ε/σ for VE).
pub fn score_from_eps(eps: &[f32], level: NoiseLevel, out: &mut [f32]) -> Result<()> {
    scale_into(eps, -1.0 / level.noise_std()?, out)
}

/// ε = -std · score, the inverse of [`score_from_eps`].
pub fn eps_from_score(score: &[f32], level: NoiseLevel, out: &mut [f32]) -> Result<()> {
    scale_into(score, -level.noise_std()?, out)
}

fn scale_into(input: &[f32], factor: f64, out: &mut [f32]) -> Result<()> {
    if input.len() != out.len() {
        shape_error!(
            "out has {} elements but the input has {}",
            out.len(),
            input.len()
        );
    }
    let f = factor as f32;
    for_each_chunk(out, |start, chunk| {
        let len = chunk.len();
        for (o, &v) in chunk.iter_mut().zip(&input[start..start + len]) {
            *o = f * v;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::NoHooks;

    /// Deterministic pseudo-data in [-1, 1).
    fn data(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The loss of one sample in f64 throughout, straight from NCSN eq. 6.
    fn dsm_loss_f64(s: &[f64], x_noisy: &[f32], x0: &[f32], sigma: f64) -> f64 {
        let d = s.len() as f64;
        let sq: f64 = s
            .iter()
            .zip(x_noisy.iter().zip(x0))
            .map(|(&s, (&xn, &x))| {
                let target = -(f64::from(xn) - f64::from(x)) / (sigma * sigma);
                (s - target).powi(2)
            })
            .sum();
        0.5 * sigma * sigma * sq / d
    }

    #[test]
    fn test_dsm_loss_gradient_matches_central_differences_of_the_sum() {
        let (batch, row_len) = (3, 5);
        let x0 = data(batch * row_len, 1);
        let z = data(batch * row_len, 2);
        let ladder = geometric_sigmas(1.0, 0.01, 10).unwrap();
        let levels = [0usize, 4, 9];
        let mut x_noisy = vec![0f32; x0.len()];
        let sigmas = dsm_perturb(&x0, &z, &ladder, &levels, &mut x_noisy).unwrap();
        assert_eq!(sigmas, vec![ladder[0], ladder[4], ladder[9]]);
        let s = data(batch * row_len, 3);
        let mut grad = vec![0f32; s.len()];
        let losses = dsm_loss(&s, &x_noisy, &x0, &sigmas, Some(&mut grad)).unwrap();
        let total = |v: &[f64]| -> f64 {
            (0..batch)
                .map(|b| {
                    let span = b * row_len..(b + 1) * row_len;
                    dsm_loss_f64(
                        &v[span.clone()],
                        &x_noisy[span.clone()],
                        &x0[span],
                        sigmas[b],
                    )
                })
                .sum()
        };
        let base: Vec<f64> = s.iter().map(|&v| f64::from(v)).collect();
        for b in 0..batch {
            let span = b * row_len..(b + 1) * row_len;
            let direct = dsm_loss_f64(
                &base[span.clone()],
                &x_noisy[span.clone()],
                &x0[span],
                sigmas[b],
            );
            assert!((losses[b] - direct).abs() <= 1e-12 * direct.max(1.0));
        }
        let h = 1e-4;
        for i in 0..s.len() {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (total(&plus) - total(&minus)) / (2.0 * h);
            assert!(
                (f64::from(grad[i]) - numeric).abs() <= 1e-5 * numeric.abs().max(1.0),
                "element {i}: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }

    #[test]
    fn test_dsm_loss_of_the_exact_target_is_zero_and_equals_half_mean_of_z_squared_at_zero() {
        // x̃ = x0 + σ z: s = -z/σ gives 0; s = 0 gives ½ mean(z²).
        let x0 = data(8, 4);
        let z = data(8, 5);
        let sigma = 0.3;
        let x_noisy: Vec<f32> = x0
            .iter()
            .zip(&z)
            .map(|(&x, &z)| x + sigma as f32 * z)
            .collect();
        let exact: Vec<f32> = z.iter().map(|&z| -z / sigma as f32).collect();
        let l = dsm_loss(&exact, &x_noisy, &x0, &[sigma, sigma], None).unwrap();
        assert!(l.iter().all(|&v| v < 1e-10), "{l:?}");
        let l = dsm_loss(&[0f32; 8], &x_noisy, &x0, &[sigma, sigma], None).unwrap();
        let half_mean_z2 =
            |r: &[f32]| 0.5 * r.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 4.0;
        assert!((l[0] - half_mean_z2(&z[..4])).abs() < 1e-6);
        assert!((l[1] - half_mean_z2(&z[4..])).abs() < 1e-6);
    }

    #[test]
    fn test_dsm_loss_rejects_bad_arguments_by_name() {
        let four = [0f32; 4];
        let e = dsm_loss(&four, &four, &[0f32; 3], &[1.0], None).unwrap_err();
        assert!(e.to_string().contains("x0 3"), "{e}");
        let e = dsm_loss(&four, &four, &four, &[1.0, 1.0, 1.0], None).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let e = dsm_loss(&four, &four, &four, &[1.0, 0.0], None).unwrap_err();
        assert!(e.to_string().contains("got 0 for sample 1"), "{e}");
        assert!(dsm_loss(&[], &[], &[], &[], Some(&mut []))
            .unwrap()
            .is_empty());
        let e = dsm_loss(&[], &[], &[], &[1.0], None).unwrap_err();
        assert!(e.to_string().contains("no elements"), "{e}");
        let e = dsm_loss(&four, &four, &four, &[1.0, -1.0], None).unwrap_err();
        assert!(e.to_string().contains("got -1 for sample 1"), "{e}");
    }

    #[test]
    fn test_geometric_sigmas_ncsn_default_ladder() {
        let s = geometric_sigmas(1.0, 0.01, 10).unwrap();
        assert_eq!(s.len(), 10);
        assert_eq!((s[0], s[9]), (1.0, 0.01));
        for w in s.windows(2) {
            assert!((w[1] / w[0] - 0.01f64.powf(1.0 / 9.0)).abs() < 1e-12);
        }
        assert_eq!(AnnealedConfig::default().sigmas, s);
        assert!(geometric_sigmas(0.01, 1.0, 10).is_err());
        assert!(geometric_sigmas(1.0, 0.01, 0).is_err());
        assert!(check_sigmas(&[0.1, 1.0])
            .unwrap_err()
            .to_string()
            .contains("descending"));
        assert!(check_sigmas(&[]).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn test_annealed_step_sizes_are_eps_times_squared_sigma_ratio() {
        let a = annealed_step_sizes(&[1.0, 0.1, 0.01], 2e-5).unwrap();
        let expected = [2e-5 * 1e4, 2e-5 * 1e2, 2e-5];
        for (a, e) in a.iter().zip(expected) {
            assert!((a - e).abs() <= 1e-15 * e.max(1.0), "{a} vs {e}");
        }
    }

    #[test]
    fn test_score_eps_conversions_vp_and_ve_round_trip() {
        let eps = data(16, 6);
        let mut score = vec![0f32; 16];
        score_from_eps(&eps, NoiseLevel::Vp { alpha_bar: 0.36 }, &mut score).unwrap();
        for (s, e) in score.iter().zip(&eps) {
            assert!((s + e / 0.8).abs() < 1e-6);
        }
        let mut back = vec![0f32; 16];
        eps_from_score(&score, NoiseLevel::Vp { alpha_bar: 0.36 }, &mut back).unwrap();
        for (b, e) in back.iter().zip(&eps) {
            assert!((b - e).abs() < 1e-6);
        }
        score_from_eps(&eps, NoiseLevel::Ve { sigma: 2.0 }, &mut score).unwrap();
        for (s, e) in score.iter().zip(&eps) {
            assert_eq!(*s, -e * 0.5);
        }
        assert!(score_from_eps(&eps, NoiseLevel::Vp { alpha_bar: 1.0 }, &mut score).is_err());
    }

    /// Mean and variance of every coordinate pooled, in f64.
    fn moments(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn test_sgld_with_the_analytic_score_recovers_a_gaussians_mean_and_variance() {
        // N(μ, diag(s²)) in 2-D, 4096 chains from 0, δ = 0.01 s_min²: burn-in contracts the start
        // by (1 - δ/(2 s²))^steps < 1e-4 and the O(δ) bias s²/(1 - δ/(4s²)) is < 0.3 %.
        let (mu, std) = ([1.5f32, -0.5], [0.5f32, 1.0]);
        let chains = 4096;
        let delta = 0.01 * 0.25;
        let steps = 8000;
        let mut score = |x: &[f32]| -> Result<Vec<f32>> {
            Ok(x.iter()
                .enumerate()
                .map(|(i, &v)| -(v - mu[i % 2]) / (std[i % 2] * std[i % 2]))
                .collect())
        };
        let x = sgld(
            &mut score,
            vec![0f32; 2 * chains],
            delta,
            steps,
            7,
            &mut NoHooks,
        )
        .unwrap();
        for d in 0..2 {
            let xd: Vec<f32> = x.iter().skip(d).step_by(2).copied().collect();
            let (m, v) = moments(&xd);
            let s2 = f64::from(std[d]).powi(2);
            // 5 standard errors: mean s/sqrt(n), variance s² sqrt(2/n).
            let n = chains as f64;
            assert!(
                (m - f64::from(mu[d])).abs() < 5.0 * s2.sqrt() / n.sqrt(),
                "dim {d}: mean {m}"
            );
            assert!(
                (v - s2).abs() < 5.0 * s2 * (2.0 / n).sqrt() + 0.003 * s2,
                "dim {d}: var {v} vs {s2}"
            );
        }
    }

    #[test]
    fn test_langevin_update_is_identical_for_any_chunking_and_thread_count() {
        let n = 3 * PARALLEL_MIN_ELEMENTS + 1234;
        let x0 = data(n, 8);
        let s = data(n, 9);
        let (drift, noise_std, seed, stream) = (0.01f32, 0.3f32, 42, 17);
        let mut parallel = x0.clone();
        assert!(langevin_update(&mut parallel, &s, drift, noise_std, seed, stream).is_none());
        let mut one_thread = x0.clone();
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| langevin_update(&mut one_thread, &s, drift, noise_std, seed, stream));
        assert_eq!(parallel, one_thread);
        for split in [1usize, 1000, 1024, 4097, n] {
            let mut serial = x0.clone();
            let mut start = 0;
            for (xc, sc) in serial.chunks_mut(split).zip(s.chunks(split)) {
                update_chunk(start, xc, sc, drift, noise_std, seed, stream);
                start += xc.len();
            }
            assert_eq!(serial, parallel, "split {split}");
        }
        // The noise is z from (seed, stream, index) exactly.
        let mut z = vec![0f32; n];
        fill_normal(seed, stream, 0, &mut z);
        for i in [0, 1, n / 2, n - 1] {
            assert_eq!(parallel[i], x0[i] + drift * s[i] + noise_std * z[i]);
        }
    }

    #[test]
    fn test_sgld_and_annealed_report_the_iteration_of_a_non_finite_iterate() {
        let mut calls = 0;
        let mut score = |x: &[f32]| -> Result<Vec<f32>> {
            calls += 1;
            Ok(vec![if calls == 3 { f32::NAN } else { 0.0 }; x.len()])
        };
        match sgld(&mut score, vec![0f32; 4], 0.1, 10, 0, &mut NoHooks) {
            Err(Error::NonFiniteIterate {
                iteration: 2,
                level: None,
            }) => {}
            other => panic!("{other:?}"),
        }
        let mut score = |x: &[f32], sigma: f64| -> Result<Vec<f32>> {
            Ok(vec![if sigma < 0.5 { f32::INFINITY } else { 0.0 }; x.len()])
        };
        let config = AnnealedConfig {
            sigmas: vec![1.0, 0.1],
            steps_per_level: 3,
            ..AnnealedConfig::default()
        };
        let e = annealed(&mut score, vec![0f32; 4], &config, &mut NoHooks).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NonFiniteIterate {
                    iteration: 3,
                    level: Some(1)
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("iteration 3 (noise level 1"), "{e}");
    }

    #[test]
    fn test_annealed_uses_one_stream_per_iteration_and_the_init_stream() {
        // With a zero score the result is σ_1 z_init + Σ_i sqrt(2 α_i) z_i.
        let config = AnnealedConfig {
            sigmas: vec![2.0, 1.0],
            steps_per_level: 2,
            eps: 0.01,
            seed: 5,
        };
        let n = 6;
        let init = annealed_init(n, 2.0, 5);
        let mut zero = |x: &[f32], _: f64| -> Result<Vec<f32>> { Ok(vec![0.0; x.len()]) };
        let x = annealed(&mut zero, init.clone(), &config, &mut NoHooks).unwrap();
        let mut expected = init.clone();
        let alphas = annealed_step_sizes(&config.sigmas, config.eps).unwrap();
        for stream in 0..4u64 {
            let mut z = vec![0f32; n];
            fill_normal(5, stream, 0, &mut z);
            let std = (2.0 * alphas[stream as usize / 2]).sqrt() as f32;
            for (e, z) in expected.iter_mut().zip(&z) {
                *e += std * z;
            }
        }
        assert_eq!(x, expected);
        let mut z = vec![0f32; n];
        fill_normal(5, ANNEALED_INIT_STREAM, 0, &mut z);
        assert_eq!(init, z.iter().map(|v| v * 2.0).collect::<Vec<_>>());
    }
}
