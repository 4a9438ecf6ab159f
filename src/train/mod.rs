//! Training candle denoisers: batches drawn from host arrays with a seeded shuffle, any loss
//! of [`crate::loss`] (targets, weightings, the hybrid loss, importance-sampled t), AdamW with
//! warm-up and decay, gradient-norm clipping, EMA, and checkpoints from which a run resumes
//! bit for bit.
//!
//! All randomness is counter-based (Philox): the batch order, timesteps, noise, class dropout
//! and dropout masks of step s are pure functions of (seed, s). The generator state is
//! therefore just the step counter, which is why a resumed run ends with the same weights as
//! one that never stopped.

pub mod adamw;
pub mod autoencoder;
pub mod checkpoint;
pub mod consistency;
pub mod distill;
pub mod ema;
pub mod lr;
pub mod objective;
pub mod teacher;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use adamw::{AdamW, AdamWConfig};
pub use ema::{Ema, EmaConfig};
pub use lr::{lr_factor, LrDecay};
pub use objective::{Batch, Objective, ObjectiveConfig, ObjectiveState};
pub use teacher::{ExternalTeacher, Teacher, TeacherNet};

use crate::diffusion::{q_sample, Prediction};
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::loss::weights::Weighting;
use crate::loss::TimestepSampling;
use crate::nn::params::uniforms;
use crate::nn::{Ctx, Model, ModelConfig};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// Generator streams of the training randomness (far from the samplers' timestep streams).
pub(crate) const NOISE_STREAM: u64 = 1 << 62;
const SHUFFLE_STREAM: u64 = (1 << 62) + (1 << 61);
const CLASS_DROP_STREAM: u64 = (1 << 62) + (1 << 60);

/// File name of the checkpoint inside a run folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Human-readable copy of the configuration inside a run folder.
pub const CONFIG_FILE: &str = "config.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub lr: f64,
    pub lr_schedule: LrDecay,
    pub warmup_steps: u64,
    /// The step at which linear / cosine decay reaches zero.
    pub total_steps: u64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub grad_clip: Option<f64>,
    pub optimizer: AdamWConfig,
    pub ema: EmaConfig,
    /// "epsilon", "x0" or "v".
    pub prediction: String,
    /// "mse" (the simple loss, weighted) or "hybrid" (learned variances: mse + λ L_vlb).
    pub loss: String,
    /// Weighting of the mse: "uniform", "snr", "min_snr", "truncated_snr", "vlb".
    pub weighting: String,
    pub min_snr_gamma: f64,
    /// "uniform" or "loss_second_moment" (importance sampling of t).
    pub timestep_sampling: String,
    /// Probability of replacing a label by the null class (classifier-free guidance).
    pub class_dropout: f64,
    /// Bins of the discretized decoder of the hybrid loss (256 for 8-bit data).
    pub bins: u32,
    pub seed: u64,
    /// The objective: the diffusion loss (default), distillation or consistency.
    pub objective: ObjectiveConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 128,
            lr: 1e-3,
            lr_schedule: LrDecay::Constant,
            warmup_steps: 0,
            total_steps: 0,
            grad_clip: Some(1.0),
            optimizer: AdamWConfig::default(),
            ema: EmaConfig::default(),
            prediction: "epsilon".into(),
            loss: "mse".into(),
            weighting: "uniform".into(),
            min_snr_gamma: crate::loss::weights::MIN_SNR_GAMMA,
            timestep_sampling: "uniform".into(),
            class_dropout: 0.0,
            bins: 256,
            seed: 0,
            objective: ObjectiveConfig::Diffusion,
        }
    }
}

use objective::LossKind;

/// Parsed, validated settings.
struct Settings {
    prediction: Prediction,
    weighting: Weighting,
    loss: LossKind,
    sampling: TimestepSampling,
}

