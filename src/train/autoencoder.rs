//! The autoencoder objective of latent diffusion's first stage (Rombach et al. 2022, App. G;
//! van den Oord et al. 2017 for VQ): an L1 or L2 reconstruction loss, plus
//! - KL: `kl_weight` × KL(q(z|x) ‖ N(0, I)) of a posterior sample (LDM's ~1e-6), or
//! - VQ: the codebook loss ‖sg[z] − e‖² (or, with `codebook_update = "ema"`, exponential moving
//!   averages of the assigned encoder outputs, Razavi et al. 2019) and β‖z − sg[e]‖², with
//!   restarts of codes whose usage falls under `dead_code_threshold` to encoder outputs of the
//!   batch (Dhariwal et al. 2020, Jukebox).
//!
//! Units: LDM sums the reconstruction and the KL over a sample's values; here the per-sample
//! loss is that sum divided by the number of image values, so `kl_weight` means what it means
//! in LDM and the loss reads as a per-pixel error. The VQ terms are means over latent values,
//! as in VQ-VAE.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::objective::{Batch, Objective, ObjectiveState};
use super::NOISE_STREAM;
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::nn::autoencoder::{codebook_usage, AutoencoderKind};
use crate::nn::params::uniforms;
use crate::nn::{Ctx, Model, ModelConfig};
use crate::value_error;

/// Generator stream of dead-code restarts (apart from the noise and shuffle streams).
const RESTART_STREAM: u64 = (1 << 62) + (1 << 59);
/// Name of the codebook parameter (diffusers' VQModel).
const CODEBOOK: &str = "quantize.embedding.weight";
/// Laplace smoothing of the EMA cluster sizes (Razavi et al. 2019's ε).
const EMA_EPS: f64 = 1e-5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderLossConfig {
    /// "l1" (LDM) or "l2".
    pub reconstruction: String,
    /// KL models: weight of the KL term (LDM's kl-f4 / f8 use 1e-6).
    pub kl_weight: f64,
    /// KL models: decode a posterior sample (true, LDM) or the mean.
    pub sample_posterior: bool,
    /// VQ models: commitment weight β (0.25 in VQ-VAE and LDM).
    pub commitment: f64,
    /// VQ models: "loss" (the codebook moves by the codebook loss) or "ema".
    pub codebook_update: String,
    /// VQ models: decay of the EMA codebook and of the usage counts.
    pub ema_decay: f64,
    /// VQ models: restart a code whose EMA usage (expected assignments per batch) falls below
    /// this; 0 turns restarts off.
    pub dead_code_threshold: f64,
}

impl Default for AutoencoderLossConfig {
    fn default() -> Self {
        AutoencoderLossConfig {
            reconstruction: "l1".into(),
            kl_weight: 1e-6,
            sample_posterior: true,
            commitment: 0.25,
            codebook_update: "loss".into(),
            ema_decay: 0.99,
            dead_code_threshold: 0.0,
        }
    }
}

impl AutoencoderLossConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.reconstruction.as_str(), "l1" | "l2") {
            value_error!(
                "reconstruction must be 'l1' or 'l2', got {:?}",
                self.reconstruction
            );
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            value_error!("kl_weight must be >= 0 and finite, got {}", self.kl_weight);
        }
        if !(self.commitment >= 0.0 && self.commitment.is_finite()) {
            value_error!(
                "commitment must be >= 0 and finite, got {}",
                self.commitment
            );
        }
        if !matches!(self.codebook_update.as_str(), "loss" | "ema") {
            value_error!(
                "codebook_update must be 'loss' or 'ema', got {:?}",
                self.codebook_update
            );
        }
        if !(self.ema_decay > 0.0 && self.ema_decay < 1.0) {
            value_error!("ema_decay must be in (0, 1), got {}", self.ema_decay);
        }
        if !(self.dead_code_threshold >= 0.0 && self.dead_code_threshold.is_finite()) {
            value_error!(
                "dead_code_threshold must be >= 0 and finite, got {}",
                self.dead_code_threshold
            );
        }
        Ok(())
    }
}

/// What the last step measured (reported by the trainer's `objective_metrics`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AutoencoderMetrics {
    pub reconstruction: f64,
    pub kl: Option<f64>,
    pub commitment: Option<f64>,
    pub codes_used: Option<usize>,
    pub perplexity: Option<f64>,
    pub restarted: Option<usize>,
}

