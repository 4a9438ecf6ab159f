//! The σ view of a diffusion model (Karras et al. 2022): x_σ = x0 + σ z, sampled by ODE / SDE
//! solvers on a decreasing grid of noise levels σ_0 > ... > σ_{N-1} > σ_N (0 or σ_min).
//!
//! A discrete schedule becomes a σ schedule through σ_t = √((1 - ᾱ_t)/ᾱ_t); its models see the
//! variance-preserving input x_σ/√(σ² + 1) at a timestep t(σ). EDM-preconditioned networks see
//! c_in(σ) x_σ at c_noise(σ) (Karras et al. 2022, Table 1). Either way the denoised estimate is
//! affine in (x, model output): D(x, σ) = a(σ) x + b(σ) F, which is what keeps every solver
//! update one fused pass.

use crate::diffusion::Prediction;
use crate::error::Result;
use crate::schedule::{select_timesteps, Schedule, Spacing};
use crate::value_error;

/// EDM's data standard deviation (Karras et al. 2022, section 5).
pub const EDM_SIGMA_DATA: f64 = 0.5;
/// ρ of Karras et al.'s grid (their eq. 5).
pub const KARRAS_RHO: f64 = 7.0;

/// How the N noise levels of a run are placed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SigmaSpacing {
    /// At the spaced timesteps (diffusers' default: `timestep_spacing`, σ interpolated).
    Timesteps,
    /// Karras et al. 2022 eq. 5: (σmax^(1/ρ) + i/(N-1) (σmin^(1/ρ) - σmax^(1/ρ)))^ρ.
    Karras { rho: f64 },
    /// Geometric: evenly spaced in log σ.
    Exponential,
}

/// The last noise level, after the N steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigma {
    /// σ_N = 0: the last step lands on the data.
    Zero,
    /// σ_N = the schedule's smallest σ (diffusers' `final_sigmas_type="sigma_min"`).
    SigmaMin,
}

impl FinalSigma {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "zero" => Ok(FinalSigma::Zero),
            "sigma_min" => Ok(FinalSigma::SigmaMin),
            other => value_error!("final_sigmas_type must be 'zero' or 'sigma_min', got {other:?}"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FinalSigma::Zero => "zero",
            FinalSigma::SigmaMin => "sigma_min",
        }
    }
}

/// How a σ between two trained timesteps becomes the timestep given to a discrete model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepMode {
    /// Linear interpolation in log σ between the neighbouring trained timesteps: fractional t
    /// (k-diffusion's `DiscreteSchedule.sigma_to_t`, diffusers' Euler and Heun schedulers).
    Interpolate,
    /// The trained timestep nearest in log σ (k-diffusion with `quantize=True`, diffusers'
    /// DPMSolverMultistepScheduler, which rounds).
    Nearest,
}

impl TimestepMode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "interpolate" => Ok(TimestepMode::Interpolate),
            "nearest" => Ok(TimestepMode::Nearest),
            other => {
                value_error!("timestep_mode must be 'interpolate' or 'nearest', got {other:?}")
            }
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TimestepMode::Interpolate => "interpolate",
            TimestepMode::Nearest => "nearest",
        }
    }
}

/// Where the timesteps of a discrete schedule's run are placed before σ is read off them:
/// diffusers' Euler / Heun rule (N points, `linspace` unrounded) or its multistep DPM-Solver
/// rule (N + 1 points with the last dropped, rounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepRule {
    Euler,
    Multistep,
}

/// What a model's output means in σ space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Parameterization {
    /// A model of a discrete schedule: called on x/√(σ²+1) at t(σ), predicting ε, x0 or v.
    Discrete(Prediction),
    /// EDM preconditioning of a raw network F (Karras et al. 2022, Table 1):
    /// D = c_skip x + c_out F(c_in x, c_noise), c_noise = ln(σ)/4.
    Edm { sigma_data: f64 },
    /// The model returns D(x, σ) itself and is called with (x, σ).
    Denoised,
}