impl TrainConfig {
    fn settings(&self, model: &ModelConfig) -> Result<Settings> {
        if self.batch_size == 0 {
            value_error!("batch_size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            value_error!("lr must be positive and finite, got {}", self.lr);
        }
        if let Some(c) = self.grad_clip {
            if c.is_nan() || c <= 0.0 {
                value_error!("grad_clip must be positive (or None), got {c}");
            }
        }
        if self.lr_schedule != LrDecay::Constant && self.total_steps <= self.warmup_steps {
            value_error!(
                "a {:?} learning-rate decay needs total_steps ({}) > warmup_steps ({})",
                self.lr_schedule,
                self.total_steps,
                self.warmup_steps
            );
        }
        if !(0.0..1.0).contains(&self.class_dropout) {
            value_error!(
                "class_dropout must be in [0, 1), got {}",
                self.class_dropout
            );
        }
        if self.class_dropout > 0.0 && model.num_classes() == 0 && model.context_dim() == 0 {
            value_error!(
                "class_dropout needs a conditional model (num_classes > 0 or context_dim > 0)"
            );
        }
        self.optimizer.validate()?;
        self.ema.validate()?;
        let loss = match self.loss.as_str() {
            "mse" | "simple" => LossKind::Mse,
            "hybrid" => LossKind::Hybrid,
            other => value_error!("loss must be 'mse' or 'hybrid', got {other:?}"),
        };
        match (loss, model.learn_sigma()) {
            (LossKind::Mse, true) => value_error!(
                "the model learns variances (learn_sigma): train it with loss='hybrid', which trains both halves"
            ),
            (LossKind::Hybrid, false) => {
                value_error!("loss='hybrid' trains learned variances: build the model with learn_sigma=True")
            }
            _ => {}
        }
        let sampling = match self.timestep_sampling.as_str() {
            "uniform" => TimestepSampling::Uniform,
            "loss_second_moment" => TimestepSampling::LossSecondMoment,
            other => value_error!(
                "timestep_sampling must be 'uniform' or 'loss_second_moment', got {other:?}"
            ),
        };
        let is_ae = matches!(self.objective, ObjectiveConfig::Autoencoder(_));
        if model.is_autoencoder() && !is_ae {
            value_error!(
                "an autoencoder trains with objective='autoencoder' (fd.nn.AutoencoderKL / VQModel are \
                 not denoisers), got the {} objective",
                self.objective.name()
            );
        }
        if is_ae && !model.is_autoencoder() {
            value_error!(
                "objective='autoencoder' trains an autoencoder (fd.nn.AutoencoderKL / fd.nn.VQModel), \
                 not a denoiser"
            );
        }
        let is_sr = matches!(self.objective, ObjectiveConfig::SuperResolution(_));
        if model.cond_channels() > 0 && !is_sr {
            value_error!(
                "a super-resolution U-Net (cond_channels = {}) trains with objective='super_resolution', \
                 which makes its conditioning images; got the {} objective",
                model.cond_channels(),
                self.objective.name()
            );
        }
        if self.objective != ObjectiveConfig::Diffusion {
            let name = self.objective.name();
            if loss != LossKind::Mse || model.learn_sigma() {
                value_error!(
                    "the {name} objective trains a model without learned variances (loss='mse', \
                     learn_sigma=False)"
                );
            }
            if sampling != TimestepSampling::Uniform {
                value_error!(
                    "the {name} objective draws its own levels: use timestep_sampling='uniform'"
                );
            }
            if model.context_dim() > 0 {
                value_error!("the {name} objective does not support cross-attention models yet");
            }
        }
        Ok(Settings {
            prediction: Prediction::parse(&self.prediction)?,
            weighting: Weighting::parse(&self.weighting, self.min_snr_gamma)?,
            loss,
            sampling,
        })
    }
}

/// What a training loop's caller does around each step (progress, callbacks, Ctrl-C, the GIL).
pub trait TrainHooks {
    fn run_step(&mut self, step: &mut (dyn FnMut() -> Result<f32> + Send)) -> Result<f32> {
        step()
    }
    fn after_step(&mut self, _trainer: &Trainer, _loss: f32) -> Result<()> {
        Ok(())
    }
}

pub struct NoTrainHooks;
impl TrainHooks for NoTrainHooks {}

/// Training state beside the tensors, saved as JSON in the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    optimizer_steps: u64,
    ema_steps: u64,
    /// The objective's state (checkpoints before the objective trait kept the diffusion
    /// loss's importance sampler in the `sampler_*` fields, which are still read).
    #[serde(default)]
    objective: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sampler_losses: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sampler_counts: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sampler_draws: Option<u64>,
    losses: Vec<f32>,
    data_count: usize,
    data_shape: Vec<usize>,
    extra: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ScheduleRecord {
    name: String,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

pub struct Trainer {
    pub config: TrainConfig,
    schedule: Schedule,
    model: Model,
    optimizer: AdamW,
    ema: Ema,
    objective: Box<dyn Objective>,
    data: Vec<f32>,
    data_shape: Vec<usize>,
    count: usize,
    labels: Option<Vec<u32>>,
    /// Cross-attention contexts paired with the data: [count, len, dim] row-major, and len.
    context: Option<(Vec<f32>, usize)>,
    /// ControlNet: control images paired with the data, [count, C, H, W] row-major, and [C, H, W].
    control: Option<(Vec<f32>, [usize; 3])>,
    permutation: Option<(u64, Vec<u32>)>,
    /// Optimisation steps taken.
    pub step: u64,
    /// The training loss of every step.
    pub losses: Vec<f32>,
    /// Caller's metadata saved with checkpoints (the CLI records its dataset here).
    pub extra: serde_json::Value,
}

impl Trainer {
    /// A trainer over `data` (`count` samples of `data_shape`, row-major) with optional
    /// class labels.
    pub fn new(
        model: Model,
        schedule: Schedule,
        config: TrainConfig,
        data: Vec<f32>,
        data_shape: Vec<usize>,
        labels: Option<Vec<u32>>,
    ) -> Result<Self> {
        Self::with_teacher(model, schedule, config, data, data_shape, labels, None)
    }

    /// As [`Trainer::new`] for an objective that distils `teacher` (a model of `schedule`).
    pub fn with_teacher(
        model: Model,
        schedule: Schedule,
        config: TrainConfig,
        data: Vec<f32>,
        data_shape: Vec<usize>,
        labels: Option<Vec<u32>>,
        teacher: Option<TeacherNet>,
    ) -> Result<Self> {
        let settings = config.settings(model.config())?;
        let want = model.config().data_shape();
        let per: usize = data_shape.iter().product();
        if per == 0 || data.is_empty() || !data.len().is_multiple_of(per) {
            shape_error!(
                "data holds {} values, not a whole number of samples of shape {data_shape:?}",
                data.len()
            );
        }
        let count = data.len() / per;
        let mut probe = vec![count];
        probe.extend_from_slice(&data_shape);
        model.check_input(&probe).map_err(|_| {
            Error::Shape(format!(
                "data has shape {probe:?} but the model is configured for samples of shape {want:?}"
            ))
        })?;
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            value_error!("data contains a non-finite value at flat index {bad}");
        }
        let classes = model.config().num_classes();
        match (&labels, classes) {
            (Some(_), 0) => {
                value_error!("labels were given but the model is unconditional (num_classes = 0)")
            }
            (None, c) if c > 0 => {
                value_error!(
                    "the model is class-conditional ({c} classes) but no labels were given"
                )
            }
            (Some(l), c) => {
                if l.len() != count {
                    shape_error!(
                        "labels have {} entries but data has {count} samples",
                        l.len()
                    );
                }
                if let Some(bad) = l.iter().find(|&&y| y as usize >= c) {
                    value_error!("label {bad} is out of range for a model with {c} classes");
                }
            }
            _ => {}
        }
        let params = model.trainable_vars();
        let optimizer = AdamW::new(params.clone(), config.optimizer)?;
        let ema = Ema::new(&params, config.ema)?;
        let objective =
            build_objective(&config, settings, &schedule, &model, &data_shape, teacher)?;
        Ok(Trainer {
            config,
            schedule,
            model,
            optimizer,
            ema,
            objective,
            data,
            data_shape,
            count,
            labels,
            context: None,
            control: None,
            permutation: None,
            step: 0,
            losses: Vec::new(),
            extra: serde_json::Value::Null,
        })
    }

    /// Pairs every sample with a cross-attention context: `context` holds [count, len,
    /// context_dim] row-major. A model with cross-attention needs one (None is an error), a
    /// model without refuses one. `class_dropout` replaces a dropped row's context by the
    /// learned null context (and its label by the null class).
    /// Pairs every sample with a control image (ControlNet training): `control` holds [count,
    /// C, H·f, W·f] row-major with its per-image shape. A ControlNet needs them, other models
    /// refuse them.
    pub fn with_control(mut self, control: Option<(Vec<f32>, Vec<usize>)>) -> Result<Self> {
        let config = self.model.config().controlnet().cloned();
        match (control, config) {
            (None, None) => {}
            (None, Some(_)) => value_error!(
                "a ControlNet trains on pairs of data and control images: pass control="
            ),
            (Some(_), None) => value_error!(
                "control images were given but the model is not a ControlNet \
                 (fd.nn.ControlNet.from_unet)"
            ),
            (Some((data, shape)), Some(c)) => {
                let f = c.control_factor();
                let d = self.data_shape.clone();
                let want = [c.conditioning_channels, d[1] * f, d[2] * f];
                if shape != want {
                    shape_error!(
                        "control images have shape [N, {}] but this ControlNet takes [N, {}]",
                        join_dims(&shape),
                        join_dims(&want)
                    );
                }
                let row: usize = want.iter().product();
                if data.len() != self.count * row {
                    shape_error!(
                        "{} control images for {} samples",
                        data.len() / row.max(1),
                        self.count
                    );
                }
                if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
                    value_error!(
                        "the control images contain a non-finite value at flat index {bad}"
                    );
                }
                self.control = Some((data, want));
            }
        }
        Ok(self)
    }

