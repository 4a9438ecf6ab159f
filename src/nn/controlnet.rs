//! ControlNet (Zhang et al. 2023) for ferrodiff's U-Net: a frozen base network and a trainable
//! copy of its encoder (conv_in, embeddings, down levels, middle block) that also sees a control
//! image. The control image passes through a small convolution stack whose last layer starts at
//! zero and is added to the copy's conv_in output; every skip of the copy and its middle output
//! go through zero-initialised 1x1 convolutions, scaled by the conditioning scale, and are added
//! to the base's skips and middle output before the base's decoder. At initialisation the
//! network therefore computes exactly what the base does.
//!
//! Parameter names follow diffusers' `ControlNetModel` for the control branch (`conv_in`,
//! `time_embedding`, `down_blocks`, `mid_block`, `controlnet_cond_embedding.{conv_in, blocks.i,
//! conv_out}`, `controlnet_down_blocks.i`, `controlnet_mid_block`); the frozen base's are its
//! own under `base.`, so a ControlNet checkpoint is self-contained.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{silu, Conv2d, Ctx};
use super::params::Path;
use super::unet::{UNet, UNetConfig};
use super::{Cond, ModelConfig};
use crate::error::Result;
use crate::{shape_error, value_error};

/// Prefix of the frozen base network's parameters.
pub const BASE_PREFIX: &str = "base.";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlNetConfig {
    /// The base network's configuration (a U-Net).
    pub base: Box<ModelConfig>,
    /// Channels of the control image (1 for an edge map or a mask).
    pub conditioning_channels: usize,
    /// Widths of the control image's embedding convolutions; each entry after the first halves
    /// the resolution, so the control image is 2^(len − 1) times the model's side (one entry:
    /// the model's own resolution, pixel-space models; latent models use more).
    pub conditioning_embedding_channels: Vec<usize>,
    /// Scale of the control residuals when a call sets none.
    pub conditioning_scale: f64,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        ControlNetConfig {
            base: Box::new(ModelConfig::Unet(UNetConfig::default())),
            conditioning_channels: 1,
            conditioning_embedding_channels: vec![16],
            conditioning_scale: 1.0,
        }
    }
}

impl ControlNetConfig {
    /// The base U-Net's configuration; a clear error for other bases.
    pub fn unet(&self) -> Result<&UNetConfig> {
        match self.base.as_ref() {
            ModelConfig::Unet(c) => Ok(c),
            other => value_error!(
                "a ControlNet is built on a U-Net here; the base is a {} model",
                other.kind_name()
            ),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.unet()?.validate()?;
        if self.conditioning_channels == 0
            || self.conditioning_embedding_channels.is_empty()
            || self.conditioning_embedding_channels.contains(&0)
        {
            value_error!(
                "conditioning_channels and every conditioning_embedding_channels entry must be \
                 positive, got {} and {:?}",
                self.conditioning_channels,
                self.conditioning_embedding_channels
            );
        }
        if !self.conditioning_scale.is_finite() {
            value_error!(
                "conditioning_scale must be finite, got {}",
                self.conditioning_scale
            );
        }
        Ok(())
    }

    /// How many times the control image's side exceeds the model's.
    pub fn control_factor(&self) -> usize {
        1 << (self.conditioning_embedding_channels.len() - 1)
    }
}

#[derive(Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(p: &Path, cin: usize, widths: &[usize], cout: usize) -> Result<Self> {
        let conv_in = Conv2d::new(&p.pp("conv_in"), cin, widths[0], 3, 1)?;
        let mut blocks = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let b = p.pp("blocks");
            blocks.push(Conv2d::new(&b.pp(2 * i), pair[0], pair[0], 3, 1)?);
            blocks.push(Conv2d::new(&b.pp(2 * i + 1), pair[0], pair[1], 3, 2)?);
        }
        let last = widths[widths.len() - 1];
        Ok(ConditioningEmbedding {
            conv_in,
            blocks,
            conv_out: Conv2d::zeros(&p.pp("conv_out"), last, cout, 3)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = silu(&self.conv_in.forward(x)?)?;
        for b in &self.blocks {
            h = silu(&b.forward(&h)?)?;
        }
        self.conv_out.forward(&h)
    }
}

#[derive(Clone)]
pub struct ControlNet {
    config: ControlNetConfig,
    base: UNet,
    control: UNet,
    embedding: ConditioningEmbedding,
    zero_down: Vec<Conv2d>,
    zero_mid: Conv2d,
}

impl ControlNet {
    /// The network under `root`: the base under `base.`, the control branch at the top level.
    pub fn new(root: &Path, c: &ControlNetConfig) -> Result<Self> {
        c.validate()?;
        let u = c.unet()?;
        let base = UNet::new(&root.pp("base"), u)?;
        let control = UNet::new_encoder(root, u)?;
        let skip_channels = control.skip_channels().to_vec();
        let mid = control.mid_channels();
        let first = u.base_channels * u.channel_mult[0];
        let embedding = ConditioningEmbedding::new(
            &root.pp("controlnet_cond_embedding"),
            c.conditioning_channels,
            &c.conditioning_embedding_channels,
            first,
        )?;
        let zero_down = skip_channels
            .iter()
            .enumerate()
            .map(|(i, &ch)| Conv2d::zeros(&root.pp("controlnet_down_blocks").pp(i), ch, ch, 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlNet {
            config: c.clone(),
            base,
            control,
            embedding,
            zero_down,
            zero_mid: Conv2d::zeros(&root.pp("controlnet_mid_block"), mid, mid, 1)?,
        })
    }

    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        self.base.check_input(shape)
    }

    pub fn forward(&self, x: &Tensor, t: &[f32], cond: &Cond, ctx: &Ctx) -> Result<Tensor> {
        let Some(image) = cond.control else {
            value_error!(
                "this ControlNet needs a control image: pass control_image= to the sampler (or use \
                 model.with_control(images)) and control= to fd.Trainer"
            );
        };
        let (b, _, h, w) = x.dims4()?;
        let f = self.config.control_factor();
        let want = [b, self.config.conditioning_channels, h * f, w * f];
        if image.dims() != want {
            shape_error!(
                "the control image has shape {:?} but this batch needs {want:?}",
                image.dims()
            );
        }
        let scale = cond.control_scale.unwrap_or(self.config.conditioning_scale);
        let added = self.embedding.forward(&image.to_dtype(x.dtype())?)?;
        let branch = self.control.encode(x, t, cond, ctx, Some(&added))?;
        let down = branch
            .skips
            .iter()
            .zip(&self.zero_down)
            .map(|(s, z)| Ok((z.forward(s)? * scale)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = (self.zero_mid.forward(&branch.h)? * scale)?;
        let encoded = self.base.encode(x, t, cond, ctx, None)?;
        self.base.decode(encoded, Some((&down, &mid)), ctx)
    }
}