impl Parameterization {
    /// The factor applied to x before the model sees it.
    pub fn c_in(&self, sigma: f64) -> f64 {
        match *self {
            Parameterization::Discrete(_) => 1.0 / (sigma * sigma + 1.0).sqrt(),
            Parameterization::Edm { sigma_data } => {
                1.0 / (sigma * sigma + sigma_data * sigma_data).sqrt()
            }
            Parameterization::Denoised => 1.0,
        }
    }

    /// (a, b) with D(x, σ) = a x + b F for the model output F at σ.
    pub fn denoised_coefficients(&self, sigma: f64) -> (f64, f64) {
        match *self {
            Parameterization::Discrete(Prediction::Epsilon) => (1.0, -sigma),
            Parameterization::Discrete(Prediction::X0) | Parameterization::Denoised => (0.0, 1.0),
            // x0 = √ᾱ x_vp − √(1−ᾱ) v with x_vp = x/√(σ²+1), ᾱ = 1/(σ²+1).
            Parameterization::Discrete(Prediction::V) => {
                let s2 = sigma * sigma + 1.0;
                (1.0 / s2, -sigma / s2.sqrt())
            }
            Parameterization::Edm { sigma_data } => {
                let (s2, d2) = (sigma * sigma, sigma_data * sigma_data);
                (d2 / (s2 + d2), sigma * sigma_data / (s2 + d2).sqrt())
            }
        }
    }
}

/// σ_t = √((1 - ᾱ_t)/ᾱ_t) of every trained timestep (ascending in t).
pub fn schedule_sigmas(schedule: &Schedule) -> Vec<f64> {
    schedule
        .alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The fractional timestep of σ, linear in log σ between the trained neighbours and clamped to
/// [0, T-1] (k-diffusion's `sigma_to_t`; diffusers' `_sigma_to_t`). `log_sigmas` ascend.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let ls = sigma.max(1e-10).ln();
    // The last index whose log σ is <= ls, kept below n - 1 so that it has an upper neighbour.
    let low = log_sigmas
        .iter()
        .rposition(|&l| l <= ls)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = if hi > lo {
        ((ls - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    low as f64 + w
}

/// σ at a fractional timestep, linear in σ between trained timesteps (diffusers' `np.interp`).
fn sigma_at(t: f64, sigmas: &[f64]) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0];
    }
    if t >= last as f64 {
        return sigmas[last];
    }
    let i = t.floor() as usize;
    let w = t - i as f64;
    sigmas[i] + w * (sigmas[i + 1] - sigmas[i])
}

/// Karras et al. 2022 eq. 5: n levels from σmax down to σmin (the schedule module's grid
/// without its appended 0, ends exact).
pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Vec<f64>> {
    if n <= 1 || sigma_min == sigma_max {
        return Ok(vec![sigma_max; n]);
    }
    let mut s = crate::schedule::karras_sigmas(n, sigma_min, sigma_max, rho)?;
    s.pop();
    exact_ends(&mut s, sigma_min, sigma_max);
    Ok(s)
}

/// n levels evenly spaced in log σ from σmax down to σmin.
pub fn exponential_sigmas(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    let (lo, hi) = (sigma_min.ln(), sigma_max.ln());
    let mut s: Vec<f64> = (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (hi + ramp * (lo - hi)).exp()
        })
        .collect();
    exact_ends(&mut s, sigma_min, sigma_max);
    s
}

/// The ends of a grid exactly σmax and σmin (powf / exp round them by an ulp or so, which
/// could put σ_{N-1} below a final σ_N = σmin).
fn exact_ends(s: &mut [f64], sigma_min: f64, sigma_max: f64) {
    if let Some(first) = s.first_mut() {
        *first = sigma_max;
    }
    if s.len() > 1 {
        s[s.len() - 1] = sigma_min;
    }
}

