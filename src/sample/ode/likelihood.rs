//! Log-likelihood through the probability-flow ODE (Song et al. 2021, section 4.3 and
//! Appendix D.2; the survey's row "DDPM (cont flow)").
//!
//! In s = ln σ the probability-flow ODE of x = x0 + σ z is dx/ds = g(x, σ) = x − D(x, σ), and the
//! instantaneous change of variables gives
//!   log p_{σ_min}(x(σ_min)) = log p_{σ_max}(x(σ_max)) + ∫ div_x g(x(s), e^s) ds,
//! integrated from σ_min up to σ_max with an adaptive Runge–Kutta 5(4) (Dormand–Prince) on x and
//! the running integral together. div g = dim − tr ∂D/∂x: exact for analytic oracles, Hutchinson's
//! estimate εᵀ (∂g/∂x) ε with a probe ε fixed for the whole solve otherwise (through candle's
//! autograd for candle models, central differences for opaque callables). The prior at σ_max is
//! N(0, (σ_max² + data_variance) I).

use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::value_error;

/// The vector field of the ODE and the divergence estimate, for a batch.
pub trait FlowField {
    /// g(x, σ) = x − D(x, σ) ([B, dim] row-major) and, per row, div_x g (exact, or
    /// Hutchinson's estimate along the row's fixed probe).
    fn field(&mut self, x: &[f64], sigma: f64) -> Result<(Vec<f64>, Vec<f64>)>;
}

/// Settings of a likelihood solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OdeLikelihoodConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// The prior's extra variance: N(0, (σ_max² + data_variance) I) (1 for a VP-trained model,
    /// whose x_T is N(0, I) on the variance-preserving scale).
    pub data_variance: f64,
    pub rtol: f64,
    pub atol: f64,
}

/// What a solve did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OdeLikelihoodInfo {
    pub nfe: usize,
    pub accepted: usize,
    pub rejected: usize,
}

const MAX_STEPS: usize = 100_000;

// Dormand–Prince 5(4) tableau (Dormand & Prince 1980).
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [[f64; 6]; 7] = [
    [0.0; 6],
    [1.0 / 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0, 0.0],
    [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0, 0.0],
    [
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
        0.0,
        0.0,
    ],
    [
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
        0.0,
    ],
    [
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
const B5: [f64; 7] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
    0.0,
];
const B4: [f64; 7] = [
    5179.0 / 57600.0,
    0.0,
    7571.0 / 16695.0,
    393.0 / 640.0,
    -92097.0 / 339200.0,
    187.0 / 2100.0,
    1.0 / 40.0,
];

impl OdeLikelihoodConfig {
    pub fn check(&self) -> Result<()> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !(pos(self.sigma_min) && pos(self.sigma_max) && self.sigma_min < self.sigma_max) {
            value_error!(
                "sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {} and {}",
                self.sigma_min,
                self.sigma_max
            );
        }
        if !(pos(self.rtol) && pos(self.atol)) {
            value_error!(
                "rtol and atol must be positive, got {} and {}",
                self.rtol,
                self.atol
            );
        }
        if !(self.data_variance.is_finite() && self.data_variance >= 0.0) {
            value_error!(
                "data_variance must be finite and >= 0, got {}",
                self.data_variance
            );
        }
        Ok(())
    }
}

