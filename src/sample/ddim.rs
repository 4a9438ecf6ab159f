//! DDIM (Song et al. 2020): the non-Markovian process whose η interpolates between the
//! deterministic implicit model (η = 0) and DDPM's posterior variance (η = 1).

use super::{base_row, position_of, positions, Sampler, X0Processing};
use crate::diffusion::{eps_coefficients, Prediction};
use crate::error::Result;
use crate::kernels::RowStep;
use crate::schedule::{select_timesteps, Schedule, Spacing};
use crate::value_error;

/// Settings of a DDIM sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimConfig {
    pub steps: usize,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub eta: f64,
    pub prediction: Prediction,
    pub x0_processing: X0Processing,
    /// ᾱ after the last step: 1 (true) or ᾱ_0 (false), as diffusers' `set_alpha_to_one`.
    pub set_alpha_to_one: bool,
    /// Re-derive ε from the clipped x0 (OpenAI; diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            steps: 50,
            spacing: Spacing::Leading,
            steps_offset: 0,
            eta: 0.0,
            prediction: Prediction::Epsilon,
            x0_processing: X0Processing::None,
            set_alpha_to_one: true,
            use_clipped_model_output: false,
        }
    }
}

/// A DDIM sampler bound to a schedule. The previous timestep of each step is the next entry of
/// its own list, for every spacing (diffusers uses `t - T//N`, wrong for linspace/trailing:
/// issues #9261, #11347).
#[derive(Clone, Debug)]
pub struct Ddim {
    pub schedule: Schedule,
    pub config: DdimConfig,
    timesteps: Vec<i64>,
    position: Vec<Option<usize>>,
}

impl Ddim {
    pub fn new(schedule: Schedule, config: DdimConfig) -> Result<Self> {
        if !(config.eta.is_finite() && config.eta >= 0.0) {
            value_error!("eta must be finite and >= 0, got {}", config.eta);
        }
        let timesteps = select_timesteps(
            schedule.len(),
            Some(config.steps),
            &config.spacing,
            config.steps_offset,
        )?;
        let position = positions(schedule.len(), &timesteps);
        Ok(Ddim {
            schedule,
            config,
            timesteps,
            position,
        })
    }

    /// ᾱ after the final step.
    pub fn final_alpha_bar(&self) -> f64 {
        if self.config.set_alpha_to_one {
            1.0
        } else {
            self.schedule.alphas_cumprod[0]
        }
    }

    fn alpha_bar_prev(&self, p: usize) -> f64 {
        match self.timesteps.get(p + 1) {
            Some(&t) => self.schedule.alphas_cumprod[t as usize],
            None => self.final_alpha_bar(),
        }
    }

    /// σ_t² of DDIM eq. 16 with η: η² (1-ᾱ_prev)/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_prev).
    pub fn variance(&self, abar: f64, abar_prev: f64) -> f64 {
        (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    }

    /// Rows of one inversion step (η = 0 run backwards): from the level ᾱ_cur of x to the level
    /// of timestep `target`, using the model output evaluated at timestep `eval`.
    pub fn inversion_rows(
        &self,
        batch: usize,
        alpha_bar_current: f64,
        eval: i64,
        target: i64,
    ) -> Vec<RowStep> {
        let abar_eval = self.schedule.alphas_cumprod[eval as usize];
        let abar_target = self.schedule.alphas_cumprod[target as usize];
        let (ex, em) = eps_coefficients(self.config.prediction, abar_eval);
        let (sc, nc) = (alpha_bar_current.sqrt(), (1.0 - alpha_bar_current).sqrt());
        let mut c = base_row(self.config.prediction, abar_eval, eval);
        // ε̂ from the model; x0̂ = (x - sqrt(1-ᾱ_cur) ε̂)/sqrt(ᾱ_cur); x' = sqrt(ᾱ') x0̂ + sqrt(1-ᾱ') ε̂.
        c.x0_from_x = ((1.0 - nc * ex) / sc) as f32;
        c.x0_from_model = (-nc * em / sc) as f32;
        c.prev_from_x0 = abar_target.sqrt() as f32;
        c.prev_from_x = ((1.0 - abar_target).sqrt() * ex) as f32;
        c.prev_from_model = ((1.0 - abar_target).sqrt() * em) as f32;
        vec![c; batch]
    }
}

impl Sampler for Ddim {
    fn schedule(&self) -> &Schedule {
        &self.schedule
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

    fn row_steps(&self, t: &[i64]) -> Result<Vec<RowStep>> {
        super::rows_with_repeats(t, |ti| {
            let p = position_of(&self.position, &self.timesteps, ti)?;
            let abar = self.schedule.alphas_cumprod[ti as usize];
            let abar_prev = self.alpha_bar_prev(p);
            let sigma = self.config.eta * self.variance(abar, abar_prev).max(0.0).sqrt();
            // DDIM eq. 12: x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z.
            let direction = (1.0 - abar_prev - sigma * sigma).max(0.0).sqrt();
            let mut c = base_row(self.config.prediction, abar, ti);
            let rederive =
                self.config.use_clipped_model_output && !self.config.x0_processing.is_none();
            if rederive {
                // ε = (x - sqrt(ᾱ) x0c)/sqrt(1-ᾱ) from the clipped x0.
                let s = (1.0 - abar).sqrt();
                c.prev_from_x0 = (abar_prev.sqrt() - direction * abar.sqrt() / s) as f32;
                c.prev_from_x = (direction / s) as f32;
            } else {
                let (ex, em) = eps_coefficients(self.config.prediction, abar);
                c.prev_from_x0 = abar_prev.sqrt() as f32;
                c.prev_from_x = (direction * ex) as f32;
                c.prev_from_model = (direction * em) as f32;
            }
            c.noise_std = sigma as f32;
            Ok(c)
        })
    }
}