/// Settings of a σ grid.
#[derive(Clone, Debug, PartialEq)]
pub struct GridConfig {
    pub steps: usize,
    /// diffusers' `timestep_spacing` (linspace | leading | trailing), for discrete schedules.
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub sigmas: SigmaSpacing,
    /// Range of Karras / exponential grids; None: the schedule's (or, without one, EDM's).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// With `sigma_max` unset, the highest level of a Karras / exponential grid on a discrete
    /// schedule is at most this (EDM's 80; None: the schedule's whole range, as diffusers).
    pub sigma_max_cap: Option<f64>,
    pub final_sigma: FinalSigma,
    pub timestep_mode: TimestepMode,
}

impl Default for GridConfig {
    fn default() -> Self {
        GridConfig {
            steps: 25,
            spacing: Spacing::Linspace,
            steps_offset: 0,
            sigmas: SigmaSpacing::Karras { rho: KARRAS_RHO },
            sigma_min: None,
            sigma_max: None,
            sigma_max_cap: None,
            final_sigma: FinalSigma::Zero,
            timestep_mode: TimestepMode::Interpolate,
        }
    }
}

/// EDM's range for networks without a discrete schedule (Karras et al. 2022, Table 1).
pub const EDM_SIGMA_MIN: f64 = 0.002;
pub const EDM_SIGMA_MAX: f64 = 80.0;

/// A run's noise levels: N + 1 values σ_0 > ... > σ_N and the timestep the model is given at
/// each of the first N.
#[derive(Clone, Debug, PartialEq)]
pub struct SigmaGrid {
    pub sigmas: Vec<f64>,
    pub timesteps: Vec<f64>,
    /// log σ of the trained timesteps (ascending), for t(σ) of levels off the grid (churn).
    pub log_sigmas: Vec<f64>,
    pub timestep_mode: TimestepMode,
    pub parameterization: Parameterization,
}

