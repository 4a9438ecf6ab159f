//! Error-controlled DPM-Solver (Lu et al. 2022, section 4.3 and Algorithm 4 / 5; the
//! arrangement of k-diffusion's `dpm_adaptive`): in λ = −ln σ, each step computes a lower-order
//! and a higher-order DPM-Solver update (1 and 2, or 2 and 3), compares them against
//! max(atol, rtol · |x|), and a PID controller on that error sets the next step size. Written
//! with the noise prediction ε(x, λ) = (x − D(x, σ))/σ, as the DPM-Solver paper's solvers are.

use super::add_noise;
use crate::error::{Error, Result};
use crate::kernels::Noise;
use crate::sample::denoiser::LoopHooks;
use crate::sample::sigma::SigmaGrid;
use crate::sample::Denoiser;
use crate::value_error;

/// Settings of an adaptive run (defaults: k-diffusion's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
    pub order: u8,
    pub rtol: f64,
    pub atol: f64,
    /// The first step size in λ.
    pub h_init: f64,
    pub pcoeff: f64,
    pub icoeff: f64,
    pub dcoeff: f64,
    /// A step is accepted when the controller's factor is at least this.
    pub accept_safety: f64,
    /// Ancestral noise after each accepted step (0: the ODE).
    pub eta: f64,
    pub s_noise: f64,
    /// One more model call at the end: x ← D(x, σ_min).
    pub denoise_to_zero: bool,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            sigma_min: 0.002,
            sigma_max: 80.0,
            order: 3,
            rtol: 0.05,
            atol: 0.0078,
            h_init: 0.05,
            pcoeff: 0.0,
            icoeff: 1.0,
            dcoeff: 0.0,
            accept_safety: 0.81,
            eta: 0.0,
            s_noise: 1.0,
            denoise_to_zero: true,
        }
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveInfo {
    /// Model evaluations.
    pub nfe: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// The most steps (accepted or not) before a run is abandoned: a controller that cannot meet
/// its tolerance would otherwise loop for ever.
const MAX_STEPS: usize = 10_000;

impl AdaptiveConfig {
    pub fn check(&self) -> Result<()> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.sigma_min)
            && positive(self.sigma_max)
            && self.sigma_min < self.sigma_max)
        {
            value_error!(
                "sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {} and {}",
                self.sigma_min,
                self.sigma_max
            );
        }
        if self.order != 2 && self.order != 3 {
            value_error!("order must be 2 or 3, got {}", self.order);
        }
        if !(self.rtol.is_finite() && self.rtol >= 0.0 && self.atol.is_finite() && self.atol >= 0.0)
            || self.rtol + self.atol == 0.0
        {
            value_error!(
                "rtol and atol must be finite, >= 0 and not both 0, got {} and {}",
                self.rtol,
                self.atol
            );
        }
        if !positive(self.h_init) {
            value_error!("h_init must be positive, got {}", self.h_init);
        }
        if !(self.accept_safety.is_finite() && self.accept_safety > 0.0) {
            value_error!("accept_safety must be positive, got {}", self.accept_safety);
        }
        if !(self.eta.is_finite()
            && self.eta >= 0.0
            && self.s_noise.is_finite()
            && self.s_noise >= 0.0)
        {
            value_error!(
                "eta and s_noise must be finite and >= 0, got {} and {}",
                self.eta,
                self.s_noise
            );
        }
        for (name, v) in [
            ("pcoeff", self.pcoeff),
            ("icoeff", self.icoeff),
            ("dcoeff", self.dcoeff),
        ] {
            if !v.is_finite() {
                value_error!("{name} must be finite, got {v}");
            }
        }
        Ok(())
    }
}

/// Söderlind's PID step-size controller on the inverse errors, with an arctan limiter.
struct Pid {
    h: f64,
    b: [f64; 3],
    accept_safety: f64,
    inverse_errors: Option<[f64; 3]>,
}

impl Pid {
    fn new(c: &AdaptiveConfig, order: f64) -> Self {
        Pid {
            h: c.h_init,
            b: [
                (c.pcoeff + c.icoeff + c.dcoeff) / order,
                -(c.pcoeff + 2.0 * c.dcoeff) / order,
                c.dcoeff / order,
            ],
            accept_safety: c.accept_safety,
            inverse_errors: None,
        }
    }