/// log p_{σ_min}(x0) in nats per row of `x0` ([B, dim]), with the solve's counts.
pub fn ode_log_likelihood(
    field: &mut dyn FlowField,
    x0: &[f64],
    batch: usize,
    config: &OdeLikelihoodConfig,
    mut after_step: impl FnMut(f64) -> Result<()>,
) -> Result<(Vec<f64>, OdeLikelihoodInfo)> {
    config.check()?;
    if batch == 0 || !x0.len().is_multiple_of(batch) {
        crate::shape_error!(
            "x0 has {} values, not a whole number of {batch} rows",
            x0.len()
        );
    }
    let dim = x0.len() / batch;
    let n = x0.len();
    // State: x (n values) then the running integral of div g (batch values).
    let mut y: Vec<f64> = x0.to_vec();
    y.extend(std::iter::repeat_n(0.0, batch));
    let (s0, s1) = (config.sigma_min.ln(), config.sigma_max.ln());
    let mut s = s0;
    let mut h = (s1 - s0) * 1e-3;
    let mut info = OdeLikelihoodInfo::default();
    let eval = |field: &mut dyn FlowField, y: &[f64], s: f64, info: &mut OdeLikelihoodInfo| {
        let (g, div) = field.field(&y[..n], s.exp())?;
        info.nfe += 1;
        if g.len() != n || div.len() != batch {
            crate::shape_error!(
                "the flow field returned {} values and {} divergences",
                g.len(),
                div.len()
            );
        }
        let mut k = g;
        k.extend(div);
        Ok::<_, Error>(k)
    };
    let mut k_first = eval(field, &y, s, &mut info)?;
    while s < s1 {
        if info.accepted + info.rejected > MAX_STEPS {
            value_error!("the likelihood ODE took {MAX_STEPS} steps: loosen rtol / atol");
        }
        h = h.min(s1 - s);
        let mut ks: Vec<Vec<f64>> = Vec::with_capacity(7);
        ks.push(k_first.clone());
        let mut stage = vec![0.0; y.len()];
        for i in 1..7 {
            for (j, v) in stage.iter_mut().enumerate() {
                let mut acc = y[j];
                for (l, kl) in ks.iter().enumerate() {
                    acc += h * A[i][l] * kl[j];
                }
                *v = acc;
            }
            ks.push(eval(field, &stage, s + C[i] * h, &mut info)?);
        }
        // stage now holds the 5th-order solution (FSAL: row 7 of A equals B5).
        let mut err = 0.0f64;
        for j in 0..y.len() {
            let e: f64 = (0..7).map(|l| h * (B5[l] - B4[l]) * ks[l][j]).sum();
            let scale = config.atol + config.rtol * y[j].abs().max(stage[j].abs());
            err += (e / scale).powi(2);
        }
        let err = (err / y.len() as f64).sqrt();
        if !err.is_finite() {
            return Err(Error::NonFiniteSigma {
                step: info.accepted,
                sigma: s.exp(),
            });
        }
        if err <= 1.0 {
            s += h;
            y = stage;
            k_first = ks.pop().expect("seven stages");
            info.accepted += 1;
            after_step(s.exp())?;
        } else {
            info.rejected += 1;
        }
        let factor = if err == 0.0 {
            5.0
        } else {
            (0.9 * err.powf(-0.2)).clamp(0.2, 5.0)
        };
        h *= factor;
    }
    // Prior N(0, v I) at σ_max.
    let v = config.sigma_max * config.sigma_max + config.data_variance;
    let log_norm = -0.5 * dim as f64 * (2.0 * std::f64::consts::PI * v).ln();
    let out = (0..batch)
        .map(|b| {
            let xr = &y[b * dim..(b + 1) * dim];
            let prior = log_norm - 0.5 * xr.iter().map(|a| a * a).sum::<f64>() / v;
            prior + y[n + b]
        })
        .collect();
    Ok((out, info))
}

/// Rademacher probes (±1) for `n` values, a pure function of the seed.
pub fn rademacher(n: usize, seed: u64) -> Vec<f32> {
    let mut z = vec![0f32; n];
    fill_normal(seed, PROBE_STREAM, 0, &mut z);
    z.iter()
        .map(|&v| if v >= 0.0 { 1.0 } else { -1.0 })
        .collect()
}

/// Stream of the Hutchinson probes.
const PROBE_STREAM: u64 = (1 << 42) + 7;

/// The exact field and divergence of a Gaussian mixture (Tweedie: ∂D/∂x = Cov[x0 | x]/σ²).
pub struct MixtureFlow<'a> {
    pub mixture: &'a crate::oracles::GaussianMixture,
}

