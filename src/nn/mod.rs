//! Candle denoisers: an MLP for low-dimensional data, and a U-Net and a Diffusion Transformer
//! for images, built from a serialisable [`ModelConfig`] and seeded, differentiable end to end. A [`Model`] is also a
//! [`Denoiser`], so every sampler runs it without leaving Rust.

pub mod act;
pub mod ada_norm;
pub mod attention;
pub mod autoencoder;
pub mod classifier;
pub mod controlnet;
pub mod discriminator;
pub mod dit;
pub mod dit_sublayer;
pub mod flow;
pub mod kernels;
pub mod layers;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod op_timing;
pub mod params;
pub mod resize;
#[cfg(test)]
mod test_util;
pub mod unet;
pub mod upsample;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use autoencoder::{Autoencoder, AutoencoderConfig, AutoencoderKind};
pub use classifier::{Classifier, ClassifierConfig};
pub use dit::DiTConfig;
pub use layers::Ctx;
pub use mlp::MlpConfig;
pub use params::ParamStore;
pub use unet::UNetConfig;

use crate::error::Result;
use crate::sample::{Denoiser, ModelOutput};
use crate::{shape_error, value_error};

/// Which network, with its settings; round-trips through JSON (`{"type": "mlp", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    Unet(UNetConfig),
    /// The Diffusion Transformer (`{"type": "dit", ...}`).
    Dit(DiTConfig),
    /// A KL or VQ autoencoder (not a denoiser: trained with the autoencoder objective, used
    /// by latent diffusion to encode and decode).
    Autoencoder(AutoencoderConfig),
    /// A ControlNet: a frozen base network and a trainable copy of its encoder that reads a
    /// control image (`{"type": "control_net", "base": {...}, ...}`).
    ControlNet(controlnet::ControlNetConfig),
}

impl ModelConfig {
    /// The network's kind in words (for errors).
    pub fn kind_name(&self) -> &'static str {
        match self {
            ModelConfig::Mlp(_) => "MLP",
            ModelConfig::Unet(_) => "U-Net",
            ModelConfig::Dit(_) => "DiT",
            ModelConfig::Autoencoder(_) => "autoencoder",
            ModelConfig::ControlNet(_) => "ControlNet",
        }
    }

    /// A ControlNet's configuration (None for other networks).
    pub fn controlnet(&self) -> Option<&controlnet::ControlNetConfig> {
        match self {
            ModelConfig::ControlNet(c) => Some(c),
            _ => None,
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Mlp(c) => c.num_classes,
            ModelConfig::Unet(c) => c.num_classes,
            ModelConfig::Dit(c) => c.num_classes,
            ModelConfig::Autoencoder(_) => 0,
            ModelConfig::ControlNet(c) => c.base.num_classes(),
        }
    }

    /// Width of cross-attention contexts (0: the model takes none).
    pub fn context_dim(&self) -> usize {
        match self {
            ModelConfig::Mlp(_) | ModelConfig::Autoencoder(_) => 0,
            ModelConfig::Unet(c) => c.context_dim,
            ModelConfig::Dit(c) => c.context_dim,
            ModelConfig::ControlNet(c) => c.base.context_dim(),
        }
    }

    /// Whether the network takes the guidance scale as an input.
    pub fn guidance_embed(&self) -> bool {
        match self {
            ModelConfig::Mlp(_) | ModelConfig::Dit(_) | ModelConfig::Autoencoder(_) => false,
            ModelConfig::Unet(c) => c.guidance_embed,
            ModelConfig::ControlNet(c) => c.base.guidance_embed(),
        }
    }

    pub fn learn_sigma(&self) -> bool {
        match self {
            ModelConfig::Mlp(c) => c.learn_sigma,
            ModelConfig::Unet(c) => c.learn_sigma,
            ModelConfig::Dit(c) => c.learn_sigma,
            ModelConfig::Autoencoder(_) => false,
            ModelConfig::ControlNet(c) => c.base.learn_sigma(),
        }
    }

    /// One training sample's shape.
    pub fn data_shape(&self) -> Vec<usize> {
        match self {
            ModelConfig::Mlp(c) => c.data_shape.clone(),
            ModelConfig::Unet(c) => vec![c.in_channels, c.image_size, c.image_size],
            ModelConfig::Dit(c) => vec![c.in_channels, c.image_size, c.image_size],
            ModelConfig::Autoencoder(c) => vec![c.in_channels, c.image_size, c.image_size],
            ModelConfig::ControlNet(c) => c.base.data_shape(),
        }
    }

    /// Channels of a super-resolution model's conditioning image (0: none).
    pub fn cond_channels(&self) -> usize {
        match self {
            ModelConfig::Unet(c) => c.cond_channels,
            ModelConfig::ControlNet(c) => c.base.cond_channels(),
            _ => 0,
        }
    }

    /// Whether this is an autoencoder rather than a denoiser.
    pub fn is_autoencoder(&self) -> bool {
        matches!(self, ModelConfig::Autoencoder(_))
    }
}

