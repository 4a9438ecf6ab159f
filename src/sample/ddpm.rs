//! DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), over all T timesteps or a strided
//! subset (Nichol & Dhariwal 2021, sec. 4: the respaced process with β'_i = 1 - ᾱ_τi/ᾱ_τi-1).

use super::{base_row, position_of, positions, Sampler, X0Processing};
use crate::diffusion::Prediction;
use crate::error::Result;
use crate::kernels::RowStep;
use crate::schedule::{select_timesteps, Schedule, Spacing, VARIANCE_FLOOR};
use crate::value_error;

/// The variance of p(x_{t-1} | x_t).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    /// σ² = β̃_t, the posterior variance (the lower bound of Ho et al.).
    FixedSmall,
    /// σ² = β_t (the upper bound; the seed's "DDPM (σ̂)").
    FixedLarge,
    /// Interpolated in log space between β̃_t and β_t by the model's second output half
    /// (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

impl VarianceType {
    /// Parses `fixed_small | fixed_large | learned_range`; diffusers' `*_log` variants give the
    /// same σ and are accepted.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "fixed_small" | "fixed_small_log" => Ok(VarianceType::FixedSmall),
            "fixed_large" | "fixed_large_log" => Ok(VarianceType::FixedLarge),
            "learned_range" => Ok(VarianceType::LearnedRange),
            other => value_error!(
                "unknown variance type {other:?}: expected one of 'fixed_small', 'fixed_large', 'learned_range'"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VarianceType::FixedSmall => "fixed_small",
            VarianceType::FixedLarge => "fixed_large",
            VarianceType::LearnedRange => "learned_range",
        }
    }
}

/// Settings of a DDPM sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmConfig {
    /// None: every training timestep.
    pub steps: Option<usize>,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub prediction: Prediction,
    pub variance: VarianceType,
    pub x0_processing: X0Processing,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            steps: None,
            spacing: Spacing::Leading,
            steps_offset: 0,
            prediction: Prediction::Epsilon,
            variance: VarianceType::FixedSmall,
            x0_processing: X0Processing::None,
        }
    }
}

/// A DDPM sampler bound to a schedule.
#[derive(Clone, Debug)]
pub struct Ddpm {
    pub schedule: Schedule,
    pub config: DdpmConfig,
    timesteps: Vec<i64>,
    position: Vec<Option<usize>>,
}

impl Ddpm {
    pub fn new(schedule: Schedule, config: DdpmConfig) -> Result<Self> {
        let timesteps = select_timesteps(
            schedule.len(),
            config.steps,
            &config.spacing,
            config.steps_offset,
        )?;
        let position = positions(schedule.len(), &timesteps);
        Ok(Ddpm {
            schedule,
            config,
            timesteps,
            position,
        })
    }

    /// ᾱ of the level a step at list position `p` moves to (1 after the last step).
    fn alpha_bar_prev(&self, p: usize) -> f64 {
        match self.timesteps.get(p + 1) {
            Some(&t) => self.schedule.alphas_cumprod[t as usize],
            None => 1.0,
        }
    }

    /// (β'_t, β̃'_t) of the respaced process at list position p.
    pub fn step_variances(&self, p: usize) -> (f64, f64) {
        let abar = self.schedule.alphas_cumprod[self.timesteps[p] as usize];
        let abar_prev = self.alpha_bar_prev(p);
        let beta = 1.0 - abar / abar_prev;
        let posterior = (beta * (1.0 - abar_prev) / (1.0 - abar)).max(VARIANCE_FLOOR);
        (beta, posterior)
    }
}

impl Sampler for Ddpm {
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    /// The ancestral form (Dhariwal & Nichol 2021, algorithm 1): μ' = μ + s Σ ∇ log f. With
    /// μ = (x − β'/√(1−ᾱ) ε)/√α' on the (respaced) process, that is ε' = ε − k s ∇ with
    /// k = Σ √α' √(1−ᾱ) / β'.
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64> {
        let p = position_of(&self.position, &self.timesteps, t)?;
        let (beta, posterior) = self.step_variances(p);
        let sigma2 = match self.config.variance {
            VarianceType::FixedSmall => posterior,
            VarianceType::FixedLarge => beta,
            VarianceType::LearnedRange => crate::value_error!(
                "classifier guidance with learned variances is not supported by DDPM: use fixed_small or fixed_large, or DDIM"
            ),
        };
        let abar = self.schedule.alphas_cumprod[t as usize];
        Ok(sigma2 * (1.0 - beta).sqrt() * (1.0 - abar).sqrt() / beta)
    }
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }
    fn prediction(&self) -> Prediction {
        self.config.prediction
    }
    fn x0_processing(&self) -> X0Processing {
        self.config.x0_processing
    }
    fn uses_learned_variance(&self) -> bool {
        self.config.variance == VarianceType::LearnedRange
    }

    fn row_steps(&self, t: &[i64]) -> Result<Vec<RowStep>> {
        super::rows_with_repeats(t, |ti| {
            let p = position_of(&self.position, &self.timesteps, ti)?;
            let abar = self.schedule.alphas_cumprod[ti as usize];
            let abar_prev = self.alpha_bar_prev(p);
            let (beta, posterior) = self.step_variances(p);
            let mut c = base_row(self.config.prediction, abar, ti);
            // Posterior mean, DDPM eq. 7, on the respaced process.
            c.prev_from_x0 = (abar_prev.sqrt() * beta / (1.0 - abar)) as f32;
            c.prev_from_x = ((1.0 - beta).sqrt() * (1.0 - abar_prev) / (1.0 - abar)) as f32;
            // No noise at the final step (OpenAI's `nonzero_mask`; diffusers' `t > 0`).
            let last = p + 1 == self.timesteps.len();
            if !last {
                match self.config.variance {
                    VarianceType::FixedSmall => c.noise_std = posterior.sqrt() as f32,
                    VarianceType::FixedLarge => c.noise_std = beta.sqrt() as f32,
                    VarianceType::LearnedRange => {
                        c.learned_log_variance = Some((posterior.ln() as f32, beta.ln() as f32))
                    }
                }
            }
            Ok(c)
        })
    }
}
