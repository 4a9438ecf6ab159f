//! Analytic oracles: data distributions whose optimal denoiser is known in closed form, for
//! checking samplers against the truth.
//!
//! For a mixture of isotropic Gaussians p(x0) = Σ_k w_k N(μ_k, s_k² I), the noised marginal is
//! q(x_t) = Σ_k w_k N(sqrt(ᾱ) μ_k, (ᾱ s_k² + 1 - ᾱ) I), and the minimum-MSE ε-prediction is
//! E[ε | x_t] = -sqrt(1-ᾱ) ∇ log q(x_t) = sqrt(1-ᾱ) Σ_k r_k(x_t) (x_t - sqrt(ᾱ) μ_k)/(ᾱ s_k² + 1-ᾱ)
//! with r_k the component posteriors.

use crate::diffusion::{floor_if_zero, Prediction};
use crate::error::Result;
use crate::kernels::rng::{fill_normal, philox4x32_10};
use crate::sample::{Denoiser, ModelOutput};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// Stream of the component choices when sampling a mixture.
const COMPONENT_STREAM: u64 = u64::MAX - 1;
/// Stream of the within-component noise when sampling a mixture.
const MIXTURE_NOISE_STREAM: u64 = u64::MAX - 2;

/// A mixture of isotropic Gaussians in D dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianMixture {
    pub weights: Vec<f64>,
    /// K × D, row-major.
    pub means: Vec<f64>,
    pub stds: Vec<f64>,
    pub dim: usize,
}