/// What one forward pass is conditioned on.
#[derive(Clone, Copy, Default)]
pub struct Cond<'a> {
    /// Class labels [B] of a class-conditional model (`num_classes` = the null class); None:
    /// every row null.
    pub labels: Option<&'a [u32]>,
    /// Cross-attention context [B, M, context_dim]; None: the learned null context.
    pub context: Option<&'a Tensor>,
    /// Rows that take the learned null context instead of theirs (classifier-free guidance's
    /// unconditional rows, context dropout in training).
    pub null_context: Option<&'a [bool]>,
    /// Guidance scales [B] of a model that takes w as an input (`guidance_embed`); None: the
    /// model's default (1, plain conditional, unless set by [`Model::with_guidance_input`]).
    pub guidance: Option<&'a [f32]>,
    /// Super-resolution models: the conditioning image [B, cond_channels, H, W] (already
    /// upsampled to x's size) and its noise-augmentation levels [B] in [0, 1].
    pub low_res: Option<&'a Tensor>,
    pub aug_level: Option<&'a [f32]>,
    /// ControlNet: the control image [B, C, H·f, W·f] and a conditioning scale overriding the
    /// model's.
    pub control: Option<&'a Tensor>,
    pub control_scale: Option<f64>,
}

/// The context every row of a cross-attention model attends to, [B, M, context_dim]: the given
/// context with the learned `null_context` [1, context_dim] in the rows `cond.null_context`
/// marks, or the null context alone (M = 1) when none is given. None for models without
/// cross-attention (`null_context` None), where a given context is an error.
pub(crate) fn attended_context(
    null_context: Option<&Tensor>,
    batch: usize,
    cond: &Cond,
) -> Result<Option<Tensor>> {
    let Some(null) = null_context else {
        if cond.context.is_some() {
            value_error!(
                "a context was given but the model has no cross-attention (context_dim = 0)"
            );
        }
        return Ok(None);
    };
    let d = null.elem_count();
    let null = null.reshape((1, 1, d))?;
    let Some(c) = cond.context else {
        return Ok(Some(null.broadcast_as((batch, 1, d))?.contiguous()?));
    };
    let dims = c.dims();
    if dims.len() != 3 || dims[0] != batch || dims[2] != d || dims[1] == 0 {
        shape_error!(
            "context has shape {dims:?} but the model takes [B = {batch}, M, context_dim = {d}] with M >= 1"
        );
    }
    let c = c.to_dtype(null.dtype())?;
    let Some(rows) = cond.null_context else {
        return Ok(Some(c));
    };
    if rows.len() != batch {
        shape_error!(
            "null_context marks {} rows but the batch has {batch}",
            rows.len()
        );
    }
    if !rows.iter().any(|&r| r) {
        return Ok(Some(c));
    }
    let m: Vec<f32> = rows.iter().map(|&r| if r { 1.0 } else { 0.0 }).collect();
    let m = Tensor::from_vec(m, (batch, 1, 1), c.device())?.to_dtype(c.dtype())?;
    let keep = m.affine(-1.0, 1.0)?;
    Ok(Some(
        c.broadcast_mul(&keep)?
            .broadcast_add(&null.broadcast_mul(&m)?)?,
    ))
}

/// A context on the host: `data` holds [rows, len, dim] row-major.
#[derive(Clone, Copy, Debug)]
pub struct HostContext<'a> {
    pub data: &'a [f32],
    pub len: usize,
    pub dim: usize,
}