    pub fn with_context(mut self, context: Option<(Vec<f32>, usize)>) -> Result<Self> {
        let dim = self.model.config().context_dim();
        match (context, dim) {
            (None, 0) => {}
            (None, d) => value_error!(
                "the model attends to a context (context_dim = {d}) but no context was given: \
                 pass one [N, M, {d}] array row per sample"
            ),
            (Some(_), 0) => value_error!(
                "a context was given but the model has no cross-attention (context_dim = 0)"
            ),
            (Some((data, len)), d) => {
                let c = self.model.check_context(crate::nn::HostContext {
                    data: &data,
                    len,
                    dim: d,
                })?;
                if c.rows() != self.count {
                    shape_error!(
                        "the context has {} rows but data has {} samples",
                        c.rows(),
                        self.count
                    );
                }
                self.context = Some((data, len));
            }
        }
        Ok(self)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Number of training samples.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// A copy of the model holding the EMA weights (what sampling uses by default).
    pub fn ema_model(&self) -> Result<Model> {
        let mut weights = self.model.params().tensors()?;
        weights.extend(self.ema.tensors()?);
        self.model.with_weights(&weights)
    }

    /// The learning rate of the next step.
    pub fn current_lr(&self) -> f64 {
        let c = &self.config;
        c.lr * lr_factor(c.lr_schedule, c.warmup_steps, c.total_steps, self.step)
    }

    /// Sample index at position `k` of the stream of shuffled epochs.
    fn sample_index(&mut self, k: u64) -> usize {
        let n = self.count as u64;
        let (epoch, pos) = (k / n, (k % n) as usize);
        let fresh = !matches!(&self.permutation, Some((e, _)) if *e == epoch);
        if fresh {
            // Fisher–Yates driven by the counter-based generator.
            let mut perm: Vec<u32> = (0..self.count as u32).collect();
            let u = uniforms(self.config.seed, SHUFFLE_STREAM ^ epoch, self.count);
            for i in (1..self.count).rev() {
                let j = ((u[i] as f64 * (i + 1) as f64) as usize).min(i);
                perm.swap(i, j);
            }
            self.permutation = Some((epoch, perm));
        }
        self.permutation
            .as_ref()
            .map_or(0, |(_, p)| p[pos] as usize)
    }

    /// One optimisation step; returns the batch's loss.
    pub fn step(&mut self) -> Result<f32> {
        let b = self.config.batch_size;
        let s = self.step;
        let seed = self.config.seed;
        let per: usize = self.data_shape.iter().product();
        let mut x0 = Vec::with_capacity(b * per);
        let mut labels = self.labels.as_ref().map(|_| Vec::with_capacity(b));
        let ctx_row = self
            .context
            .as_ref()
            .map_or(0, |(_, len)| len * self.model.config().context_dim());
        let mut context = self
            .context
            .as_ref()
            .map(|_| Vec::with_capacity(b * ctx_row));
        let control_row = self
            .control
            .as_ref()
            .map_or(0, |(_, sh)| sh.iter().product::<usize>());
        let mut control = self
            .control
            .as_ref()
            .map(|_| Vec::with_capacity(b * control_row));
        for k in 0..b as u64 {
            let i = self.sample_index(s * b as u64 + k);
            x0.extend_from_slice(&self.data[i * per..(i + 1) * per]);
            if let (Some(out), Some((all, _))) = (control.as_mut(), self.control.as_ref()) {
                out.extend_from_slice(&all[i * control_row..(i + 1) * control_row]);
            }
            if let (Some(out), Some(all)) = (labels.as_mut(), self.labels.as_ref()) {
                out.push(all[i]);
            }
            if let (Some(out), Some((all, _))) = (context.as_mut(), self.context.as_ref()) {
                out.extend_from_slice(&all[i * ctx_row..(i + 1) * ctx_row]);
            }
        }
        // One draw per row decides whether the row's conditioning (label and context) is dropped.
        let dropped: Option<Vec<bool>> = (self.config.class_dropout > 0.0).then(|| {
            uniforms(seed, CLASS_DROP_STREAM ^ s, b)
                .iter()
                .map(|&u| (u as f64) < self.config.class_dropout)
                .collect()
        });
        if let (Some(l), Some(d)) = (labels.as_mut(), dropped.as_ref()) {
            let null = self.model.config().num_classes() as u32;
            for (y, &drop) in l.iter_mut().zip(d) {
                if drop {
                    *y = null;
                }
            }
        }
        let mut shape = vec![b];
        shape.extend_from_slice(&self.data_shape);
        let dev = self.model.device().clone();
        let context = match (context, self.context.as_ref()) {
            (Some(c), Some((_, len))) => Some(Tensor::from_vec(
                c,
                (b, *len, self.model.config().context_dim()),
                &dev,
            )?),
            _ => None,
        };
        let control = match (control, self.control.as_ref()) {
            (Some(c), Some((_, sh))) => Some(Tensor::from_vec(c, (b, sh[0], sh[1], sh[2]), &dev)?),
            _ => None,
        };
        let batch = Batch {
            x0: &x0,
            shape: &shape,
            labels: labels.as_deref(),
            context: context.as_ref(),
            null_context: dropped.as_deref(),
            control: control.as_ref(),
            step: s,
            seed,
        };
        let per_sample =
            self.objective
                .per_sample_loss(&self.model, &batch, &Ctx::train(seed, s))?;
        let loss = per_sample.mean_all()?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            value_error!(
                "the training loss is {value} at step {s}: lower the learning rate or check the data \
                 (the step was not applied)"
            );
        }
        let grads = loss.backward()?;
        self.objective.after_loss()?;
        let scale = match self.config.grad_clip {
            Some(max) => {
                let norm = self.optimizer.grad_norm(&grads)?;
                if norm > max {
                    max / (norm + 1e-6)
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        let lr = self.current_lr();
        self.optimizer.step(&grads, lr, scale)?;
        self.ema.update(&self.model.trainable_vars())?;
        self.objective.after_step(&self.model)?;
        self.step += 1;
        self.losses.push(value);
        Ok(value)
    }

    /// Runs `steps` steps; with `checkpoint = Some((path, every))` saves every `every` steps
    /// and at the end.
    pub fn train(
        &mut self,
        steps: u64,
        checkpoint: Option<(&Path, u64)>,
        hooks: &mut dyn TrainHooks,
    ) -> Result<()> {
        for _ in 0..steps {
            let loss = hooks.run_step(&mut || self.step())?;
            if let Some((path, every)) = checkpoint {
                if every > 0 && self.step.is_multiple_of(every) {
                    self.save(path)?;
                }
            }
            hooks.after_step(self, loss)?;
        }
        if let Some((path, _)) = checkpoint {
            self.save(path)?;
        }
        Ok(())
    }

    fn state(&self, objective: serde_json::Value) -> TrainState {
        TrainState {
            step: self.step,
            optimizer_steps: self.optimizer.steps,
            ema_steps: self.ema.optimization_step,
            objective,
            sampler_losses: None,
            sampler_counts: None,
            sampler_draws: None,
            losses: self.losses.clone(),
            data_count: self.count,
            data_shape: self.data_shape.clone(),
            extra: self.extra.clone(),
        }
    }

    /// What the objective measured on the last step besides the loss (JSON; Null if nothing).
    pub fn objective_metrics(&self) -> serde_json::Value {
        self.objective.metrics()
    }

    /// The objective (its target network, teacher, sampler state).
    pub fn objective(&self) -> &dyn Objective {
        self.objective.as_ref()
    }

    /// Saves a checkpoint: to `path` if it names a `.safetensors` file, else into the run
    /// folder `path` (`checkpoint.safetensors` + `config.json`).
    pub fn save(&self, path: &Path) -> Result<PathBuf> {
        let (file, folder) = checkpoint_path(path);
        let mut tensors = HashMap::new();
        checkpoint::add_prefixed(&mut tensors, "model", self.model.params().tensors()?);
        checkpoint::add_prefixed(&mut tensors, "ema", self.ema.tensors()?);
        checkpoint::add_prefixed(&mut tensors, "optimizer", self.optimizer.state_tensors()?);
        let objective = self.objective.state()?;
        checkpoint::add_prefixed(&mut tensors, "objective", objective.tensors);
        let schedule = ScheduleRecord {
            name: self.schedule.name.clone(),
            betas: self.schedule.betas.clone(),
            alphas_cumprod: self.schedule.alphas_cumprod.clone(),
        };
        let mut meta = HashMap::new();
        meta.insert(
            "model".to_string(),
            checkpoint::to_json(self.model.config())?,
        );
        meta.insert("train".to_string(), checkpoint::to_json(&self.config)?);
        meta.insert(
            "state".to_string(),
            checkpoint::to_json(&self.state(objective.json))?,
        );
        meta.insert("schedule".to_string(), checkpoint::to_json(&schedule)?);
        checkpoint::save(&file, &tensors, meta)?;
        if let Some(folder) = folder {
            let summary = serde_json::json!({
                "model": self.model.config(),
                "train": self.config,
                "step": self.step,
                "schedule": {"name": self.schedule.name, "num_train_timesteps": self.schedule.len()},
                "extra": self.extra,
            });
            let text = serde_json::to_string_pretty(&summary)
                .map_err(|e| Error::Value(format!("cannot serialise the config: {e}")))?;
            checkpoint::write_atomic(&folder.join(CONFIG_FILE), text.as_bytes())?;
        }
        Ok(file)
    }

    /// Restores a trainer from a checkpoint and the same data it was trained on; training
    /// continues exactly where it stopped.
    pub fn resume(
        path: &Path,
        data: Vec<f32>,
        data_shape: Vec<usize>,
        labels: Option<Vec<u32>>,
        device: &Device,
    ) -> Result<Self> {
        Self::resume_with_teacher(path, data, data_shape, labels, device, None)
    }

    /// As [`Trainer::resume`]; a distillation run whose teacher the checkpoint does not hold
    /// (an external teacher) needs it again as `teacher`.
    pub fn resume_with_teacher(
        path: &Path,
        data: Vec<f32>,
        data_shape: Vec<usize>,
        labels: Option<Vec<u32>>,
        device: &Device,
        teacher: Option<TeacherNet>,
    ) -> Result<Self> {
        let (file, _) = checkpoint_path(path);
        let (tensors, meta) = checkpoint::load(&file, device)?;
        let model_config: ModelConfig = checkpoint::json_entry(&file, &meta, "model")?;
        let config: TrainConfig = checkpoint::json_entry(&file, &meta, "train")?;
        let state: TrainState = checkpoint::json_entry(&file, &meta, "state")?;
        let sched: ScheduleRecord = checkpoint::json_entry(&file, &meta, "schedule")?;
        let schedule = Schedule::from_parts(&sched.name, sched.betas, sched.alphas_cumprod)?;
        let model = Model::new(model_config, 0, device)?;
        model.params().load(
            &checkpoint::with_prefix(&tensors, "model"),
            &file.display().to_string(),
        )?;
        let per: usize = data_shape.iter().product();
        let count = data.len().checked_div(per).unwrap_or(0);
        if data_shape != state.data_shape || count != state.data_count {
            shape_error!(
                "{} was trained on {} samples of shape {:?}, but the data given has {count} samples of \
                 shape {data_shape:?}: resume with the same data",
                file.display(),
                state.data_count,
                state.data_shape
            );
        }
        let what = file.display().to_string();
        let objective_json = match (state.objective, state.sampler_losses) {
            (serde_json::Value::Null, Some(losses)) => serde_json::json!({
                "sampler_losses": losses,
                "sampler_counts": state.sampler_counts.unwrap_or_default(),
                "sampler_draws": state.sampler_draws.unwrap_or_default(),
            }),
            (v, _) => v,
        };
        let objective_state = ObjectiveState {
            tensors: checkpoint::with_prefix(&tensors, "objective"),
            json: objective_json,
        };
        let teacher = match teacher {
            Some(t) => Some(t),
            None => distill::teacher_from_state(&objective_state, &what)?.map(TeacherNet::Model),
        };
        if config.objective.needs_teacher() && teacher.is_none() {
            value_error!(
                "{what} distils an external teacher that the checkpoint cannot hold: pass the \
                 teacher again to resume"
            );
        }
        let mut trainer =
            Trainer::with_teacher(model, schedule, config, data, data_shape, labels, teacher)?;
        trainer.optimizer.load_state(
            &checkpoint::with_prefix(&tensors, "optimizer"),
            state.optimizer_steps,
        )?;
        trainer
            .ema
            .load(&checkpoint::with_prefix(&tensors, "ema"), state.ema_steps)?;
        trainer.objective.load_state(objective_state, &what)?;
        trainer.step = state.step;
        trainer.losses = state.losses;
        trainer.extra = state.extra;
        Ok(trainer)
    }
}

/// Fits a classifier on `data` (rows of `classifier.in_dim()` values) with AdamW and
/// minibatches drawn by the counter-based generator; returns the loss of every step. With a
/// `schedule` (noisy classifiers) each row is first noised to a uniformly drawn timestep.
#[allow(clippy::too_many_arguments)]
pub fn fit_classifier(
    classifier: &crate::nn::Classifier,
    schedule: Option<&Schedule>,
    data: &[f32],
    labels: &[u32],
    steps: u64,
    batch_size: usize,
    lr: f64,
    seed: u64,
) -> Result<Vec<f32>> {
    if schedule.is_some() != classifier.is_noisy() {
        value_error!(
            "a noisy classifier (time_embed_dim > 0) trains with a schedule, a clean one without"
        );
    }
    let d = classifier.in_dim();
    let n = labels.len();
    if n == 0 || data.len() != n * d {
        shape_error!(
            "data holds {} values but {n} labels of {d} values each were expected",
            data.len()
        );
    }
    if batch_size == 0 || lr.is_nan() || lr <= 0.0 {
        value_error!("batch_size and lr must be positive");
    }
    let mut opt = AdamW::new(classifier.params().named_vars(), AdamWConfig::default())?;
    let mut losses = Vec::with_capacity(steps as usize);
    for s in 0..steps {
        let u = uniforms(seed, SHUFFLE_STREAM ^ s, batch_size);
        let idx: Vec<usize> = u
            .iter()
            .map(|&v| ((v as f64 * n as f64) as usize).min(n - 1))
            .collect();
        let mut x = Vec::with_capacity(batch_size * d);
        let mut y = Vec::with_capacity(batch_size);
        for &i in &idx {
            x.extend_from_slice(&data[i * d..(i + 1) * d]);
            y.push(labels[i]);
        }
        let (x, t) = match schedule {
            Some(sch) => {
                let u = uniforms(seed, NOISE_STREAM ^ (s << 1), batch_size);
                let t: Vec<i64> = u
                    .iter()
                    .map(|&v| ((v as f64 * sch.len() as f64) as i64).min(sch.len() as i64 - 1))
                    .collect();
                let mut noise = vec![0f32; x.len()];
                fill_normal(seed, NOISE_STREAM + s, 0, &mut noise);
                let mut xt = vec![0f32; x.len()];
                q_sample(sch, &[batch_size, d], &x, &t, &noise, &mut xt)?;
                (xt, Some(t.iter().map(|&v| v as f32).collect::<Vec<f32>>()))
            }
            None => (x, None),
        };
        let x = Tensor::from_vec(x, (batch_size, d), &Device::Cpu)?;
        let loss = classifier.cross_entropy(&x, t.as_deref(), &y)?;
        let grads = loss.backward()?;
        opt.step(&grads, lr * lr_factor(LrDecay::Cosine, 0, steps, s), 1.0)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(losses)
}

/// (checkpoint file, run folder if `path` is one).
pub fn checkpoint_path(path: &Path) -> (PathBuf, Option<PathBuf>) {
    if path.extension().is_some_and(|e| e == "safetensors") {
        (path.to_path_buf(), None)
    } else {
        (path.join(CHECKPOINT_FILE), Some(path.to_path_buf()))
    }
}

/// The configuration, schedule and extra metadata stored in a checkpoint.
pub fn read_checkpoint_info(path: &Path) -> Result<(ModelConfig, Schedule, serde_json::Value)> {
    let (file, _) = checkpoint_path(path);
    let (_, meta) = checkpoint::load(&file, &Device::Cpu)?;
    let model: ModelConfig = checkpoint::json_entry(&file, &meta, "model")?;
    let schedule = match schedule_from_meta(&file, &meta)? {
        Some(s) => s,
        None => Schedule::linear(1000, 1e-4, 0.02, false)?,
    };
    let extra = match meta.get("state") {
        Some(_) => checkpoint::json_entry::<TrainState>(&file, &meta, "state")?.extra,
        None => serde_json::Value::Null,
    };
    Ok((model, schedule, extra))
}

/// A model's weights alone (`model.*` tensors and its configuration) as safetensors bytes.
pub fn model_to_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut tensors = HashMap::new();
    checkpoint::add_prefixed(&mut tensors, "model", model.params().tensors()?);
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), checkpoint::to_json(model.config())?);
    checkpoint::to_bytes(&tensors, meta)
}

/// Saves a model's weights alone, atomically.
pub fn save_model(model: &Model, path: &Path) -> Result<()> {
    checkpoint::write_atomic(path, &model_to_bytes(model)?)
}

/// Loads a model from a model file or a training checkpoint (a run folder or its file); from
/// a checkpoint, `ema` picks the EMA weights (the default for sampling).
pub fn load_model(path: &Path, device: &Device, ema: bool) -> Result<Model> {
    let (file, _) = checkpoint_path(path);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    model_from_bytes(&bytes, &file, device, ema)
}

/// The schedule a checkpoint's metadata records, if it records one.
fn schedule_from_meta(file: &Path, meta: &HashMap<String, String>) -> Result<Option<Schedule>> {
    match meta.get("schedule") {
        Some(_) => {
            let s: ScheduleRecord = checkpoint::json_entry(file, meta, "schedule")?;
            Ok(Some(Schedule::from_parts(
                &s.name,
                s.betas,
                s.alphas_cumprod,
            )?))
        }
        None => Ok(None),
    }
}

/// As [`load_model`], with the schedule the checkpoint records (None: a bare model file); the
/// file is read and parsed once.
pub fn load_model_and_schedule(
    path: &Path,
    device: &Device,
    ema: bool,
) -> Result<(Model, Option<Schedule>)> {
    let (file, _) = checkpoint_path(path);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let (tensors, meta) = checkpoint::from_bytes(&bytes, &file, device)?;
    let schedule = schedule_from_meta(&file, &meta)?;
    Ok((
        model_from_parts(&tensors, &meta, &file, device, ema)?,
        schedule,
    ))
}

/// [`load_model`] from bytes; `source` names them in errors.
pub fn model_from_bytes(bytes: &[u8], source: &Path, device: &Device, ema: bool) -> Result<Model> {
    let (tensors, meta) = checkpoint::from_bytes(bytes, source, device)?;
    model_from_parts(&tensors, &meta, source, device, ema)
}

fn model_from_parts(
    tensors: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
    file: &Path,
    device: &Device,
    ema: bool,
) -> Result<Model> {
    let config: ModelConfig = checkpoint::json_entry(file, meta, "model")?;
    let model = Model::new(config, 0, device)?;
    let ema_weights = checkpoint::with_prefix(tensors, "ema");
    let mut weights = checkpoint::with_prefix(tensors, "model");
    if ema && !ema_weights.is_empty() {
        // The EMA covers the trained parameters (a ControlNet's frozen base has none).
        weights.extend(ema_weights);
    }
    model.params().load(&weights, &file.display().to_string())?;
    Ok(model)
}

/// The file a classifier folder holds.
pub const CLASSIFIER_FILE: &str = "classifier.safetensors";

/// A classifier's weights and configuration, with the schedule a noisy classifier was trained
/// on, as safetensors bytes.
pub fn classifier_to_bytes(
    classifier: &crate::nn::Classifier,
    schedule: Option<&Schedule>,
) -> Result<Vec<u8>> {
    let mut tensors = HashMap::new();
    checkpoint::add_prefixed(&mut tensors, "classifier", classifier.params().tensors()?);
    let mut meta = HashMap::new();
    meta.insert(
        "classifier".to_string(),
        checkpoint::to_json(&classifier.config())?,
    );
    if let Some(s) = schedule {
        meta.insert(
            "schedule".to_string(),
            checkpoint::to_json(&ScheduleRecord {
                name: s.name.clone(),
                betas: s.betas.clone(),
                alphas_cumprod: s.alphas_cumprod.clone(),
            })?,
        );
    }
    checkpoint::to_bytes(&tensors, meta)
}

/// A classifier file: `path` itself if it ends in `.safetensors`, else `path/classifier.safetensors`.
pub fn classifier_path(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "safetensors") {
        path.to_path_buf()
    } else {
        path.join(CLASSIFIER_FILE)
    }
}

