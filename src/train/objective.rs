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
    /// ControlNet: the control images paired with the batch's samples.
    pub control: Option<&'a Tensor>,
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
            low_res: None,
            aug_level: None,
            control: self.control,
            control_scale: None,
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

    /// What the last step measured besides the loss (e.g. an autoencoder's KL or codebook
    /// perplexity), as JSON; Null when the objective reports nothing.
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
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
    /// Super-resolution: how each sample's conditioning image is made from it.
    super_resolution: Option<SuperResolutionConfig>,
}

/// The conditioning of a super-resolution stage of a cascade (Ho et al. 2021): each training
/// image is downsampled by `factor` (block means), blurred with probability `blur_prob` (σ
/// uniform in `blur_sigma`, pixels of the low-resolution image; the higher stages of CDM and
/// Imagen), corrupted by Gaussian noise at a level s ~ U[0, `max_aug_level`] (√ᾱ(s) x +
/// √(1 − ᾱ(s)) ε with ᾱ(s) = cos²(πs/2)), upsampled back by `upsample`, and given to the
/// model with s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuperResolutionConfig {
    pub factor: usize,
    /// "bilinear" or "nearest".
    pub upsample: String,
    pub max_aug_level: f64,
    pub blur_prob: f64,
    pub blur_sigma: (f64, f64),
}

impl Default for SuperResolutionConfig {
    fn default() -> Self {
        SuperResolutionConfig {
            factor: 2,
            upsample: "bilinear".into(),
            max_aug_level: 0.5,
            blur_prob: 0.0,
            blur_sigma: (0.4, 0.6),
        }
    }
}

impl SuperResolutionConfig {
    pub fn validate(&self, model: &crate::nn::ModelConfig, data_shape: &[usize]) -> Result<()> {
        use crate::value_error;
        let crate::nn::ModelConfig::Unet(c) = model else {
            value_error!("the super_resolution objective trains a U-Net built with cond_channels (and aug_embed)");
        };
        if c.cond_channels != c.in_channels {
            value_error!(
                "a super-resolution U-Net conditions on a low-resolution copy of its images: \
                 cond_channels must equal in_channels ({}), got {}",
                c.in_channels,
                c.cond_channels
            );
        }
        if self.factor < 2 {
            value_error!("factor must be at least 2, got {}", self.factor);
        }
        if data_shape.len() != 3
            || !data_shape[1].is_multiple_of(self.factor)
            || !data_shape[2].is_multiple_of(self.factor)
        {
            value_error!(
                "images of shape {data_shape:?} do not divide by the factor {}",
                self.factor
            );
        }
        crate::nn::resize::Upsample::parse(&self.upsample)?;
        if !(0.0..=1.0).contains(&self.max_aug_level) {
            value_error!(
                "max_aug_level must lie in [0, 1], got {}",
                self.max_aug_level
            );
        }
        if self.max_aug_level > 0.0 && !c.aug_embed {
            value_error!("noise conditioning augmentation (max_aug_level > 0) needs a U-Net with aug_embed=True");
        }
        if !(0.0..=1.0).contains(&self.blur_prob) {
            value_error!("blur_prob must lie in [0, 1], got {}", self.blur_prob);
        }
        let (lo, hi) = self.blur_sigma;
        if !(lo >= 0.0 && hi >= lo && hi.is_finite()) {
            value_error!("blur_sigma must be (lo, hi) with 0 <= lo <= hi, got ({lo}, {hi})");
        }
        Ok(())
    }

    /// The conditioning images [B, C, H, W] (upsampled) and levels [B] of a batch.
    pub(crate) fn condition(&self, batch: &Batch) -> Result<(Vec<f32>, Vec<f32>)> {
        use crate::nn::resize;
        let [b, c, h, w] = [
            batch.shape[0],
            batch.shape[1],
            batch.shape[2],
            batch.shape[3],
        ];
        let f = self.factor;
        let mut low = resize::area_down(batch.x0, [b, c, h, w], f)?;
        let u =
            crate::nn::params::uniforms(batch.seed, resize::AUG_TRAIN_STREAM + batch.step, 3 * b);
        if self.blur_prob > 0.0 {
            let (lo, hi) = self.blur_sigma;
            let sigma: Vec<f32> = (0..b)
                .map(|i| {
                    if (u[b + i] as f64) < self.blur_prob {
                        (lo + (hi - lo) * u[2 * b + i] as f64) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            resize::gaussian_blur(&mut low, [b, c, h / f, w / f], &sigma)?;
        }
        let levels: Vec<f32> = u[..b]
            .iter()
            .map(|&v| (v as f64 * self.max_aug_level) as f32)
            .collect();
        resize::augment(
            &mut low,
            b,
            &levels,
            batch.seed,
            resize::AUG_TRAIN_STREAM + batch.step,
        )?;
        let up = resize::Upsample::parse(&self.upsample)?;
        Ok((
            resize::resize(&low, [b, c, h / f, w / f], h, w, up)?,
            levels,
        ))
    }
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
            super_resolution: None,
        })
    }

    /// The same loss for a super-resolution stage conditioned as `config` says.
    pub(crate) fn with_super_resolution(mut self, config: SuperResolutionConfig) -> Self {
        self.super_resolution = Some(config);
        self
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
        let sr = match &self.super_resolution {
            Some(c) => {
                let (low, levels) = c.condition(batch)?;
                Some((Tensor::from_vec(low, batch.shape, &dev)?, levels))
            }
            None => None,
        };
        let cond = Cond {
            low_res: sr.as_ref().map(|(t, _)| t),
            aug_level: sr.as_ref().map(|(_, l)| l.as_slice()),
            ..batch.cond()
        };
        let out = model.forward_cond(&x_t, &tf, &cond, ctx)?;
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
    /// Reconstruction + KL or VQ losses of an autoencoder (latent diffusion's first stage).
    Autoencoder(super::autoencoder::AutoencoderLossConfig),
    /// The diffusion loss of a cascade's super-resolution stage, conditioned on a degraded
    /// low-resolution copy of each image.
    SuperResolution(SuperResolutionConfig),
}

impl ObjectiveConfig {
    pub fn name(&self) -> &'static str {
        match self {
            ObjectiveConfig::Diffusion => "diffusion",
            ObjectiveConfig::ProgressiveDistillation(_) => "progressive_distillation",
            ObjectiveConfig::ConsistencyDistillation(_) => "consistency_distillation",
            ObjectiveConfig::ConsistencyTraining(_) => "consistency_training",
            ObjectiveConfig::Autoencoder(_) => "autoencoder",
            ObjectiveConfig::SuperResolution(_) => "super_resolution",
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