impl HostContext<'_> {
    pub fn rows(&self) -> usize {
        self.data.len() / (self.len * self.dim).max(1)
    }

    /// The context of `batch` rows where row i is row i mod rows() of this one (a guided
    /// batch repeats its contexts), as a tensor.
    pub fn tiled(&self, batch: usize, device: &Device) -> Result<Tensor> {
        let row = self.len * self.dim;
        let rows = self.rows();
        if rows == 0 || !batch.is_multiple_of(rows) {
            shape_error!("the context has {rows} rows but the batch has {batch}");
        }
        let mut v = Vec::with_capacity(batch * row);
        for _ in 0..batch / rows {
            v.extend_from_slice(self.data);
        }
        Ok(Tensor::from_vec(v, (batch, self.len, self.dim), device)?)
    }
}

#[derive(Clone)]
enum Net {
    Mlp(mlp::Mlp),
    Unet(Box<unet::UNet>),
    Dit(Box<dit::DiT>),
    Autoencoder(Box<Autoencoder>),
    Control(Box<controlnet::ControlNet>),
}

/// A network with its parameters.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    params: ParamStore,
    net: Net,
    /// The guidance scale fed to a `guidance_embed` network when the call gives none.
    guidance_input: f32,
    /// A super-resolution model's conditioning for calls that give none: the upsampled
    /// (and augmented) images [N, C, H, W] and their augmentation levels [N].
    low_res_input: Option<std::sync::Arc<LowResInput>>,
    /// A ControlNet's control images [N, C, H, W] for calls that give none, and the scale.
    control_input: Option<std::sync::Arc<ControlInput>>,
}

/// See [`Model::with_control`].
struct ControlInput {
    data: Vec<f32>,
    shape: [usize; 4],
    scale: Option<f64>,
}

/// See [`Model::with_low_res`].
struct LowResInput {
    data: Vec<f32>,
    shape: [usize; 4],
    levels: Vec<f32>,
}

