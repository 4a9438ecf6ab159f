//! The autoencoder objective of latent diffusion's first stage (Rombach et al. 2022, App. G;
//! van den Oord et al. 2017 for VQ): an L1 or L2 reconstruction loss, plus
//! - KL: `kl_weight` × KL(q(z|x) ‖ N(0, I)) of a posterior sample (LDM's ~1e-6), or
//! - VQ: the codebook loss ‖sg[z] − e‖² (or, with `codebook_update = "ema"`, exponential moving
//!   averages of the assigned encoder outputs, Razavi et al. 2019) and β‖z − sg[e]‖², with
//!   restarts of codes whose usage falls under `dead_code_threshold` to encoder outputs of the
//!   batch (Dhariwal et al. 2020, Jukebox).
//!
//! - an optional adversarial term (Esser et al. 2021; LDM's first stages): a patch discriminator
//!   (`crate::nn::discriminator`) trained with the hinge loss ½(E relu(1 − D(x)) + E relu(1 +
//!   D(x̂))), and the generator term −E D(x̂) weighted by `disc_weight` × λ, the adaptive weight
//!   λ = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4) (clamped to [0, 1e4], not differentiated) at the
//!   decoder's last convolution W, both from step `disc_start` on. λ is computed through that
//!   layer alone: the gradient of a loss with respect to W is the correlation of the layer's
//!   input with the loss's gradient with respect to the reconstruction, so no second backward
//!   pass through the autoencoder is needed. The discriminator is updated after the
//!   autoencoder's step on the same batch's reconstructions (Adam, β = (0.5, 0.9)). LDM adds a
//!   perceptual (LPIPS) term to L_rec; ferrodiff has no pretrained perceptual network.
//!
//! Units: LDM sums the reconstruction and the KL over a sample's values; here the per-sample
//! loss is that sum divided by the number of image values, so `kl_weight` means what it means
//! in LDM and the loss reads as a per-pixel error. The VQ terms are means over latent values,
//! as in VQ-VAE.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWConfig};
use super::objective::{Batch, Objective, ObjectiveState};
use super::NOISE_STREAM;
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::nn::autoencoder::{codebook_usage, Autoencoder, AutoencoderKind};
use crate::nn::discriminator::PatchDiscriminator;
use crate::nn::params::uniforms;
use crate::nn::{Ctx, Model, ModelConfig};
use crate::value_error;

/// Generator stream of dead-code restarts (apart from the noise and shuffle streams).
const RESTART_STREAM: u64 = (1 << 62) + (1 << 59);
/// Name of the codebook parameter (diffusers' VQModel).
const CODEBOOK: &str = "quantize.embedding.weight";
/// Laplace smoothing of the EMA cluster sizes (Razavi et al. 2019's ε).
const EMA_EPS: f64 = 1e-5;
/// Seed offset of the discriminator's initial weights (apart from the model's).
const DISC_SEED: u64 = 0x5eed_d15c;
/// The adaptive weight's δ and clamp (taming-transformers' values).
const ADAPTIVE_DELTA: f64 = 1e-4;
const ADAPTIVE_MAX: f64 = 1e4;

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
    /// Weight of the adversarial term (a patch discriminator with the hinge loss); 0 (the
    /// default) trains without a discriminator. LDM's autoencoders use 0.5.
    pub disc_weight: f64,
    /// The step from which the discriminator trains and the adversarial term counts (LDM
    /// starts it after tens of thousands of reconstruction steps).
    pub disc_start: u64,
    /// Stride-2 stages of the discriminator (3 in pix2pix and LDM; a side s gives
    /// ⌊s / 2^n⌋ − 2 logits per row, so 28x28 images take at most 3, better 2).
    pub disc_layers: usize,
    /// Width of the discriminator's first layer (64 in LDM).
    pub disc_channels: usize,
    /// The discriminator's learning rate; None: the trainer's (LDM uses the same).
    pub disc_lr: Option<f64>,
    /// Scale the adversarial term by the adaptive weight λ (true, LDM) or by disc_weight alone.
    pub adaptive_weight: bool,
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
            disc_weight: 0.0,
            disc_start: 0,
            disc_layers: 3,
            disc_channels: 64,
            disc_lr: None,
            adaptive_weight: true,
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
        if !(self.disc_weight >= 0.0 && self.disc_weight.is_finite()) {
            value_error!(
                "disc_weight must be >= 0 and finite, got {}",
                self.disc_weight
            );
        }
        if self.disc_layers == 0 || self.disc_layers > 8 || self.disc_channels == 0 {
            value_error!(
                "disc_layers must be in 1..=8 and disc_channels positive, got {} and {}",
                self.disc_layers,
                self.disc_channels
            );
        }
        if let Some(lr) = self.disc_lr {
            if !(lr > 0.0 && lr.is_finite()) {
                value_error!("disc_lr must be positive and finite, got {lr}");
            }
        }
        Ok(())
    }

    /// Whether a discriminator trains alongside.
    pub fn adversarial(&self) -> bool {
        self.disc_weight > 0.0
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
    /// Adversarial steps: the generator term −E D(x̂), its weight disc_weight × λ, the
    /// discriminator's hinge loss and its mean logits on real and reconstructed images.
    pub adversarial: Option<f64>,
    pub adversarial_weight: Option<f64>,
    pub disc_loss: Option<f64>,
    pub logits_real: Option<f64>,
    pub logits_fake: Option<f64>,
}