impl SigmaGrid {
    /// The grid of a discrete schedule, placed as diffusers' schedulers of `rule` place it.
    pub fn for_schedule(
        schedule: &Schedule,
        rule: TimestepRule,
        config: &GridConfig,
        prediction: Prediction,
    ) -> Result<Self> {
        let n = config.steps;
        if n == 0 {
            value_error!("steps must be >= 1, got 0");
        }
        let train = schedule_sigmas(schedule);
        if train.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            value_error!(
                "the schedule has a timestep with ᾱ = 0 or 1 (σ = ∞ or 0): σ-space samplers need 0 < ᾱ_t < 1 (zero-terminal-SNR schedules: use DDIM or DDPM)"
            );
        }
        let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        let big_t = schedule.len();
        let spaced: Vec<f64> = match (rule, &config.spacing) {
            (TimestepRule::Euler, Spacing::Linspace) => (0..n)
                .rev()
                .map(|i| {
                    // numpy's linspace: i · step, the last point exactly the end.
                    if n == 1 {
                        0.0
                    } else if i == n - 1 {
                        (big_t - 1) as f64
                    } else {
                        i as f64 * ((big_t - 1) as f64 / (n - 1) as f64)
                    }
                })
                .collect(),
            (TimestepRule::Euler, Spacing::Leading | Spacing::Trailing) => {
                select_timesteps(big_t, Some(n), &config.spacing, config.steps_offset)?
                    .into_iter()
                    .map(|t| t as f64)
                    .collect()
            }
            (TimestepRule::Multistep, Spacing::Linspace) => (0..=n)
                .rev()
                .take(n)
                .map(|i| {
                    let t = if i == n {
                        (big_t - 1) as f64
                    } else {
                        i as f64 * ((big_t - 1) as f64 / n as f64)
                    };
                    t.round_ties_even()
                })
                .collect(),
            (TimestepRule::Multistep, Spacing::Leading) => {
                let ratio = big_t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + config.steps_offset as f64)
                    .collect()
            }
            (TimestepRule::Multistep, Spacing::Trailing) => {
                select_timesteps(big_t, Some(n), &Spacing::Trailing, 0)?
                    .into_iter()
                    .map(|t| t as f64)
                    .collect()
            }
            (_, other) => value_error!(
                "σ-space samplers take spacing 'linspace', 'leading' or 'trailing', got {:?}",
                other.name()
            ),
        };
        if let Some(bad) = spaced.iter().find(|&&t| t < 0.0 || t > (big_t - 1) as f64) {
            value_error!(
                "{n} steps with spacing {:?} and steps_offset {} give timestep {bad}, outside [0, {}]",
                config.spacing.name(),
                config.steps_offset,
                big_t - 1
            );
        }
        // With nearest timesteps, levels placed at the timesteps sit exactly on trained ones.
        let spaced: Vec<f64> = match (config.timestep_mode, config.sigmas) {
            (TimestepMode::Nearest, SigmaSpacing::Timesteps) => {
                spaced.iter().map(|t| t.round_ties_even()).collect()
            }
            _ => spaced,
        };
        let at_steps: Vec<f64> = spaced.iter().map(|&t| sigma_at(t, &train)).collect();
        let (lo, hi) = match rule {
            // diffusers' multistep scheduler spans the whole trained range; Euler / Heun the
            // spaced levels'.
            TimestepRule::Multistep => (train[0], train[big_t - 1]),
            TimestepRule::Euler => (at_steps[n - 1], at_steps[0]),
        };
        let hi = match config.sigma_max_cap {
            Some(cap) => hi.min(cap),
            None => hi,
        };
        let (lo, hi) = (
            config.sigma_min.unwrap_or(lo),
            config.sigma_max.unwrap_or(hi),
        );
        let (mut sigmas, mut timesteps) = match config.sigmas {
            SigmaSpacing::Timesteps => (at_steps, spaced),
            SigmaSpacing::Karras { rho } => {
                check_range(lo, hi, Some(rho))?;
                let s = karras_sigmas(n, lo, hi, rho)?;
                let t = s.iter().map(|&v| sigma_to_t(v, &log_sigmas)).collect();
                (s, t)
            }
            SigmaSpacing::Exponential => {
                check_range(lo, hi, None)?;
                let s = exponential_sigmas(n, lo, hi);
                let t = s.iter().map(|&v| sigma_to_t(v, &log_sigmas)).collect();
                (s, t)
            }
        };
        if config.timestep_mode == TimestepMode::Nearest {
            for t in &mut timesteps {
                *t = t.round_ties_even();
            }
        }
        sigmas.push(match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train[0],
        });
        let grid = SigmaGrid {
            sigmas,
            timesteps,
            log_sigmas,
            timestep_mode: config.timestep_mode,
            parameterization: Parameterization::Discrete(prediction),
        };
        grid.check()?;
        Ok(grid)
    }

    /// A grid for a network without a discrete schedule (EDM-preconditioned or returning D
    /// itself): Karras or exponential levels between σmin and σmax (EDM's 0.002 and 80 by
    /// default); the model's timestep is c_noise = ln(σ)/4 (EDM) or σ (denoised).
    pub fn continuous(config: &GridConfig, parameterization: Parameterization) -> Result<Self> {
        let n = config.steps;
        if n == 0 {
            value_error!("steps must be >= 1, got 0");
        }
        if matches!(parameterization, Parameterization::Discrete(_)) {
            value_error!("a discrete model's σ grid needs its schedule");
        }
        let lo = config.sigma_min.unwrap_or(EDM_SIGMA_MIN);
        let hi = config.sigma_max.unwrap_or(EDM_SIGMA_MAX);
        let mut sigmas = match config.sigmas {
            SigmaSpacing::Karras { rho } => {
                check_range(lo, hi, Some(rho))?;
                karras_sigmas(n, lo, hi, rho)?
            }
            SigmaSpacing::Exponential => {
                check_range(lo, hi, None)?;
                exponential_sigmas(n, lo, hi)
            }
            SigmaSpacing::Timesteps => value_error!(
                "sigmas='timesteps' places levels at a discrete schedule's timesteps: pass a schedule, or use 'karras' / 'exponential'"
            ),
        };
        sigmas.push(match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => lo,
        });
        let mut grid = SigmaGrid {
            timesteps: Vec::new(),
            sigmas,
            log_sigmas: Vec::new(),
            timestep_mode: config.timestep_mode,
            parameterization,
        };
        grid.timesteps = grid.sigmas[..n]
            .iter()
            .map(|&s| grid.timestep_of(s))
            .collect();
        grid.check()?;
        Ok(grid)
    }

    /// An explicit decreasing list of N + 1 levels (the last may be 0).
    pub fn explicit(
        sigmas: Vec<f64>,
        schedule: Option<&Schedule>,
        timestep_mode: TimestepMode,
        parameterization: Parameterization,
    ) -> Result<Self> {
        if sigmas.len() < 2 {
            value_error!(
                "sigmas needs at least 2 levels (N + 1 for N steps), got {}",
                sigmas.len()
            );
        }
        let log_sigmas = match (schedule, parameterization) {
            (Some(s), Parameterization::Discrete(_)) => {
                schedule_sigmas(s).iter().map(|v| v.ln()).collect()
            }
            (None, Parameterization::Discrete(_)) => {
                value_error!("a discrete model's σ grid needs its schedule")
            }
            _ => Vec::new(),
        };
        let mut grid = SigmaGrid {
            timesteps: Vec::new(),
            sigmas,
            log_sigmas,
            timestep_mode,
            parameterization,
        };
        let n = grid.steps();
        grid.timesteps = grid.sigmas[..n]
            .iter()
            .map(|&s| grid.timestep_of(s))
            .collect();
        grid.check()?;
        Ok(grid)
    }

    /// The number of steps N.
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The timestep a model is given at σ (levels off the grid, such as a churned σ̂).
    pub fn timestep_of(&self, sigma: f64) -> f64 {
        match self.parameterization {
            Parameterization::Discrete(_) => {
                let t = sigma_to_t(sigma, &self.log_sigmas);
                match self.timestep_mode {
                    TimestepMode::Interpolate => t,
                    TimestepMode::Nearest => t.round_ties_even(),
                }
            }
            Parameterization::Edm { .. } => sigma.ln() / 4.0,
            Parameterization::Denoised => sigma,
        }
    }

    /// D(x, σ) from one call of `denoiser` at σ: the model sees c_in(σ) x at the timestep of
    /// σ, and D = a x + b F of its output (the first C channels of a 2C-channel output).
    pub fn denoise(
        &self,
        denoiser: &mut dyn crate::sample::Denoiser,
        x: &[f32],
        shape: &[usize],
        sigma: f64,
    ) -> Result<Vec<f32>> {
        let p = self.parameterization;
        let c_in = p.c_in(sigma) as f32;
        let input: Vec<f32> = x.iter().map(|&v| v * c_in).collect();
        let batch = shape.first().copied().unwrap_or(0);
        let out =
            denoiser.predict_continuous(&input, shape, &vec![self.timestep_of(sigma); batch])?;
        crate::sample::engine::check_output(&out, shape)?;
        let (row, stride) = crate::sample::model_output_layout(shape, &out.shape)?;
        let (a, b) = p.denoised_coefficients(sigma);
        let (a, b) = (a as f32, b as f32);
        let mut d = vec![0f32; x.len()];
        for r in 0..batch {
            for j in 0..row {
                d[r * row + j] = a * x[r * row + j] + b * out.data[r * stride + j];
            }
        }
        Ok(d)
    }

    fn check(&self) -> Result<()> {
        let s = &self.sigmas;
        let n = s.len() - 1;
        if s.iter().any(|v| !v.is_finite() || *v < 0.0) || s[..n].iter().any(|&v| v <= 0.0) {
            value_error!("σ levels must be finite and positive (the last may be 0), got {s:?}");
        }
        if s.windows(2).any(|w| w[1] > w[0]) {
            value_error!("σ levels must not increase, got {s:?}");
        }
        Ok(())
    }
}