impl Model {
    /// A freshly initialised model; the same `seed` gives the same weights everywhere.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::new_in(config, seed, device, DType::F32)
    }

    /// As [`Model::new`] with parameters of type `dtype` (inputs must match it).
    pub fn new_in(config: ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let params = ParamStore::new(seed, device.clone(), dtype);
        let root = params.root();
        let net = match &config {
            ModelConfig::Mlp(c) => Net::Mlp(mlp::Mlp::new(&root, c)?),
            ModelConfig::Unet(c) => Net::Unet(Box::new(unet::UNet::new(&root, c)?)),
            ModelConfig::Dit(c) => Net::Dit(Box::new(dit::DiT::new(&root, c)?)),
            ModelConfig::Autoencoder(c) => Net::Autoencoder(Box::new(Autoencoder::new(&root, c)?)),
            ModelConfig::ControlNet(c) => {
                Net::Control(Box::new(controlnet::ControlNet::new(&root, c)?))
            }
        };
        Ok(Model {
            config,
            params,
            net,
            guidance_input: 1.0,
            low_res_input: None,
            control_input: None,
        })
    }

    /// The same model (sharing its weights) whose `guidance_embed` network sees the guidance
    /// scale `w` when a call gives none (what a sampler's `guidance_scale` sets for such a model).
    pub fn with_guidance_input(&self, w: f32) -> Model {
        Model {
            guidance_input: w,
            ..self.clone()
        }
    }

    /// Super-resolution models: the same model (sharing its weights) conditioned, in calls that
    /// give no conditioning image, on the low-resolution images `low` [N, C, h, w]: upsampled
    /// to the model's resolution by `upsample` and, with `noise_seed`, corrupted at
    /// augmentation level `aug_level` first (non-truncated conditioning augmentation; without
    /// a seed the images are taken as already at that level, the truncated variant). Row i of a
    /// batch takes image i mod N (a guided batch repeats its rows).
    pub fn with_low_res(
        &self,
        low: &[f32],
        shape: &[usize],
        aug_level: f32,
        noise_seed: Option<u64>,
        upsample: resize::Upsample,
    ) -> Result<Model> {
        let ModelConfig::Unet(c) = &self.config else {
            value_error!("with_low_res needs a super-resolution U-Net (cond_channels > 0)");
        };
        if c.cond_channels == 0 {
            value_error!(
                "this model takes no conditioning image (cond_channels = 0): build the U-Net with \
                 cond_channels and aug_embed for super-resolution"
            );
        }
        if shape.len() != 4
            || shape[0] == 0
            || shape[1] != c.cond_channels
            || shape[2] == 0
            || shape[3] == 0
        {
            shape_error!(
                "low-resolution images have shape {shape:?} but the model takes [N, {}, h, w]",
                c.cond_channels
            );
        }
        if shape[2] > c.image_size || shape[3] > c.image_size {
            value_error!(
                "the conditioning images ({}x{}) are larger than the model's resolution {}",
                shape[2],
                shape[3],
                c.image_size
            );
        }
        if !(0.0..=1.0).contains(&aug_level) {
            value_error!("aug_level must lie in [0, 1], got {aug_level}");
        }
        if !c.aug_embed && aug_level != 0.0 {
            value_error!("aug_level {aug_level} given but the model has no augmentation embedding (aug_embed = false)");
        }
        if let Some(bad) = low.iter().position(|v| !v.is_finite()) {
            value_error!(
                "the low-resolution images contain a non-finite value at flat index {bad}"
            );
        }
        let n = shape[0];
        let mut data = low.to_vec();
        if let Some(seed) = noise_seed {
            resize::augment(
                &mut data,
                n,
                &vec![aug_level; n],
                seed,
                resize::AUG_SAMPLE_STREAM,
            )?;
        }
        let s = c.image_size;
        let data = resize::resize(&data, [n, shape[1], shape[2], shape[3]], s, s, upsample)?;
        Ok(Model {
            low_res_input: Some(std::sync::Arc::new(LowResInput {
                data,
                shape: [n, shape[1], s, s],
                levels: vec![aug_level; n],
            })),
            ..self.clone()
        })
    }

    /// ControlNets: the same model (sharing its weights) conditioned, in calls that give none,
    /// on the control images `images` [N, C, H, W] (row i of a batch takes image i mod N, so a
    /// guided batch repeats them) at conditioning scale `scale` (None: the configuration's).
    pub fn with_control(
        &self,
        images: &[f32],
        shape: &[usize],
        scale: Option<f64>,
    ) -> Result<Model> {
        let Some(c) = self.config.controlnet() else {
            value_error!(
                "control images condition a ControlNet (fd.nn.ControlNet.from_unet); this is a {}",
                self.config.kind_name()
            );
        };
        let d = self.config.data_shape();
        let f = c.control_factor();
        let want = [c.conditioning_channels, d[1] * f, d[2] * f];
        if shape.len() != 4 || shape[0] == 0 || shape[1..] != want[..] {
            shape_error!(
                "control images have shape {shape:?} but this ControlNet takes [N, {}, {}, {}]",
                want[0],
                want[1],
                want[2]
            );
        }
        if images.len() != shape.iter().product::<usize>() {
            shape_error!(
                "{} values for control images of shape {shape:?}",
                images.len()
            );
        }
        if let Some(bad) = images.iter().position(|v| !v.is_finite()) {
            value_error!("the control images contain a non-finite value at flat index {bad}");
        }
        if scale.is_some_and(|s| !s.is_finite()) {
            value_error!("the conditioning scale must be finite");
        }
        Ok(Model {
            control_input: Some(std::sync::Arc::new(ControlInput {
                data: images.to_vec(),
                shape: [shape[0], shape[1], shape[2], shape[3]],
                scale,
            })),
            ..self.clone()
        })
    }

    /// A ControlNet whose base is `base` (its weights copied, frozen in training) and whose
    /// control branch starts as a copy of the base's encoder, with zero-initialised output
    /// layers: it computes exactly what `base` does until trained. `seed` draws the control
    /// image embedding's first layers.
    pub fn controlnet_from(
        base: &Model,
        conditioning_channels: usize,
        conditioning_embedding_channels: Vec<usize>,
        conditioning_scale: f64,
        seed: u64,
    ) -> Result<Model> {
        let config = controlnet::ControlNetConfig {
            base: Box::new(base.config.clone()),
            conditioning_channels,
            conditioning_embedding_channels,
            conditioning_scale,
        };
        let model = Model::new_in(
            ModelConfig::ControlNet(config),
            seed,
            base.device(),
            base.params.dtype(),
        )?;
        let weights = base.params.tensors()?;
        let mut copy: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (format!("{}{k}", controlnet::BASE_PREFIX), v.clone()))
            .collect();
        let branch: std::collections::HashSet<String> =
            model.trainable_vars().into_iter().map(|(n, _)| n).collect();
        for (k, v) in weights {
            if branch.contains(&k) {
                copy.insert(k, v);
            }
        }
        model.params.load_matching(&copy, "the base model")?;
        Ok(model)
    }

    /// A model of the same configuration holding `weights` (e.g. the EMA weights).
    pub fn with_weights(&self, weights: &HashMap<String, Tensor>) -> Result<Model> {
        let m = Model::new(self.config.clone(), 0, self.params.device())?;
        m.params.load(weights, "the weights")?;
        Ok(m)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The autoencoder of an autoencoder model; a clear error for a denoiser.
    pub fn autoencoder(&self) -> Result<&Autoencoder> {
        match &self.net {
            Net::Autoencoder(a) => Ok(a),
            _ => value_error!(
                "this is a denoiser, not an autoencoder: build one with fd.nn.AutoencoderKL or fd.nn.VQModel"
            ),
        }
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The parameters training moves: all of them, except a ControlNet's frozen base.
    pub fn trainable_vars(&self) -> Vec<(String, candle_core::Var)> {
        let frozen = match &self.config {
            ModelConfig::ControlNet(_) => Some(controlnet::BASE_PREFIX),
            _ => None,
        };
        self.params
            .named_vars()
            .into_iter()
            .filter(|(n, _)| frozen.is_none_or(|p| !n.starts_with(p)))
            .collect()
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Checks an input shape [B, ...] against the model.
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        match &self.net {
            Net::Mlp(_) => {
                let want = self.config.data_shape();
                if shape.len() != want.len() + 1 || shape[1..] != want[..] {
                    shape_error!(
                        "x has shape {shape:?} but the model takes [B, {}]",
                        join(&want)
                    );
                }
                Ok(())
            }
            Net::Unet(u) => u.check_input(shape),
            Net::Dit(d) => d.check_input(shape),
            Net::Autoencoder(a) => a.check_input(shape),
            Net::Control(c) => c.check_input(shape),
        }
    }

    fn check_labels(&self, labels: Option<&[u32]>, batch: usize) -> Result<()> {
        let classes = self.config.num_classes();
        match labels {
            Some(_) if classes == 0 => {
                value_error!("labels were given but the model is unconditional (num_classes = 0)")
            }
            Some(y) if y.len() != batch => {
                shape_error!(
                    "labels have {} entries but the batch has {batch} rows",
                    y.len()
                )
            }
            Some(y) => {
                if let Some(bad) = y.iter().find(|&&v| v as usize > classes) {
                    value_error!(
                        "label {bad} is out of range: classes are 0..{} and {classes} is the null class",
                        classes - 1
                    );
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The model output for x [B, ...] at (possibly fractional) timesteps t [B]; `labels`
    /// [B] for class-conditional models (`num_classes` = the null class, also used when
    /// `labels` is None).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &[f32],
        labels: Option<&[u32]>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        self.forward_cond(
            x,
            t,
            &Cond {
                labels,
                ..Cond::default()
            },
            ctx,
        )
    }

    /// As [`Model::forward`] with every kind of conditioning (labels, cross-attention context).
    pub fn forward_cond(&self, x: &Tensor, t: &[f32], cond: &Cond, ctx: &Ctx) -> Result<Tensor> {
        let labels = cond.labels;
        if self.config.is_autoencoder() {
            value_error!(
                "an autoencoder is not a denoiser: use encode / decode, or fd.LatentDiffusion to \
                 run diffusion in its latent space"
            );
        }
        self.check_input(x.dims())?;
        if cond.context.is_some() && self.config.context_dim() == 0 {
            value_error!(
                "a context was given but the model has no cross-attention (context_dim = 0)"
            );
        }
        let batch = x.dims()[0];
        if t.len() != batch {
            shape_error!("t has {} entries but x has {batch} rows", t.len());
        }
        self.check_labels(labels, batch)?;
        let null;
        let labels = match labels {
            None if self.config.num_classes() > 0 => {
                null = vec![self.config.num_classes() as u32; batch];
                Some(null.as_slice())
            }
            other => other,
        };
        if let Some(g) = cond.guidance {
            if !self.config.guidance_embed() {
                value_error!(
                    "a guidance input was given but the model has none (guidance_embed = false)"
                );
            }
            if g.len() != batch {
                shape_error!("guidance has {} entries but x has {batch} rows", g.len());
            }
        }
        let default_w;
        let guidance = match cond.guidance {
            None if self.config.guidance_embed() => {
                default_w = vec![self.guidance_input; batch];
                Some(default_w.as_slice())
            }
            g => g,
        };
        match &self.net {
            Net::Mlp(m) => m.forward(x, t, labels, ctx),
            Net::Autoencoder(_) => Err(crate::Error::Value(
                "an autoencoder is not a denoiser".into(),
            )),
            Net::Unet(u) => u.forward(
                x,
                t,
                &Cond {
                    labels,
                    guidance,
                    ..*cond
                },
                ctx,
            ),
            Net::Dit(d) => d.forward(x, t, &Cond { labels, ..*cond }, ctx),
            Net::Control(c) => c.forward(
                x,
                t,
                &Cond {
                    labels,
                    guidance,
                    ..*cond
                },
                ctx,
            ),
        }
    }

    /// Inference on host data: x [B, ...] as a flat slice, integer timesteps.
    pub fn predict_host(
        &self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: Option<&[u32]>,
    ) -> Result<ModelOutput> {
        self.predict_host_cond(x, shape, t, labels, None, None)
    }

    /// As [`Model::predict_host`] with a cross-attention context (tiled over the batch when
    /// the batch is a multiple of its rows) and the rows that take the null context.
    pub fn predict_host_cond(
        &self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: Option<&[u32]>,
        context: Option<HostContext>,
        null_context: Option<&[bool]>,
    ) -> Result<ModelOutput> {
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        self.predict_host_real_t(x, shape, &tf, labels, context, null_context)
    }

    /// As [`Model::predict_host_cond`] at real-valued timesteps (the time embedding is
    /// sinusoidal, so fractional t between trained ones is well defined).
    pub fn predict_host_real_t(
        &self,
        x: &[f32],
        shape: &[usize],
        t: &[f32],
        labels: Option<&[u32]>,
        context: Option<HostContext>,
        null_context: Option<&[bool]>,
    ) -> Result<ModelOutput> {
        self.check_input(shape)?;
        let batch = shape[0];
        if t.len() != batch {
            shape_error!("t has {} entries but x has {batch} rows", t.len());
        }
        self.check_labels(labels, batch)?;
        if null_context.is_some_and(|n| n.len() != batch) {
            shape_error!("null_context marks rows of another batch size than {batch}");
        }
        let context = match context {
            Some(c) => Some(self.check_context(c)?.tiled(batch, self.device())?),
            None => None,
        };
        let low_res = match (&self.low_res_input, &self.config) {
            (Some(l), _) => {
                let [_, _, h, w] = l.shape;
                if shape.len() != 4 || shape[2] != h || shape[3] != w {
                    shape_error!(
                        "x has shape {shape:?} but the conditioning images are {h}x{w} (the model's resolution)"
                    );
                }
                let images = tiled_images(&l.data, l.shape, batch, "conditioning", self.device())?;
                let levels: Vec<f32> = (0..batch).map(|i| l.levels[i % l.shape[0]]).collect();
                Some((images, levels))
            }
            (None, ModelConfig::Unet(c)) if c.cond_channels > 0 => value_error!(
                "this super-resolution model is conditioned on a low-resolution image: give it one \
                 with model.with_low_res(images, aug_level=...) or sample it through fd.Cascade"
            ),
            _ => None,
        };
        let control = match (&self.control_input, self.config.controlnet()) {
            (Some(c), _) => Some(tiled_images(
                &c.data,
                c.shape,
                batch,
                "control",
                self.device(),
            )?),
            (None, Some(_)) => value_error!(
                "this ControlNet needs control images: pass control_image= to the sampler (or \
                 use model.with_control(images))"
            ),
            _ => None,
        };
        let control_scale = self.control_input.as_ref().and_then(|c| c.scale);
        // Inference runs in chunks of at most INFERENCE_CHUNK rows: candle's CPU ops slow down
        // more than linearly past a few hundred rows (cache), which would make a guided step
        // (one call on the doubled batch) cost more than two unguided ones. Rows are
        // independent, so chunking changes no result.
        let row: usize = shape[1..].iter().product();
        let mut data = Vec::new();
        let mut out_shape = Vec::new();
        for start in (0..batch).step_by(INFERENCE_CHUNK) {
            let n = INFERENCE_CHUNK.min(batch - start);
            let mut sh = shape.to_vec();
            sh[0] = n;
            let xt = Tensor::from_slice(
                &x[start * row..(start + n) * row],
                sh.as_slice(),
                self.device(),
            )?
            .to_dtype(self.params.dtype())?;
            let tf = &t[start..start + n];
            let ctx_chunk = match &context {
                Some(c) => Some(c.narrow(0, start, n)?),
                None => None,
            };
            let low_chunk = match &low_res {
                Some((t, _)) => Some(t.narrow(0, start, n)?),
                None => None,
            };
            let control_chunk = match &control {
                Some(t) => Some(t.narrow(0, start, n)?),
                None => None,
            };
            let cond = Cond {
                labels: labels.map(|l| &l[start..start + n]),
                context: ctx_chunk.as_ref(),
                null_context: null_context.map(|m| &m[start..start + n]),
                guidance: None,
                low_res: low_chunk.as_ref(),
                aug_level: low_res.as_ref().map(|(_, l)| &l[start..start + n]),
                control: control_chunk.as_ref(),
                control_scale,
            };
            let y = self.forward_cond(&xt, tf, &cond, &Ctx::eval())?;
            if out_shape.is_empty() {
                out_shape = y.dims().to_vec();
                out_shape[0] = batch;
            }
            data.extend(y.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(ModelOutput {
            data,
            shape: out_shape,
        })
    }
}

/// Images [N, C, H, W] (`data`) repeated to `batch` rows, row i taking image i mod N (a guided
/// batch repeats its conditioning); `what` names them in the error for a batch that is no
/// multiple of N.
fn tiled_images(
    data: &[f32],
    shape: [usize; 4],
    batch: usize,
    what: &str,
    device: &Device,
) -> Result<Tensor> {
    let [n, ch, h, w] = shape;
    if !batch.is_multiple_of(n) {
        shape_error!(
            "the model holds {n} {what} images but the batch has {batch} rows (a multiple of {n} \
             is needed)"
        );
    }
    let row = ch * h * w;
    let mut out = Vec::with_capacity(batch * row);
    for i in 0..batch {
        let r = i % n;
        out.extend_from_slice(&data[r * row..(r + 1) * row]);
    }
    Ok(Tensor::from_vec(out, (batch, ch, h, w), device)?)
}

/// Rows per network call at inference (see [`Model::predict_host_cond`]).
pub const INFERENCE_CHUNK: usize = 256;

impl Model {
    /// Checks a host context's width against the model.
    pub fn check_context<'a>(&self, c: HostContext<'a>) -> Result<HostContext<'a>> {
        let want = self.config.context_dim();
        if want == 0 {
            value_error!(
                "a context was given but the model has no cross-attention (context_dim = 0)"
            );
        }
        if c.dim != want {
            shape_error!(
                "context has width {} but the model was built with context_dim = {want}",
                c.dim
            );
        }
        if c.len == 0 || c.data.is_empty() || !c.data.len().is_multiple_of(c.len * c.dim) {
            shape_error!(
                "context must be [B, M, {want}] with M >= 1 and B >= 1 (got {} values, M = {})",
                c.data.len(),
                c.len
            );
        }
        if let Some(bad) = c.data.iter().position(|v| !v.is_finite()) {
            value_error!("context contains a non-finite value at flat index {bad}");
        }
        Ok(c)
    }
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A model as a sampler's denoiser, with fixed labels for conditional models.
pub struct ModelDenoiser<'a> {
    pub model: &'a Model,
    pub labels: Option<Vec<u32>>,
}

impl Denoiser for ModelDenoiser<'_> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        self.model.predict_host(x, shape, t, self.labels.as_deref())
    }
}

#[cfg(test)]
mod autoencoder_tests;
#[cfg(test)]
mod tests;