    /// Scales h by the controller's factor; whether the step that gave `error` is accepted.
    fn propose(&mut self, error: f64) -> bool {
        let inv = 1.0 / (error + 1e-8);
        let e = self.inverse_errors.get_or_insert([inv; 3]);
        e[0] = inv;
        let factor = e[0].powf(self.b[0]) * e[1].powf(self.b[1]) * e[2].powf(self.b[2]);
        let factor = 1.0 + (factor - 1.0).atan();
        let accept = factor >= self.accept_safety;
        if accept {
            e[2] = e[1];
            e[1] = e[0];
        }
        self.h *= factor;
        accept
    }
}

/// The model seen through the grid's parameterisation, counting its calls.
struct Model<'a> {
    grid: &'a SigmaGrid,
    denoiser: &'a mut dyn Denoiser,
    shape: &'a [usize],
    nfe: usize,
}

impl Model<'_> {
    /// ε(x, σ) = (x − D(x, σ))/σ.
    fn eps(&mut self, x: &[f32], sigma: f64) -> Result<Vec<f32>> {
        let d = self.denoised(x, sigma)?;
        let inv = (1.0 / sigma) as f32;
        Ok(x.iter().zip(&d).map(|(&a, &b)| (a - b) * inv).collect())
    }

    fn denoised(&mut self, x: &[f32], sigma: f64) -> Result<Vec<f32>> {
        let d = self.grid.denoise(self.denoiser, x, self.shape, sigma)?;
        self.nfe += 1;
        Ok(d)
    }
}

fn sigma_of(lambda: f64) -> f64 {
    (-lambda).exp()
}

/// out = x − σ(s) expm1(h) ε + Σ c_i δ_i, elementwise.
fn combine(x: &[f32], terms: &[(f64, &[f32])]) -> Vec<f32> {
    let mut out = x.to_vec();
    for (c, v) in terms {
        let c = *c as f32;
        for (o, &e) in out.iter_mut().zip(v.iter()) {
            *o += c * e;
        }
    }
    out
}

/// DPM-Solver-2 from λ to λ + h with its intermediate point at r1; returns (x', ε at r1).
fn dpm_solver_2(
    m: &mut Model<'_>,
    x: &[f32],
    eps: &[f32],
    lambda: f64,
    h: f64,
    r1: f64,
) -> Result<Vec<f32>> {
    let s1 = lambda + r1 * h;
    let u1 = combine(x, &[(-sigma_of(s1) * (r1 * h).exp_m1(), eps)]);
    let eps_r1 = m.eps(&u1, sigma_of(s1))?;
    let diff: Vec<f32> = eps_r1.iter().zip(eps).map(|(a, b)| a - b).collect();
    let st = sigma_of(lambda + h);
    Ok(combine(
        x,
        &[
            (-st * h.exp_m1(), eps),
            (-st / (2.0 * r1) * h.exp_m1(), &diff),
        ],
    ))
}

/// DPM-Solver-3 (r1 = 1/3, r2 = 2/3) and, from its first intermediate point, DPM-Solver-2 with
/// r1 = 1/3: the pair of DPM-Solver-23.
fn dpm_solver_23(
    m: &mut Model<'_>,
    x: &[f32],
    eps: &[f32],
    lambda: f64,
    h: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (r1, r2) = (1.0 / 3.0, 2.0 / 3.0);
    let (s1, s2) = (lambda + r1 * h, lambda + r2 * h);
    let u1 = combine(x, &[(-sigma_of(s1) * (r1 * h).exp_m1(), eps)]);
    let eps_r1 = m.eps(&u1, sigma_of(s1))?;
    let d1: Vec<f32> = eps_r1.iter().zip(eps).map(|(a, b)| a - b).collect();
    let st = sigma_of(lambda + h);
    let low = combine(
        x,
        &[
            (-st * h.exp_m1(), eps),
            (-st / (2.0 * r1) * h.exp_m1(), &d1),
        ],
    );
    let u2 = combine(
        x,
        &[
            (-sigma_of(s2) * (r2 * h).exp_m1(), eps),
            (
                -sigma_of(s2) * (r2 / r1) * ((r2 * h).exp_m1() / (r2 * h) - 1.0),
                &d1,
            ),
        ],
    );
    let eps_r2 = m.eps(&u2, sigma_of(s2))?;
    let d2: Vec<f32> = eps_r2.iter().zip(eps).map(|(a, b)| a - b).collect();
    let high = combine(
        x,
        &[
            (-st * h.exp_m1(), eps),
            (-st / r2 * (h.exp_m1() / h - 1.0), &d2),
        ],
    );
    Ok((low, high))
}