impl GaussianMixture {
    pub fn new(weights: Vec<f64>, means: Vec<f64>, stds: Vec<f64>, dim: usize) -> Result<Self> {
        let k = weights.len();
        if k == 0 {
            value_error!("a mixture needs at least one component");
        }
        if dim == 0 {
            value_error!("a mixture needs dimension >= 1");
        }
        if means.len() != k * dim {
            shape_error!(
                "means has {} values but {k} components of dimension {dim} need {}",
                means.len(),
                k * dim
            );
        }
        if stds.len() != k {
            shape_error!(
                "stds has {} values but there are {k} components",
                stds.len()
            );
        }
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
            || weights.iter().sum::<f64>() <= 0.0
        {
            value_error!("mixture weights must be non-negative and finite with a positive sum, got {weights:?}");
        }
        if stds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            value_error!("mixture stds must be positive and finite, got {stds:?}");
        }
        if means.iter().any(|m| !m.is_finite()) {
            value_error!("mixture means must be finite");
        }
        let total: f64 = weights.iter().sum();
        let weights = weights.iter().map(|w| w / total).collect();
        Ok(GaussianMixture {
            weights,
            means,
            stds,
            dim,
        })
    }

    pub fn components(&self) -> usize {
        self.weights.len()
    }

    /// Posterior component probabilities r_k(x_t) of one row at noise level ᾱ.
    fn responsibilities(&self, x: &[f32], alpha_bar: f64, resp: &mut [f64]) {
        let sa = alpha_bar.sqrt();
        let d = self.dim as f64;
        let mut best = f64::NEG_INFINITY;
        for (k, r) in resp.iter_mut().enumerate() {
            let var = alpha_bar * self.stds[k].powi(2) + 1.0 - alpha_bar;
            let mu = &self.means[k * self.dim..(k + 1) * self.dim];
            let sq: f64 = x
                .iter()
                .zip(mu)
                .map(|(&xi, &m)| (xi as f64 - sa * m).powi(2))
                .sum();
            *r = self.weights[k].ln() - 0.5 * d * var.ln() - 0.5 * sq / var;
            best = best.max(*r);
        }
        let mut total = 0.0;
        for r in resp.iter_mut() {
            *r = (*r - best).exp();
            total += *r;
        }
        for r in resp.iter_mut() {
            *r /= total;
        }
    }

    /// Component posteriors p(k | x_t) for every row of `x` ([B, D]).
    pub fn class_posterior(&self, x: &[f32], alpha_bars: &[f64]) -> Vec<f64> {
        let k = self.components();
        let mut out = vec![0.0; alpha_bars.len() * k];
        for (b, &ab) in alpha_bars.iter().enumerate() {
            self.responsibilities(
                &x[b * self.dim..(b + 1) * self.dim],
                ab,
                &mut out[b * k..(b + 1) * k],
            );
        }
        out
    }

    /// The exact E[ε | x_t] for every row of `x` ([B, D]) at per-row ᾱ.
    pub fn eps(&self, x: &[f32], alpha_bars: &[f64], out: &mut [f32]) {
        let mut resp = vec![0.0; self.components()];
        for (b, &ab) in alpha_bars.iter().enumerate() {
            let row = &x[b * self.dim..(b + 1) * self.dim];
            self.responsibilities(row, ab, &mut resp);
            let sa = ab.sqrt();
            let so = (1.0 - ab).sqrt();
            for (j, o) in out[b * self.dim..(b + 1) * self.dim].iter_mut().enumerate() {
                let mut e = 0.0;
                for (k, &r) in resp.iter().enumerate() {
                    let var = ab * self.stds[k].powi(2) + 1.0 - ab;
                    e += r * (row[j] as f64 - sa * self.means[k * self.dim + j]) / var;
                }
                *o = (so * e) as f32;
            }
        }
    }

    /// `n` exact samples ([n, D]), a pure function of the seed.
    pub fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        let mut z = vec![0f32; n * self.dim];
        fill_normal(seed, MIXTURE_NOISE_STREAM, 0, &mut z);
        let key = [seed as u32, (seed >> 32) as u32];
        let mut cdf = Vec::with_capacity(self.components());
        let mut acc = 0.0;
        for w in &self.weights {
            acc += w;
            cdf.push(acc);
        }
        for i in 0..n {
            let r = philox4x32_10(
                [
                    i as u32,
                    (i as u64 >> 32) as u32,
                    COMPONENT_STREAM as u32,
                    (COMPONENT_STREAM >> 32) as u32,
                ],
                key,
            );
            let u = ((r[0] as u64) << 21 ^ (r[1] as u64 >> 11)) as f64 / (1u64 << 53) as f64;
            let k = cdf
                .iter()
                .position(|&c| u < c)
                .unwrap_or(self.components() - 1);
            for j in 0..self.dim {
                let v = &mut z[i * self.dim + j];
                *v = (self.means[k * self.dim + j] + self.stds[k] * *v as f64) as f32;
            }
        }
        z
    }
}

/// A mixture used as a denoiser with a given schedule and prediction type.
pub struct MixtureDenoiser<'a> {
    pub mixture: &'a GaussianMixture,
    pub schedule: &'a Schedule,
    pub prediction: Prediction,
}

impl Denoiser for MixtureDenoiser<'_> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        let dim = self.mixture.dim;
        let row: usize = shape[1..].iter().product();
        if row != dim {
            shape_error!(
                "the mixture has dimension {dim} but x rows have {row} elements (shape {shape:?})"
            );
        }
        let ab: Vec<f64> = t
            .iter()
            .map(|&ti| Ok(self.schedule.alphas_cumprod[self.schedule.check_timestep(ti)?]))
            .collect::<Result<_>>()?;
        let mut eps = vec![0f32; x.len()];
        self.mixture.eps(x, &ab, &mut eps);
        if self.prediction != Prediction::Epsilon {
            for (b, &a) in ab.iter().enumerate() {
                let (sa, so) = (a.sqrt(), (1.0 - a).sqrt());
                for j in b * dim..(b + 1) * dim {
                    let (xv, e) = (x[j] as f64, eps[j] as f64);
                    eps[j] = match self.prediction {
                        Prediction::X0 => ((xv - so * e) / floor_if_zero(a).sqrt()) as f32,
                        Prediction::V => {
                            (sa * e - so * (xv - so * e) / floor_if_zero(a).sqrt()) as f32
                        }
                        Prediction::Epsilon => unreachable!(),
                    };
                }
            }
        }
        Ok(ModelOutput {
            data: eps,
            shape: shape.to_vec(),
        })
    }
}

