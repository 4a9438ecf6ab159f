//! Training objectives. The [`super::Trainer`] owns what every objective shares (the shuffled
//! batches, class / context dropout for classifier-free guidance, AdamW, gradient clipping,
//! learning-rate schedules, EMA, checkpoints and exact resume); an [`Objective`] turns one
//! batch into per-sample losses on the model being trained, and keeps whatever state it needs
//! between steps (the importance sampler's history, a consistency model's target network, a
//! distillation teacher) in the checkpoint through [`ObjectiveState`].
//!
//! Objectives draw their randomness from counter-based streams keyed by (seed, step), so the
//! loss of step s is a pure function of the weights, the data and s: resumed runs are exact.

use std::collections::HashMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::NOISE_STREAM;
use crate::diffusion::{q_sample, Prediction};
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::loss::tensors as lt;
use crate::loss::weights::{Target, Weighting};
use crate::loss::{TimestepSampler, TimestepSampling, HISTORY_PER_TERM, UNIFORM_PROB};
use crate::nn::{Cond, Ctx, Model};
use crate::schedule::Schedule;

/// One training batch as the objective sees it.
pub struct Batch<'a> {
    /// Clean samples, row-major [B, ...].
    pub x0: &'a [f32],
    /// [B, ...].
    pub shape: &'a [usize],
    /// Class labels after classifier-free dropout (the null class is `num_classes`).
    pub labels: Option<&'a [u32]>,
    /// Cross-attention contexts [B, M, D] and the rows that take the null context.
    pub context: Option<&'a Tensor>,
    pub null_context: Option<&'a [bool]>,
    /// The optimisation step this batch belongs to, and the run's seed.
    pub step: u64,
    pub seed: u64,
}