/// Integrates from x at σ_max down to σ_min (then D(x, σ_min) with `denoise_to_zero`).
/// `hooks.after_sigma_step` runs after every accepted step.
#[allow(clippy::too_many_arguments)]
pub fn sample_adaptive(
    config: &AdaptiveConfig,
    grid: &SigmaGrid,
    denoiser: &mut dyn Denoiser,
    x: Vec<f32>,
    shape: &[usize],
    seed: u64,
    check_finite: bool,
    hooks: &mut dyn LoopHooks,
) -> Result<(Vec<f32>, AdaptiveInfo)> {
    config.check()?;
    if x.len() != shape.iter().product::<usize>() || shape.is_empty() {
        crate::shape_error!("x has {} elements but the shape is {shape:?}", x.len());
    }
    let n = x.len();
    let mut m = Model {
        grid,
        denoiser,
        shape,
        nfe: 0,
    };
    let order = if config.eta > 0.0 {
        1.5
    } else {
        config.order as f64
    };
    let mut pid = Pid::new(config, order);
    let (mut lambda, lambda_end) = (-config.sigma_max.ln(), -config.sigma_min.ln());
    let mut x = x;
    let mut x_prev = x.clone();
    let mut info = AdaptiveInfo::default();
    let mut steps = 0;
    while lambda < lambda_end - 1e-5 {
        steps += 1;
        if steps > MAX_STEPS {
            value_error!(
                "the adaptive solver took {MAX_STEPS} steps without reaching sigma_min (rtol={}, atol={}): loosen the tolerances",
                config.rtol,
                config.atol
            );
        }
        let target = (lambda + pid.h).min(lambda_end);
        let (s, t) = (sigma_of(lambda), sigma_of(target));
        // With η > 0 the deterministic part goes to σ_down, then noise σ_up (ancestral split).
        let (down, up) = if config.eta > 0.0 {
            let up = (config.eta * (t * t * (s * s - t * t) / (s * s)).max(0.0).sqrt()).min(t);
            ((t * t - up * up).max(0.0).sqrt(), up)
        } else {
            (t, 0.0)
        };
        let h = -down.ln() - lambda;
        let eps = m.eps(&x, s)?;
        let (low, high) = if config.order == 2 {
            let first = combine(&x, &[(-down * h.exp_m1(), &eps)]);
            (first, dpm_solver_2(&mut m, &x, &eps, lambda, h, 0.5)?)
        } else {
            dpm_solver_23(&mut m, &x, &eps, lambda, h)?
        };
        let mut sum = 0.0f64;
        for j in 0..n {
            let scale = (config.rtol * (low[j].abs().max(x_prev[j].abs()) as f64)).max(config.atol);
            let e = (low[j] - high[j]) as f64 / scale;
            sum += e * e;
        }
        let error = (sum / n as f64).sqrt();
        if !error.is_finite() {
            if check_finite {
                return Err(Error::NonFiniteSigma {
                    step: info.accepted,
                    sigma: s,
                });
            }
            value_error!("the adaptive solver's error estimate is not finite at σ = {s}");
        }
        if pid.propose(error) {
            x_prev = low;
            x = high;
            if up > 0.0 {
                add_noise(
                    &mut x,
                    up * config.s_noise,
                    Noise::Seeded(seed),
                    super::SIGMA_NOISE_STREAM + info.accepted as u64,
                );
            }
            lambda = target;
            hooks.after_sigma_step(info.accepted, t, &x, &[])?;
            info.accepted += 1;
        } else {
            info.rejected += 1;
        }
    }
    if config.denoise_to_zero {
        x = m.denoised(&x, sigma_of(lambda))?;
    }
    if check_finite && x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFiniteSigma {
            step: info.accepted,
            sigma: sigma_of(lambda),
        });
    }
    info.nfe = m.nfe;
    Ok((x, info))
}