pub struct AutoencoderObjective {
    config: AutoencoderLossConfig,
    kind: AutoencoderKind,
    codebook_var: Option<Var>,
    /// EMA of each code's assignments per batch [K] (starting at 1) and (EMA codebook) of their
    /// sums [K, d] (starting at the codebook).
    cluster_size: Vec<f32>,
    embed_sum: Vec<f32>,
    /// The last batch's encoder outputs [N, d] and codes, consumed by `after_step`.
    pending: Option<(Vec<f32>, Vec<u32>)>,
    metrics: AutoencoderMetrics,
    step: u64,
    seed: u64,
}

impl AutoencoderObjective {
    pub fn new(config: &AutoencoderLossConfig, model: &Model) -> Result<Self> {
        config.validate()?;
        let ModelConfig::Autoencoder(ae) = model.config() else {
            value_error!(
                "the autoencoder objective trains an autoencoder (fd.nn.AutoencoderKL / fd.nn.VQModel), \
                 not a denoiser"
            );
        };
        let codebook_var = match ae.kind {
            AutoencoderKind::Vq => model
                .params()
                .named_vars()
                .into_iter()
                .find(|(n, _)| n == CODEBOOK)
                .map(|(_, v)| v),
            AutoencoderKind::Kl => None,
        };
        let (k, d) = (ae.num_vq_embeddings, ae.embed_dim());
        let embed_sum = match &codebook_var {
            Some(v) if config.codebook_update == "ema" => {
                crate::train::adamw::host_values(v.as_tensor())?
            }
            _ => Vec::new(),
        };
        debug_assert!(embed_sum.is_empty() || embed_sum.len() == k * d);
        Ok(AutoencoderObjective {
            config: config.clone(),
            kind: ae.kind,
            // Every code starts as if used once (with its own vector as the running sum), so an
            // unused code decays towards where it is instead of being divided by ~0.
            cluster_size: if ae.kind == AutoencoderKind::Vq {
                vec![1.0; k]
            } else {
                Vec::new()
            },
            embed_sum,
            codebook_var,
            pending: None,
            metrics: AutoencoderMetrics::default(),
            step: 0,
            seed: 0,
        })
    }

    fn ema(&self) -> bool {
        self.config.codebook_update == "ema"
    }

    pub fn metrics(&self) -> &AutoencoderMetrics {
        &self.metrics
    }
}

fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?.to_scalar::<f32>()? as f64)
}

impl Objective for AutoencoderObjective {
    fn per_sample_loss(&mut self, model: &Model, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let ae = model.autoencoder()?;
        let x = batch.x0_tensor(model)?;
        let b = batch.rows();
        self.step = batch.step;
        self.seed = batch.seed;
        let noise = if self.kind == AutoencoderKind::Kl && self.config.sample_posterior {
            let mut shape = vec![b];
            shape.extend(ae.config().latent_shape(batch.shape[2]));
            // Latents are [B, C, H/f, W/f]; W may differ from H.
            let f = ae.config().downsampling_factor();
            shape[3] = batch.shape[3] / f;
            let mut n = vec![0f32; shape.iter().product()];
            fill_normal(batch.seed, NOISE_STREAM + batch.step, 0, &mut n);
            Some(Tensor::from_vec(n, shape.as_slice(), model.device())?)
        } else {
            None
        };
        let out = ae.forward_train(&x, noise.as_ref(), ctx)?;
        let diff = (&out.reconstruction - &x)?;
        let err = if self.config.reconstruction == "l1" {
            diff.abs()?
        } else {
            diff.sqr()?
        };
        let mut loss = err.reshape((b, ()))?.mean(1)?;
        let mut metrics = AutoencoderMetrics {
            reconstruction: mean_of(&loss)?,
            ..Default::default()
        };
        if let Some(kl) = &out.kl {
            metrics.kl = Some(mean_of(kl)?);
            let per_value = self.config.kl_weight / batch.per_sample() as f64;
            loss = (loss + (kl * per_value)?)?;
        }
        if let (Some(cb), Some(cm)) = (&out.codebook, &out.commitment) {
            metrics.commitment = Some(mean_of(cm)?);
            if !self.ema() {
                loss = (loss + cb)?;
            }
            loss = (loss + (cm * self.config.commitment)?)?;
        }
        if let Some((tokens, codes)) = out.assignments {
            let (used, perplexity) = codebook_usage(&codes, self.cluster_size.len());
            metrics.codes_used = Some(used);
            metrics.perplexity = Some(perplexity);
            let z = tokens.flatten_all()?.to_vec1::<f32>()?;
            self.pending = Some((z, codes));
        }
        self.metrics = metrics;
        Ok(loss)
    }