impl FlowField for MixtureFlow<'_> {
    fn field(&mut self, x: &[f64], sigma: f64) -> Result<(Vec<f64>, Vec<f64>)> {
        let m = self.mixture;
        let dim = m.dim;
        let k = m.components();
        let batch = x.len() / dim;
        let s2 = sigma * sigma;
        let mut g = vec![0.0; x.len()];
        let mut div = vec![0.0; batch];
        let mut logr = vec![0.0; k];
        let wsum: f64 = m.weights.iter().sum();
        for b in 0..batch {
            let xr = &x[b * dim..(b + 1) * dim];
            for (c, lr) in logr.iter_mut().enumerate() {
                let var = m.stds[c].powi(2) + s2;
                let d2: f64 = (0..dim)
                    .map(|j| (xr[j] - m.means[c * dim + j]).powi(2))
                    .sum();
                *lr = (m.weights[c] / wsum).ln() - 0.5 * d2 / var - 0.5 * dim as f64 * var.ln();
            }
            let mx = logr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let tot: f64 = logr.iter().map(|l| (l - mx).exp()).sum();
            let mut mean = vec![0.0; dim];
            let mut second = 0.0;
            for (c, lr) in logr.iter().enumerate() {
                let r = (lr - mx).exp() / tot;
                let sk2 = m.stds[c].powi(2);
                let post_var = sk2 * s2 / (sk2 + s2);
                let mut norm2 = 0.0;
                for j in 0..dim {
                    let mk = (s2 * m.means[c * dim + j] + sk2 * xr[j]) / (sk2 + s2);
                    mean[j] += r * mk;
                    norm2 += mk * mk;
                }
                second += r * (dim as f64 * post_var + norm2);
            }
            let trace_cov = second - mean.iter().map(|v| v * v).sum::<f64>();
            for j in 0..dim {
                g[b * dim + j] = xr[j] - mean[j];
            }
            div[b] = dim as f64 - trace_cov / s2;
        }
        Ok((g, div))
    }
}

impl crate::oracles::GaussianMixture {
    /// log p_σ(x) of the mixture smoothed to level σ (x = x0 + σ z), per row of `x`.
    pub fn log_density(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        let dim = self.dim;
        let wsum: f64 = self.weights.iter().sum();
        x.chunks(dim)
            .map(|xr| {
                let terms: Vec<f64> = (0..self.components())
                    .map(|c| {
                        let var = self.stds[c].powi(2) + sigma * sigma;
                        let d2: f64 = (0..dim)
                            .map(|j| (xr[j] - self.means[c * dim + j]).powi(2))
                            .sum();
                        (self.weights[c] / wsum).ln()
                            - 0.5 * d2 / var
                            - 0.5 * dim as f64 * (2.0 * std::f64::consts::PI * var).ln()
                    })
                    .collect();
                let mx = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                mx + terms.iter().map(|t| (t - mx).exp()).sum::<f64>().ln()
            })
            .collect()
    }
}

/// Hutchinson's estimate for a denoiser seen through central differences of the field:
/// εᵀ (g(x + δε) − g(x − δε))/(2δ), for callables without autograd.
/// D(x, σ) for a batch ([B, dim], f32).
pub type DenoiseFn<'a> = dyn FnMut(&[f32], f64) -> Result<Vec<f32>> + 'a;

pub struct FiniteDifferenceFlow<'a> {
    pub denoise: &'a mut DenoiseFn<'a>,
    pub probes: Vec<f32>,
    pub delta: f64,
    /// Values per row.
    pub dim: usize,
}

impl FlowField for FiniteDifferenceFlow<'_> {
    fn field(&mut self, x: &[f64], sigma: f64) -> Result<(Vec<f64>, Vec<f64>)> {
        let n = x.len();
        let batch_dim = self.probes.len();
        if batch_dim != n {
            crate::shape_error!("{} probes for {n} values", batch_dim);
        }
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let d = (self.denoise)(&xf, sigma)?;
        let plus: Vec<f32> = xf
            .iter()
            .zip(&self.probes)
            .map(|(&a, &e)| a + (self.delta as f32) * e)
            .collect();
        let minus: Vec<f32> = xf
            .iter()
            .zip(&self.probes)
            .map(|(&a, &e)| a - (self.delta as f32) * e)
            .collect();
        let dp = (self.denoise)(&plus, sigma)?;
        let dm = (self.denoise)(&minus, sigma)?;
        let g: Vec<f64> = x.iter().zip(&d).map(|(&a, &b)| a - b as f64).collect();
        // ε·(g(x+δε) − g(x−δε))/(2δ) with g = x − D: |ε|² − ε·(D+ − D−)/(2δ).
        let rows = probe_rows(self.dim, &self.probes, &dp, &dm, self.delta);
        Ok((g, rows))
    }
}

/// Per row of `dim` values: |ε|² − ε·(D₊ − D₋)/(2δ).
fn probe_rows(dim: usize, probes: &[f32], dp: &[f32], dm: &[f32], delta: f64) -> Vec<f64> {
    probes
        .chunks(dim)
        .zip(dp.chunks(dim).zip(dm.chunks(dim)))
        .map(|(e, (p, m))| {
            (0..e.len())
                .map(|j| {
                    let ej = e[j] as f64;
                    ej * ej - ej * (p[j] as f64 - m[j] as f64) / (2.0 * delta)
                })
                .sum()
        })
        .collect()
}