fn check_range(lo: f64, hi: f64, rho: Option<f64>) -> Result<()> {
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi >= lo) {
        value_error!(
            "sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max, got {lo} and {hi}"
        );
    }
    if let Some(r) = rho {
        if !(r.is_finite() && r > 0.0) {
            value_error!("rho must be positive and finite, got {r}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_to_t_inverts_the_trained_levels_and_interpolates_in_log_sigma() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
        let sig = schedule_sigmas(&sched);
        let logs: Vec<f64> = sig.iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 17, 500, 998, 999] {
            assert!((sigma_to_t(sig[t], &logs) - t as f64).abs() < 1e-9);
        }
        let mid = ((logs[10] + logs[11]) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 10.5).abs() < 1e-9);
        assert_eq!(sigma_to_t(1e-9, &logs), 0.0);
        assert_eq!(sigma_to_t(1e9, &logs), 999.0);
    }

    #[test]
    fn discrete_grids_end_where_asked_and_decrease() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
        let sig = schedule_sigmas(&sched);
        for rule in [TimestepRule::Euler, TimestepRule::Multistep] {
            for sigmas in [
                SigmaSpacing::Timesteps,
                SigmaSpacing::Karras { rho: 7.0 },
                SigmaSpacing::Exponential,
            ] {
                for final_sigma in [FinalSigma::Zero, FinalSigma::SigmaMin] {
                    let cfg = GridConfig {
                        steps: 10,
                        sigmas,
                        final_sigma,
                        ..Default::default()
                    };
                    let g =
                        SigmaGrid::for_schedule(&sched, rule, &cfg, Prediction::Epsilon).unwrap();
                    assert_eq!(g.sigmas.len(), 11);
                    assert_eq!(g.timesteps.len(), 10);
                    let last = *g.sigmas.last().unwrap();
                    match final_sigma {
                        FinalSigma::Zero => assert_eq!(last, 0.0),
                        FinalSigma::SigmaMin => assert_eq!(last, sig[0]),
                    }
                    assert!(g.sigmas.windows(2).all(|w| w[1] <= w[0]));
                }
            }
        }
    }

    #[test]
    fn denoised_coefficients_recover_x0_for_every_parameterization() {
        // x = x0 + σ z; each model output is built from (x0, z) by its own definition.
        let (x0, z, sigma) = (0.7f64, -1.3f64, 2.5f64);
        let x = x0 + sigma * z;
        let abar = 1.0 / (1.0 + sigma * sigma);
        let v = abar.sqrt() * z - (1.0 - abar).sqrt() * x0;
        for (p, f) in [
            (Parameterization::Discrete(Prediction::Epsilon), z),
            (Parameterization::Discrete(Prediction::X0), x0),
            (Parameterization::Discrete(Prediction::V), v),
            (Parameterization::Denoised, x0),
        ] {
            let (a, b) = p.denoised_coefficients(sigma);
            assert!((a * x + b * f - x0).abs() < 1e-12, "{p:?}");
        }
        // EDM: F = (x0 - c_skip x)/c_out is the network's ideal output.
        let p = Parameterization::Edm { sigma_data: 0.5 };
        let (a, b) = p.denoised_coefficients(sigma);
        let f = (x0 - a * x) / b;
        assert!((a * x + b * f - x0).abs() < 1e-12);
        assert!((a - 0.25 / (sigma * sigma + 0.25)).abs() < 1e-15);
    }

    #[test]
    fn bad_grids_are_errors() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
        let cfg = GridConfig {
            steps: 0,
            ..Default::default()
        };
        assert!(
            SigmaGrid::for_schedule(&sched, TimestepRule::Euler, &cfg, Prediction::Epsilon)
                .is_err()
        );
        assert!(SigmaGrid::explicit(
            vec![1.0, 2.0],
            None,
            TimestepMode::Interpolate,
            Parameterization::Denoised
        )
        .is_err());
        assert!(SigmaGrid::explicit(
            vec![1.0],
            None,
            TimestepMode::Interpolate,
            Parameterization::Denoised
        )
        .is_err());
        let cfg = GridConfig {
            sigma_min: Some(-1.0),
            ..Default::default()
        };
        assert!(SigmaGrid::continuous(&cfg, Parameterization::Denoised).is_err());
    }
}