impl<'a> Batch<'a> {
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    pub fn cond(&self) -> Cond<'a> {
        Cond {
            labels: self.labels,
            context: self.context,
            null_context: if self.context.is_some() {
                self.null_context
            } else {
                None
            },
            guidance: None,
        }
    }

    /// The clean batch as a tensor on `model`'s device.
    pub fn x0_tensor(&self, model: &Model) -> Result<Tensor> {
        Ok(Tensor::from_slice(self.x0, self.shape, model.device())?)
    }

    /// Standard normal noise of this step (the stream every objective uses for its ε).
    pub fn noise(&self) -> Vec<f32> {
        let mut noise = vec![0f32; self.x0.len()];
        fill_normal(self.seed, NOISE_STREAM + self.step, 0, &mut noise);
        noise
    }

    /// Values per sample.
    pub fn per_sample(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// What an objective saves in a checkpoint besides the trainer's own state.
#[derive(Default)]
pub struct ObjectiveState {
    /// Saved with the prefix `objective.` (a target network, a teacher's weights).
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

/// A training objective behind the [`super::Trainer`].
pub trait Objective: Send + Sync {
    /// Per-sample losses [B] of `batch` under the current weights of `model` (the trainer
    /// takes their mean and back-propagates it); `ctx` carries the step's dropout masks.
    fn per_sample_loss(&mut self, model: &Model, batch: &Batch, ctx: &Ctx) -> Result<Tensor>;

    /// Called once the loss was found finite and before the optimiser step.
    fn after_loss(&mut self) -> Result<()> {
        Ok(())
    }

    /// Called after the optimiser step with the updated model (target networks follow it here).
    fn after_step(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    /// State that a checkpoint must hold for an exact resume.
    fn state(&self) -> Result<ObjectiveState> {
        Ok(ObjectiveState::default())
    }

    /// Restores [`Objective::state`]; `what` names the checkpoint in errors.
    fn load_state(&mut self, _state: ObjectiveState, _what: &str) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LossKind {
    Mse,
    Hybrid,
}

/// The diffusion loss (Ho et al. 2020 and its variants): q_sample at a drawn t, the ε / x0 /
/// v target with its weighting, or the hybrid loss of learned variances, with t drawn
/// uniformly or by importance sampling.
pub struct DiffusionObjective {
    schedule: Schedule,
    prediction: Prediction,
    weighting: Weighting,
    loss: LossKind,
    bins: u32,
    sampler: TimestepSampler,
    /// The last step's timesteps and unweighted per-sample losses (importance sampling).
    last: Option<(Vec<i64>, Tensor)>,
}

#[derive(Serialize, Deserialize)]
struct SamplerState {
    sampler_losses: Vec<f64>,
    sampler_counts: Vec<usize>,
    sampler_draws: u64,
}

impl DiffusionObjective {
    pub(crate) fn new(
        schedule: Schedule,
        prediction: Prediction,
        weighting: Weighting,
        loss: LossKind,
        sampling: TimestepSampling,
        bins: u32,
    ) -> Result<Self> {
        let sampler =
            TimestepSampler::new(sampling, schedule.len(), HISTORY_PER_TERM, UNIFORM_PROB)?;
        Ok(DiffusionObjective {
            schedule,
            prediction,
            weighting,
            loss,
            bins,
            sampler,
            last: None,
        })
    }
}

impl Objective for DiffusionObjective {
    fn per_sample_loss(&mut self, model: &Model, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let (s, seed, b) = (batch.step, batch.seed, batch.rows());
        let (t, importance) = self
            .sampler
            .sample(b, seed ^ s.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let noise = batch.noise();
        let mut x_t = vec![0f32; batch.x0.len()];
        q_sample(&self.schedule, batch.shape, batch.x0, &t, &noise, &mut x_t)?;
        let dev = model.device().clone();
        let x0 = batch.x0_tensor(model)?;
        let noise = Tensor::from_vec(noise, batch.shape, &dev)?;
        let x_t = Tensor::from_vec(x_t, batch.shape, &dev)?;
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let out = model.forward_cond(&x_t, &tf, &batch.cond(), ctx)?;
        let per_sample = match self.loss {
            LossKind::Mse => {
                let p = self.prediction;
                let target = lt::training_target(&self.schedule, &x0, &noise, &t, p)?;
                let target_kind = match p {
                    Prediction::Epsilon => Target::Epsilon,
                    Prediction::X0 => Target::X0,
                    Prediction::V => Target::V,
                };
                let w = match self.weighting {
                    Weighting::Uniform => None,
                    ref kind => Some(lt::loss_weights(
                        &self.schedule,
                        &t,
                        kind,
                        target_kind,
                        &x0,
                    )?),
                };
                lt::simple_loss(&out, &target, w.as_ref())?
            }
            LossKind::Hybrid => lt::hybrid_loss(
                &self.schedule,
                &x0,
                &x_t,
                &noise,
                &t,
                &out,
                self.prediction,
                self.bins,
            )?,
        };
        let iw: Vec<f32> = importance.iter().map(|&w| w as f32).collect();
        let weighted = (&per_sample * Tensor::from_vec(iw, b, &dev)?)?;
        self.last = Some((t, per_sample));
        Ok(weighted)
    }

    fn after_loss(&mut self) -> Result<()> {
        if let Some((t, per_sample)) = self.last.take() {
            if self.sampler.kind == TimestepSampling::LossSecondMoment {
                let l: Vec<f64> = per_sample
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                self.sampler.update(&t, &l)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<ObjectiveState> {
        let s = SamplerState {
            sampler_losses: self.sampler.losses.clone(),
            sampler_counts: self.sampler.counts.clone(),
            sampler_draws: self.sampler.draws,
        };
        Ok(ObjectiveState {
            tensors: HashMap::new(),
            json: serde_json::to_value(s)
                .map_err(|e| Error::Value(format!("cannot serialise the sampler: {e}")))?,
        })
    }

    fn load_state(&mut self, state: ObjectiveState, what: &str) -> Result<()> {
        let s: SamplerState = serde_json::from_value(state.json).map_err(|e| Error::BadFile {
            path: what.to_string(),
            message: format!("the timestep sampler's state is unreadable: {e}"),
        })?;
        let ts = &mut self.sampler;
        if s.sampler_losses.len() != ts.losses.len() || s.sampler_counts.len() != ts.counts.len() {
            return Err(Error::BadFile {
                path: what.to_string(),
                message: "the timestep sampler's history does not match the schedule".into(),
            });
        }
        ts.losses = s.sampler_losses;
        ts.counts = s.sampler_counts;
        ts.draws = s.sampler_draws;
        Ok(())
    }
}

/// Which objective a [`super::Trainer`] optimises; saved in the checkpoint's training config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectiveConfig {
    /// The diffusion loss set by the trainer's prediction / loss / weighting / timestep_sampling.
    #[default]
    Diffusion,
    /// Progressive distillation of a teacher (the student's parameterisation is `prediction`).
    ProgressiveDistillation(super::distill::ProgressiveConfig),
    /// Consistency distillation of a teacher.
    ConsistencyDistillation(super::consistency::ConsistencyDistillationConfig),
    /// Consistency training from data alone (CT or iCT).
    ConsistencyTraining(super::consistency::ConsistencyTrainingConfig),
}

impl ObjectiveConfig {
    pub fn name(&self) -> &'static str {
        match self {
            ObjectiveConfig::Diffusion => "diffusion",
            ObjectiveConfig::ProgressiveDistillation(_) => "progressive_distillation",
            ObjectiveConfig::ConsistencyDistillation(_) => "consistency_distillation",
            ObjectiveConfig::ConsistencyTraining(_) => "consistency_training",
        }
    }

    /// Whether the objective distils a teacher.
    pub fn needs_teacher(&self) -> bool {
        matches!(
            self,
            ObjectiveConfig::ProgressiveDistillation(_)
                | ObjectiveConfig::ConsistencyDistillation(_)
        )
    }

    /// The consistency model's parameterisation, for the objectives that train one.
    pub fn consistency_params(&self) -> Option<super::consistency::ConsistencyParams> {
        match self {
            ObjectiveConfig::ConsistencyDistillation(c) => Some(c.params),
            ObjectiveConfig::ConsistencyTraining(c) => Some(c.params),
            _ => None,
        }
    }
}