/// The discriminator, its optimiser and the pair it learns from next.
struct Adversary {
    net: PatchDiscriminator,
    optimizer: AdamW,
    lr: f64,
    /// The last step's images and reconstructions (detached), consumed by `after_step`.
    pending: Option<(Tensor, Tensor)>,
}

impl Adversary {
    fn new(config: &AutoencoderLossConfig, model: &Model, seed: u64, lr: f64) -> Result<Self> {
        let ModelConfig::Autoencoder(ae) = model.config() else {
            unreachable!("checked by the caller")
        };
        let min = PatchDiscriminator::min_side(config.disc_layers);
        if ae.image_size < min {
            value_error!(
                "a patch discriminator with disc_layers = {} needs images of at least {min} pixels \
                 (these are {}): use fewer layers",
                config.disc_layers,
                ae.image_size
            );
        }
        let net = PatchDiscriminator::new(
            ae.out_channels,
            config.disc_channels,
            config.disc_layers,
            seed ^ DISC_SEED,
            model.device(),
            candle_core::DType::F32,
        )?;
        let optimizer = AdamW::new(
            net.params().named_vars(),
            AdamWConfig {
                beta1: 0.5,
                beta2: 0.9,
                ..AdamWConfig::default()
            },
        )?;
        Ok(Adversary {
            net,
            optimizer,
            lr: config.disc_lr.unwrap_or(lr),
            pending: None,
        })
    }
}

