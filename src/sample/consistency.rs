//! Consistency sampling (Song et al. 2023, Algorithm 1): one evaluation of the consistency
//! model f(x, σ) maps noise at σ_max to data; each further level σ_k re-noises the sample to
//! x + √(σ_k² − σ_min²) z and maps it back, ending at σ_min (so the last step adds no noise).
//!
//! The model is the network F of the consistency parameterisation
//! f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) with the boundary condition
//! f(x, σ_min) = x (see `train::consistency`), called at c_noise = 250 ln σ as the reference
//! code and diffusers' `CMStochasticIterativeScheduler` do. As a [`Solver`] of the one sampling
//! loop it takes labels, guidance (for models trained with label dropout), contexts, SDEdit
//! starts and inpainting (Algorithm 4's blend of the known region at every level).

use serde::{Deserialize, Serialize};

use super::engine::{self, ModelTime, StepReport};
use super::ode::{SolverState, SIGMA_NOISE_STREAM};
use super::{model_output_layout, ModelOutput};
use crate::error::Result;
use crate::kernels::for_each_chunk;
use crate::kernels::rng::fill_normal;
use crate::value_error;

/// 1000 / 4: the reference code's time input is 1000 · c_noise with EDM's c_noise = ln(σ)/4.
const CM_TIME_SCALE: f64 = 250.0;

/// Noise streams of the inpainting blend after evaluation k.
const CONSISTENCY_INPAINT_STREAM: u64 = (1 << 41) + (1 << 39);

/// The parameterisation of a consistency model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyParams {
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub sigma_data: f64,
    pub rho: f64,
}

impl Default for ConsistencyParams {
    /// Song et al. 2023: σ ∈ [0.002, 80], σ_data = 0.5, ρ = 7.
    fn default() -> Self {
        ConsistencyParams {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            rho: 7.0,
        }
    }
}

impl ConsistencyParams {
    pub fn validate(&self) -> Result<()> {
        let ok = self.sigma_min.is_finite()
            && self.sigma_max.is_finite()
            && self.sigma_min > 0.0
            && self.sigma_max > self.sigma_min;
        if !ok {
            value_error!(
                "a consistency model needs 0 < sigma_min < sigma_max (finite), got {} and {}",
                self.sigma_min,
                self.sigma_max
            );
        }
        if !(self.sigma_data.is_finite() && self.sigma_data > 0.0) {
            value_error!("sigma_data must be positive, got {}", self.sigma_data);
        }
        if !(self.rho.is_finite() && self.rho > 0.0) {
            value_error!("rho must be positive, got {}", self.rho);
        }
        Ok(())
    }

    /// σ_d² / ((σ − σ_min)² + σ_d²): 1 at σ_min.
    pub fn c_skip(&self, sigma: f64) -> f64 {
        let d2 = self.sigma_data * self.sigma_data;
        let e = sigma - self.sigma_min;
        d2 / (e * e + d2)
    }

    /// (σ − σ_min) σ_d / √(σ² + σ_d²): 0 at σ_min.
    pub fn c_out(&self, sigma: f64) -> f64 {
        let d = self.sigma_data;
        (sigma - self.sigma_min) * d / (sigma * sigma + d * d).sqrt()
    }

    pub fn c_in(&self, sigma: f64) -> f64 {
        let d = self.sigma_data;
        1.0 / (sigma * sigma + d * d).sqrt()
    }

    /// The network's time input at σ: 1000 · ln(σ)/4 (EDM's c_noise = ln(σ)/4, scaled by 1000 as
    /// the consistency models code and diffusers' `CMStochasticIterativeScheduler.sigma_to_t` do).
    pub fn c_noise(sigma: f64) -> f64 {
        CM_TIME_SCALE * (sigma + 1e-44).ln()
    }

    /// σ of the Karras ramp u ∈ [0, 1] (0: σ_max, 1: σ_min).
    pub fn karras(&self, u: f64) -> f64 {
        let (lo, hi) = (
            self.sigma_min.powf(1.0 / self.rho),
            self.sigma_max.powf(1.0 / self.rho),
        );
        (hi + u * (lo - hi)).powf(self.rho)
    }

    /// The Karras grid of `n` levels, ascending from σ_min to σ_max (the training
    /// discretisation), ends exact.
    pub fn karras_ascending(&self, n: usize) -> Result<Vec<f64>> {
        let mut s = super::sigma::karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)?;
        s.reverse();
        Ok(s)
    }

    /// The levels of a `steps`-step sampler on a grid of `num_scales` points, as diffusers'
    /// `CMStochasticIterativeScheduler.set_timesteps` places them: indices
    /// ⌊num_scales/steps⌋ · i on the Karras ramp (i/(num_scales − 1)), σ_max first.
    pub fn sampling_sigmas(&self, steps: usize, num_scales: usize) -> Result<Vec<f64>> {
        if steps == 0 || num_scales < 2 || steps > num_scales {
            value_error!(
                "steps must be in [1, num_scales] with num_scales >= 2, got steps = {steps}, \
                 num_scales = {num_scales}"
            );
        }
        let ratio = num_scales / steps;
        Ok((0..steps)
            .map(|i| self.karras((i * ratio) as f64 / (num_scales - 1) as f64))
            .collect())
    }
}

/// Multistep consistency sampling over explicit levels.
#[derive(Clone, Debug)]
pub struct ConsistencySampler {
    pub params: ConsistencyParams,
    /// The levels evaluated, decreasing, each in [σ_min, σ_max].
    pub sigmas: Vec<f64>,
    /// Clamp f to [−c, c] (the reference code's `clip_denoised`, c = 1).
    pub clip: Option<f64>,
}