/// Saves a classifier (and its training schedule) atomically; returns the file written.
pub fn save_classifier(
    classifier: &crate::nn::Classifier,
    schedule: Option<&Schedule>,
    path: &Path,
) -> Result<PathBuf> {
    let file = classifier_path(path);
    if let Some(dir) = file.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    checkpoint::write_atomic(&file, &classifier_to_bytes(classifier, schedule)?)?;
    Ok(file)
}

/// [`load_classifier`] from bytes; `source` names them in errors.
pub fn classifier_from_bytes(
    bytes: &[u8],
    source: &Path,
) -> Result<(crate::nn::Classifier, Option<Schedule>)> {
    let (tensors, meta) = checkpoint::from_bytes(bytes, source, &Device::Cpu)?;
    let config: crate::nn::ClassifierConfig = checkpoint::json_entry(source, &meta, "classifier")?;
    let classifier = crate::nn::Classifier::from_config(&config, 0)?;
    classifier.params().load(
        &checkpoint::with_prefix(&tensors, "classifier"),
        &source.display().to_string(),
    )?;
    let schedule = match meta.get("schedule") {
        Some(_) => {
            let s: ScheduleRecord = checkpoint::json_entry(source, &meta, "schedule")?;
            Some(Schedule::from_parts(&s.name, s.betas, s.alphas_cumprod)?)
        }
        None => None,
    };
    Ok((classifier, schedule))
}