    fn after_step(&mut self, _model: &Model) -> Result<()> {
        let (Some((z, codes)), Some(var)) = (self.pending.take(), &self.codebook_var) else {
            return Ok(());
        };
        let k = self.cluster_size.len();
        let n = codes.len();
        let d = z.len() / n.max(1);
        let gamma = self.config.ema_decay as f32;
        let mut counts = vec![0f32; k];
        for &c in &codes {
            counts[c as usize] += 1.0;
        }
        for (s, &c) in self.cluster_size.iter_mut().zip(&counts) {
            *s = gamma * *s + (1.0 - gamma) * c;
        }
        let mut book = crate::train::adamw::host_values(var.as_tensor())?;
        if self.ema() {
            let mut sums = vec![0f32; k * d];
            for (row, &c) in z.chunks_exact(d).zip(&codes) {
                for (s, &v) in sums[c as usize * d..(c as usize + 1) * d]
                    .iter_mut()
                    .zip(row)
                {
                    *s += v;
                }
            }
            for (m, &s) in self.embed_sum.iter_mut().zip(&sums) {
                *m = gamma * *m + (1.0 - gamma) * s;
            }
            // Laplace-smoothed cluster sizes keep unused codes from dividing by zero.
            let total: f64 = self.cluster_size.iter().map(|&v| v as f64).sum();
            for j in 0..k {
                let smoothed =
                    (self.cluster_size[j] as f64 + EMA_EPS) / (total + k as f64 * EMA_EPS) * total;
                if smoothed > 0.0 {
                    for (e, &m) in book[j * d..(j + 1) * d]
                        .iter_mut()
                        .zip(&self.embed_sum[j * d..(j + 1) * d])
                    {
                        *e = (m as f64 / smoothed) as f32;
                    }
                }
            }
        }
        let mut restarted = 0;
        let threshold = self.config.dead_code_threshold as f32;
        // Give every code the first 1/(1 − γ) steps to be used before it can be restarted.
        let warm = (self.step as f64 + 1.0) * (1.0 - self.config.ema_decay) >= 1.0;
        if threshold > 0.0 && warm && n > 0 {
            let u = uniforms(self.seed, RESTART_STREAM ^ self.step, k);
            for j in 0..k {
                if self.cluster_size[j] < threshold {
                    let pick = ((u[j] as f64 * n as f64) as usize).min(n - 1);
                    let row = &z[pick * d..(pick + 1) * d];
                    book[j * d..(j + 1) * d].copy_from_slice(row);
                    if self.ema() {
                        self.embed_sum[j * d..(j + 1) * d].copy_from_slice(row);
                    }
                    self.cluster_size[j] = 1.0;
                    restarted += 1;
                }
            }
        }
        if self.ema() || restarted > 0 {
            let t = var.as_tensor();
            var.set(&Tensor::from_vec(book, t.dims(), t.device())?.to_dtype(t.dtype())?)?;
        }
        self.metrics.restarted = Some(restarted);
        Ok(())
    }

    fn state(&self) -> Result<ObjectiveState> {
        let mut tensors = HashMap::new();
        let dev = candle_core::Device::Cpu;
        if !self.cluster_size.is_empty() {
            tensors.insert(
                "cluster_size".to_string(),
                Tensor::from_slice(&self.cluster_size, self.cluster_size.len(), &dev)?,
            );
        }
        if !self.embed_sum.is_empty() {
            tensors.insert(
                "embed_sum".to_string(),
                Tensor::from_slice(&self.embed_sum, self.embed_sum.len(), &dev)?,
            );
        }
        Ok(ObjectiveState {
            tensors,
            json: serde_json::Value::Null,
        })
    }

    fn load_state(&mut self, state: ObjectiveState, what: &str) -> Result<()> {
        let read = |name: &str, into: &mut Vec<f32>| -> Result<()> {
            if into.is_empty() {
                return Ok(());
            }
            let t = state.tensors.get(name).ok_or_else(|| Error::BadFile {
                path: what.to_string(),
                message: format!("the autoencoder objective's {name} is missing"),
            })?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != into.len() {
                return Err(Error::BadFile {
                    path: what.to_string(),
                    message: format!(
                        "the autoencoder objective's {name} does not match the codebook"
                    ),
                });
            }
            *into = v;
            Ok(())
        };
        read("cluster_size", &mut self.cluster_size)?;
        read("embed_sum", &mut self.embed_sum)?;
        Ok(())
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(&self.metrics).unwrap_or(serde_json::Value::Null)
    }
}