impl ConsistencySampler {
    pub fn new(params: ConsistencyParams, sigmas: Vec<f64>, clip: Option<f64>) -> Result<Self> {
        params.validate()?;
        if sigmas.is_empty() {
            value_error!("a consistency sampler needs at least one σ level");
        }
        let (lo, hi) = (params.sigma_min, params.sigma_max);
        if let Some(bad) = sigmas
            .iter()
            .find(|s| !(s.is_finite() && **s >= lo && **s <= hi * (1.0 + 1e-12)))
        {
            value_error!("σ levels must lie in [sigma_min, sigma_max] = [{lo}, {hi}], got {bad}");
        }
        if sigmas.windows(2).any(|w| w[1] >= w[0]) {
            value_error!("σ levels must decrease strictly, got {sigmas:?}");
        }
        if let Some(c) = clip {
            if !(c.is_finite() && c > 0.0) {
                value_error!("clip must be positive, got {c}");
            }
        }
        Ok(ConsistencySampler {
            params,
            sigmas,
            clip,
        })
    }

    /// The std of the noise added before evaluation k > 0 (and after the last: 0).
    fn renoise_std(&self, k: usize) -> f64 {
        let p = &self.params;
        let s = self
            .sigmas
            .get(k)
            .copied()
            .unwrap_or(p.sigma_min)
            .clamp(p.sigma_min, p.sigma_max);
        (s * s - p.sigma_min * p.sigma_min).max(0.0).sqrt()
    }
}

impl engine::Solver for ConsistencySampler {
    fn num_steps(&self) -> usize {
        self.sigmas.len()
    }
    fn num_evaluations(&self) -> usize {
        self.sigmas.len()
    }
    fn first_evaluation_of(&self, step: usize) -> Result<usize> {
        if step >= self.sigmas.len() {
            value_error!(
                "start {step} is past the sampler's {} steps",
                self.sigmas.len()
            );
        }
        Ok(step)
    }
    fn new_state(&self, start: usize) -> SolverState {
        SolverState::at(start)
    }
    fn init_noise_scale(&self) -> f64 {
        self.sigmas[0]
    }
    /// x = x0 + √(σ² − σ_min²) z (σ_max z on a fresh start).
    fn level_of_step(&self, step: usize) -> Result<(f64, f64)> {
        if step >= self.sigmas.len() {
            value_error!(
                "start {step} is past the sampler's {} steps",
                self.sigmas.len()
            );
        }
        Ok((
            1.0,
            if step == 0 {
                self.sigmas[0]
            } else {
                self.renoise_std(step)
            },
        ))
    }
    fn model_time(&self, k: usize) -> (ModelTime, f32) {
        let s = self.sigmas[k];
        (
            ModelTime::Continuous(ConsistencyParams::c_noise(s)),
            self.params.c_in(s) as f32,
        )
    }
    fn update(
        &self,
        k: usize,
        x: &[f32],
        shape: &[usize],
        model_output: &ModelOutput,
        _state: &mut SolverState,
        seed: u64,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()> {
        let (row, stride) = model_output_layout(shape, &model_output.shape)?;
        let s = self.sigmas[k];
        let (cs, co) = (self.params.c_skip(s) as f32, self.params.c_out(s) as f32);
        let (lo, hi) = match self.clip {
            Some(c) => (-c as f32, c as f32),
            None => (f32::NEG_INFINITY, f32::INFINITY),
        };
        let std = self.renoise_std(k + 1) as f32;
        let stream = SIGMA_NOISE_STREAM + k as u64;
        let m = &model_output.data;
        let f_at = |j: usize| -> f32 {
            let (r, c) = (j / row, j % row);
            (cs * x[j] + co * m[r * stride + c]).clamp(lo, hi)
        };
        // out = f, then f + √(σ_{k+1}² − σ_min²) z; pred_x0 copies f before the noise.
        for_each_chunk(out, |start, chunk| {
            for (i, v) in chunk.iter_mut().enumerate() {
                *v = f_at(start + i);
            }
        });
        if let Some(p) = pred_x0 {
            p.copy_from_slice(out);
        }
        if std > 0.0 {
            for_each_chunk(out, |start, chunk| {
                let mut z = vec![0f32; chunk.len()];
                fill_normal(seed, stream, start as u64, &mut z);
                for (v, zv) in chunk.iter_mut().zip(&z) {
                    *v += std * zv;
                }
            });
        }
        if check_finite && out.iter().any(|v| !v.is_finite()) {
            {
                return Err(crate::Error::NonFiniteSigma { step: k, sigma: s });
            }
        }
        Ok(())
    }
    fn level_after(&self, k: usize) -> ((f64, f64), u64) {
        (
            (1.0, self.renoise_std(k + 1)),
            CONSISTENCY_INPAINT_STREAM + k as u64,
        )
    }
    fn report(&self, k: usize) -> Option<StepReport> {
        let next = self
            .sigmas
            .get(k + 1)
            .copied()
            .unwrap_or(self.params.sigma_min);
        Some(StepReport::Sigma(k, next))
    }
}

impl super::ClassifierFactor for ConsistencySampler {
    fn prediction(&self) -> Option<crate::diffusion::Prediction> {
        None
    }
    fn classifier_guidance_factor(&self, _t: i64) -> Result<f64> {
        value_error!(
            "classifier guidance needs a diffusion model's score; a consistency model has none"
        )
    }
}