/// Loads a classifier saved by [`save_classifier`] (a file or a folder holding one).
pub fn load_classifier(path: &Path) -> Result<(crate::nn::Classifier, Option<Schedule>)> {
    let file = classifier_path(path);
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    classifier_from_bytes(&bytes, &file)
}

#[cfg(test)]
mod tests;

/// The diffusion loss the trainer's settings describe.
fn diffusion_objective(
    schedule: &Schedule,
    settings: Settings,
    bins: u32,
) -> Result<objective::DiffusionObjective> {
    objective::DiffusionObjective::new(
        schedule.clone(),
        settings.prediction,
        settings.weighting,
        settings.loss,
        settings.sampling,
        bins,
    )
}

/// The objective a configuration asks for.
fn build_objective(
    config: &TrainConfig,
    settings: Settings,
    schedule: &Schedule,
    model: &Model,
    data_shape: &[usize],
    teacher: Option<TeacherNet>,
) -> Result<Box<dyn Objective>> {
    let name = config.objective.name();
    let teacher = match (config.objective.needs_teacher(), teacher) {
        (true, None) => value_error!("the {name} objective needs a teacher"),
        (false, Some(_)) => value_error!("the {name} objective takes no teacher"),
        // A private copy: training a student that shares the teacher's weights (a student
        // initialised from its teacher) must not move the teacher.
        (_, Some(TeacherNet::Model(m))) => {
            Some(TeacherNet::Model(m.with_weights(&m.params().tensors()?)?))
        }
        (_, t) => t,
    };
    let classes = model.config().num_classes();
    let dims: usize = data_shape.iter().product();
    let make_teacher = |net: TeacherNet, prediction: &str, guidance: Option<f64>| {
        Teacher::new(
            net,
            Prediction::parse(prediction)?,
            guidance,
            schedule,
            classes,
            data_shape,
        )
    };
    Ok(match (&config.objective, teacher) {
        (ObjectiveConfig::Diffusion, _) => {
            Box::new(diffusion_objective(schedule, settings, config.bins)?)
        }
        (ObjectiveConfig::ProgressiveDistillation(c), Some(net)) => {
            let teacher = make_teacher(net, &c.teacher_prediction, c.guidance)?;
            Box::new(distill::ProgressiveObjective::new(
                c.clone(),
                teacher,
                settings.prediction,
                model.config().guidance_embed(),
                schedule,
            )?)
        }
        (ObjectiveConfig::ConsistencyDistillation(c), Some(net)) => {
            let teacher = make_teacher(net, &c.teacher_prediction, c.guidance)?;
            Box::new(consistency::ConsistencyObjective::distillation(
                c, teacher, model, dims,
            )?)
        }
        (ObjectiveConfig::SuperResolution(c), _) => {
            c.validate(model.config(), data_shape)?;
            Box::new(
                diffusion_objective(schedule, settings, config.bins)?
                    .with_super_resolution(c.clone()),
            )
        }
        (ObjectiveConfig::Autoencoder(c), _) => Box::new(autoencoder::AutoencoderObjective::new(
            c,
            model,
            config.seed,
            config.lr,
        )?),
        (ObjectiveConfig::ConsistencyTraining(c), _) => Box::new(
            consistency::ConsistencyObjective::training(c, model, dims, config.total_steps)?,
        ),
        (_, None) => value_error!("the {name} objective needs a teacher"),
    })
}

#[cfg(test)]
mod objective_tests;

fn join_dims(d: &[usize]) -> String {
    d.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