/// Energy distance D² = 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples ([n, D] and
/// [m, D], row-major), with the within-sample means over distinct pairs (U-statistics), so it
/// is unbiased and near 0 for two samples of one distribution (Székely & Rizzo 2013).
pub fn energy_distance(a: &[f32], n: usize, b: &[f32], m: usize, dim: usize) -> Result<f64> {
    use rayon::prelude::*;
    if n < 2 || m < 2 {
        value_error!("energy_distance needs at least 2 points in each sample, got {n} and {m}");
    }
    if a.len() != n * dim || b.len() != m * dim {
        shape_error!("energy_distance: sample sizes do not match their shapes");
    }
    let dist = |p: &[f32], q: &[f32]| -> f64 {
        p.iter()
            .zip(q)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let mean_cross = |p: &[f32], np: usize, q: &[f32], nq: usize, same: bool| -> f64 {
        let per_point = |i: usize| -> f64 {
            let pi = &p[i * dim..(i + 1) * dim];
            (0..nq)
                .filter(|&j| !(same && j == i))
                .map(|j| dist(pi, &q[j * dim..(j + 1) * dim]))
                .sum::<f64>()
        };
        let total: f64 = if crate::kernels::parallel_allowed() {
            (0..np).into_par_iter().map(per_point).sum()
        } else {
            (0..np).map(per_point).sum()
        };
        let pairs = if same { np * (np - 1) } else { np * nq };
        total / pairs as f64
    };
    let xy = mean_cross(a, n, b, m, false);
    let xx = mean_cross(a, n, a, n, true);
    let yy = mean_cross(b, m, b, m, true);
    Ok(2.0 * xy - xx - yy)
}

/// The mixture's exact denoiser in σ space, D(x, σ) = E[x0 | x0 + σ z = x], called with t = σ
/// (a model with `Parameterization::Denoised`).
pub struct SigmaMixtureDenoiser<'a> {
    pub mixture: &'a GaussianMixture,
}

impl SigmaMixtureDenoiser<'_> {
    /// D into `out` for rows at levels `sigmas`.
    pub fn denoise(&self, x: &[f32], sigmas: &[f64], out: &mut [f32]) {
        let dim = self.mixture.dim;
        // x_σ / √(σ² + 1) is the variance-preserving x_t at ᾱ = 1/(σ² + 1).
        let ab: Vec<f64> = sigmas.iter().map(|s| 1.0 / (s * s + 1.0)).collect();
        let mut xt = x.to_vec();
        for (b, a) in ab.iter().enumerate() {
            for v in &mut xt[b * dim..(b + 1) * dim] {
                *v = (*v as f64 * a.sqrt()) as f32;
            }
        }
        self.mixture.eps(&xt, &ab, out);
        for (b, &s) in sigmas.iter().enumerate() {
            for j in b * dim..(b + 1) * dim {
                out[j] = (x[j] as f64 - s * out[j] as f64) as f32;
            }
        }
    }
}

impl Denoiser for SigmaMixtureDenoiser<'_> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        let t: Vec<f64> = t.iter().map(|&v| v as f64).collect();
        self.predict_continuous(x, shape, &t)
    }
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        let row: usize = shape[1..].iter().product();
        if row != self.mixture.dim || t.len() != shape[0] {
            shape_error!(
                "the mixture has dimension {} but x has shape {shape:?} ({} levels)",
                self.mixture.dim,
                t.len()
            );
        }
        if t.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
            value_error!("σ must be finite and >= 0, got {t:?}");
        }
        let mut out = vec![0f32; x.len()];
        self.denoise(x, t, &mut out);
        Ok(ModelOutput {
            data: out,
            shape: shape.to_vec(),
        })
    }
}