/// ‖∂L/∂W‖ for the convolution y = conv(h, W) + b (stride 1, `padding`) given g = ∂L/∂y: the
/// gradient of Σ y ⊙ g with respect to a copy of W, through this one layer.
fn layer_gradient_norm(h: &Tensor, weight: &Tensor, padding: usize, g: &Tensor) -> Result<f64> {
    let w = Var::from_tensor(&weight.detach())?;
    let y = crate::nn::kernels::conv2d(&h.detach(), w.as_tensor(), 1, padding)?;
    let grads = (y * g.detach())?.sum_all()?.backward()?;
    let dw = grads
        .get(w.as_tensor())
        .ok_or_else(|| Error::Value("the adaptive weight's layer has no gradient".into()))?;
    Ok((dw
        .sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
    .sqrt())
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
    adversary: Option<Adversary>,
    metrics: AutoencoderMetrics,
    step: u64,
    seed: u64,
}

impl AutoencoderObjective {
    /// The objective for `model`; a discriminator (when `config` asks for one) starts from
    /// weights drawn from `seed` and learns at `lr` unless `config.disc_lr` says otherwise.
    pub fn new(config: &AutoencoderLossConfig, model: &Model, seed: u64, lr: f64) -> Result<Self> {
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
            adversary: if config.adversarial() {
                Some(Adversary::new(config, model, seed, lr)?)
            } else {
                None
            },
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

    /// One hinge-loss step of the discriminator on the last batch's images and reconstructions.
    fn train_discriminator(&mut self) -> Result<()> {
        let Some(a) = &mut self.adversary else {
            return Ok(());
        };
        let Some((x, y)) = a.pending.take() else {
            return Ok(());
        };
        let real = a.net.forward(&x)?;
        let fake = a.net.forward(&y)?;
        let hinge_real = real.affine(-1.0, 1.0)?.relu()?.mean_all()?;
        let hinge_fake = fake.affine(1.0, 1.0)?.relu()?.mean_all()?;
        let loss = ((hinge_real + hinge_fake)? * 0.5)?;
        let value = mean_of(&loss)?;
        if !value.is_finite() {
            value_error!("the discriminator's loss is {value}: lower disc_lr or the learning rate");
        }
        let grads = loss.backward()?;
        a.optimizer.step(&grads, a.lr, 1.0)?;
        self.metrics.disc_loss = Some(value);
        self.metrics.logits_real = Some(mean_of(&real)?);
        self.metrics.logits_fake = Some(mean_of(&fake)?);
        Ok(())
    }
}

fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

impl AutoencoderObjective {
    /// The reconstruction error per value (L1 or L2) of `y` against `x`.
    fn reconstruction_error(&self, y: &Tensor, x: &Tensor) -> Result<Tensor> {
        let diff = (y - x)?;
        Ok(if self.config.reconstruction == "l1" {
            diff.abs()?
        } else {
            diff.sqr()?
        })
    }

    /// disc_weight × λ, with λ = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + δ) at the decoder's last layer W
    /// (or 1 without the adaptive weight), L_rec the batch's mean reconstruction loss and L_adv
    /// = −E D(x̂).
    fn adversarial_weight(
        &self,
        ae: &Autoencoder,
        x: &Tensor,
        y: &Tensor,
        hidden: &Tensor,
        disc: &PatchDiscriminator,
    ) -> Result<f64> {
        if !self.config.adaptive_weight {
            return Ok(self.config.disc_weight);
        }
        // The gradients of both losses with respect to the reconstruction, through a leaf.
        let leaf = Var::from_tensor(&y.detach())?;
        let rec = self.reconstruction_error(leaf.as_tensor(), x)?.mean_all()?;
        let g_rec = rec.backward()?;
        let adv = disc.forward(leaf.as_tensor())?.mean_all()?.neg()?;
        let g_adv = adv.backward()?;
        let missing = || Error::Value("the reconstruction has no gradient".into());
        let layer = ae.output_layer();
        let (w, pad) = (layer.weight(), layer.padding());
        let rec_norm = layer_gradient_norm(
            hidden,
            w,
            pad,
            g_rec.get(leaf.as_tensor()).ok_or_else(missing)?,
        )?;
        let adv_norm = layer_gradient_norm(
            hidden,
            w,
            pad,
            g_adv.get(leaf.as_tensor()).ok_or_else(missing)?,
        )?;
        let lambda = (rec_norm / (adv_norm + ADAPTIVE_DELTA)).clamp(0.0, ADAPTIVE_MAX);
        Ok(lambda * self.config.disc_weight)
    }
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
        let err = self.reconstruction_error(&out.reconstruction, &x)?;
        let mut loss = err.reshape((b, ()))?.mean(1)?;
        let mut metrics = AutoencoderMetrics {
            reconstruction: mean_of(&loss)?,
            ..Default::default()
        };
        if let Some(adversary) = &self.adversary {
            if batch.step >= self.config.disc_start {
                let y = &out.reconstruction;
                let weight =
                    self.adversarial_weight(ae, &x, y, &out.last_hidden, &adversary.net)?;
                let generator = adversary.net.forward(y)?.reshape((b, ()))?.mean(1)?.neg()?;
                metrics.adversarial = Some(mean_of(&generator)?);
                metrics.adversarial_weight = Some(weight);
                loss = (loss + (generator * weight)?)?;
            }
        }
        if let Some(adversary) = &mut self.adversary {
            adversary.pending = (batch.step >= self.config.disc_start)
                .then(|| (x.detach(), out.reconstruction.detach()));
        }
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
        self.train_discriminator()?;
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
        let mut json = serde_json::Value::Null;
        if let Some(a) = &self.adversary {
            for (name, t) in a.net.params().tensors()? {
                tensors.insert(format!("disc.{name}"), t);
            }
            for (name, t) in a.optimizer.state_tensors()? {
                tensors.insert(format!("disc_optimizer.{name}"), t);
            }
            json = serde_json::json!({ "disc_steps": a.optimizer.steps });
        }
        Ok(ObjectiveState { tensors, json })
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
        if let Some(a) = &mut self.adversary {
            let with_prefix = |prefix: &str| -> HashMap<String, Tensor> {
                state
                    .tensors
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                    .collect()
            };
            let steps = state.json.get("disc_steps").and_then(|v| v.as_u64());
            let weights = with_prefix("disc.");
            let (Some(steps), false) = (steps, weights.is_empty()) else {
                return Err(Error::BadFile {
                    path: what.to_string(),
                    message: "the checkpoint has no discriminator: it was trained without \
                              disc_weight"
                        .into(),
                });
            };
            a.net
                .params()
                .load(&weights, &format!("{what} (discriminator)"))?;
            a.optimizer
                .load_state(&with_prefix("disc_optimizer."), steps)?;
        }
        Ok(())
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(&self.metrics).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
#[path = "autoencoder_tests.rs"]
mod tests;
