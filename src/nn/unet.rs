//! The U-Net of Ho et al. 2020 with the improvements of Nichol & Dhariwal 2021 and Dhariwal &
//! Nichol 2021 as options: attention at chosen resolutions with several heads, scale-shift
//! (AdaGN) time conditioning, BigGAN-style residual up/down sampling, 1/√2 skip scaling,
//! class conditioning with a null class, and a 2C-channel output for learned variances.
//! Parameter names follow diffusers' `UNet2DModel` (conv_in, down_blocks.i.resnets.j, ...).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{
    silu, timestep_embedding, timestep_embedding_with, AttentionBlock, Conv2d, Ctx, Embedding,
    GroupNorm, Linear,
};
use super::params::{Init, Path};
use super::Cond;
use crate::error::Result;
use crate::{shape_error, value_error};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    pub in_channels: usize,
    /// Side of the (square) training images; attention resolutions are relative to it.
    pub image_size: usize,
    pub base_channels: usize,
    /// Channels of level i = base_channels · channel_mult[i]; one level per entry.
    pub channel_mult: Vec<usize>,
    /// Residual blocks of each down level (its up level has one more, or as many with
    /// `downsample_first`): one count for all levels or one per level.
    pub num_res_blocks: ResBlocks,
    /// Feature-map sides at which self-attention follows each residual block (e.g. [16, 8]).
    pub attention_resolutions: Vec<usize>,
    pub num_heads: usize,
    pub dropout: f64,
    /// GroupNorm groups (must divide every level's channels).
    pub groups: usize,
    /// AdaGN: the time embedding gives a per-channel scale and shift after the second norm.
    pub scale_shift: bool,
    /// Residual blocks with average-pool / nearest resampling inside instead of strided and
    /// post-upsample convolutions (BigGAN).
    pub resblock_updown: bool,
    /// Scale residual sums by 1/√2.
    pub skip_rescale: bool,
    pub num_classes: usize,
    pub learn_sigma: bool,
    /// Width of the embeddings of a cross-attention context [B, M, context_dim]; 0: no
    /// cross-attention. Each self-attention position (and the middle block) is followed by a
    /// cross-attention block, and a learned null context stands in for missing contexts.
    pub context_dim: usize,
    /// Take the classifier-free guidance scale w as an input (guidance distilled into the
    /// network, Meng et al. 2023): an embedding of w added to the time embedding, its last
    /// layer zero-initialised so that a new model computes what the same weights without it do.
    pub guidance_embed: bool,
    /// Super-resolution (cascades): channels of a low-resolution conditioning image, upsampled
    /// to the model's resolution and concatenated to x at the input (0: none).
    pub cond_channels: usize,
    /// Super-resolution: embed the noise-augmentation level s ∈ [0, 1] of the conditioning
    /// image (an embedding added to the time embedding, as in Ho et al. 2021's cascades).
    pub aug_embed: bool,
    /// Imagen's Efficient U-Net order (Saharia et al. 2022, App. B.1): each down level
    /// downsamples *before* its residual blocks and each up level upsamples after them, every
    /// level included, so no residual block runs at full resolution; conv_in's output is
    /// concatenated to the last upsampling's before the output layers. Images need sides
    /// divisible by 2^levels.
    pub downsample_first: bool,
    /// The time embedding's halves [cos, sin] (true) or [sin, cos], and the shift of its
    /// frequencies exp(−ln(10⁴) i / (half − freq_shift)): diffusers' `flip_sin_to_cos` and
    /// `freq_shift` (the original DDPM checkpoints use false and 1).
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Padding of the strided downsampling convolutions: 1 on every side, or 0 with the input
    /// padded by one row and column at the bottom and right (diffusers' `downsample_padding`).
    pub downsample_padding: usize,
    /// ε of every GroupNorm (diffusers' `norm_eps`).
    pub norm_eps: f64,
}

/// Residual blocks per level of a U-Net: the same count at every level, or one count per level
/// (Imagen's Efficient U-Net moves parameters to the low resolutions: more blocks there).
/// Serialised as a number or a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResBlocks {
    Same(usize),
    PerLevel(Vec<usize>),
}

impl ResBlocks {
    /// The count of level `l`.
    pub fn at(&self, l: usize) -> usize {
        match self {
            ResBlocks::Same(n) => *n,
            ResBlocks::PerLevel(v) => v.get(l).copied().unwrap_or(0),
        }
    }
}

impl From<usize> for ResBlocks {
    fn from(n: usize) -> Self {
        ResBlocks::Same(n)
    }
}

/// w is embedded as the timestep 100 w: guidance scales of a few units then span the
/// sinusoidal embedding's frequencies as timesteps in [0, 1000) do.
const GUIDANCE_EMBED_SCALE: f32 = 100.0;
/// The augmentation level s ∈ [0, 1] is embedded as the timestep 1000 s.
const AUG_EMBED_SCALE: f32 = 1000.0;

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 1,
            image_size: 8,
            base_channels: 32,
            channel_mult: vec![1, 2],
            num_res_blocks: ResBlocks::Same(1),
            attention_resolutions: vec![4],
            num_heads: 1,
            dropout: 0.0,
            groups: 8,
            scale_shift: true,
            resblock_updown: false,
            skip_rescale: false,
            num_classes: 0,
            learn_sigma: false,
            context_dim: 0,
            guidance_embed: false,
            cond_channels: 0,
            aug_embed: false,
            downsample_first: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            norm_eps: super::layers::GROUP_NORM_EPS,
        }
    }
}

impl UNetConfig {
    pub fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.base_channels == 0 || self.channel_mult.is_empty() {
            value_error!("in_channels, base_channels and channel_mult must be non-empty/positive");
        }
        if self.channel_mult.contains(&0) {
            value_error!(
                "channel_mult entries must be positive, got {:?}",
                self.channel_mult
            );
        }
        let levels = self.channel_mult.len();
        if let ResBlocks::PerLevel(v) = &self.num_res_blocks {
            if v.len() != levels || v.contains(&0) {
                value_error!(
                    "num_res_blocks given per level must have one positive count per level \
                     ({levels} levels), got {v:?}"
                );
            }
        }
        if self.downsample_first && (0..levels).any(|l| self.num_res_blocks.at(l) == 0) {
            value_error!("downsample_first needs at least one residual block per level");
        }
        let factor = self.downsampling_factor();
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            value_error!(
                "image_size {} must be divisible by {factor} ({levels} levels{})",
                self.image_size,
                if self.downsample_first {
                    ", each downsampling with downsample_first"
                } else {
                    ""
                }
            );
        }
        for m in &self.channel_mult {
            let c = self.base_channels * m;
            if self.groups == 0 || !c.is_multiple_of(self.groups) {
                value_error!(
                    "groups = {} must divide every level's channels ({c})",
                    self.groups
                );
            }
            if (!self.attention_resolutions.is_empty() || self.context_dim > 0)
                && (self.num_heads == 0 || !c.is_multiple_of(self.num_heads))
            {
                value_error!(
                    "num_heads = {} must divide every level's channels ({c})",
                    self.num_heads
                );
            }
        }
        if self.aug_embed && self.cond_channels == 0 {
            value_error!(
                "aug_embed embeds the augmentation level of a conditioning image: set cond_channels too"
            );
        }
        if self.downsample_padding > 1 {
            value_error!(
                "downsample_padding must be 0 or 1, got {}",
                self.downsample_padding
            );
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            value_error!("norm_eps must be positive, got {}", self.norm_eps);
        }
        if !(self.freq_shift.is_finite() && self.freq_shift < (self.base_channels / 2) as f64) {
            value_error!(
                "freq_shift must be below half the time embedding's width ({}), got {}",
                self.base_channels / 2,
                self.freq_shift
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            value_error!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// How much the deepest level is smaller than the input: 2^(levels − 1), or 2^levels with
    /// `downsample_first` (every level downsamples).
    pub fn downsampling_factor(&self) -> usize {
        let levels = self.channel_mult.len();
        1usize
            << if self.downsample_first {
                levels
            } else {
                levels - 1
            }
    }

    fn time_embed_dim(&self) -> usize {
        4 * self.base_channels
    }

    fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Resample {
    None,
    Up,
    Down,
}

fn resample(x: &Tensor, r: Resample) -> Result<Tensor> {
    Ok(match r {
        Resample::None => x.clone(),
        Resample::Down => x.avg_pool2d(2)?,
        Resample::Up => super::upsample::upsample_nearest_2x(x)?,
    })
}

#[derive(Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Resample,
    scale_shift: bool,
    skip_rescale: bool,
    dropout: f64,
}

impl ResBlock {
    fn new(p: &Path, c: &UNetConfig, cin: usize, cout: usize, resample: Resample) -> Result<Self> {
        let emb_out = if c.scale_shift { 2 * cout } else { cout };
        Ok(ResBlock {
            norm1: GroupNorm::with_eps(&p.pp("norm1"), c.groups, cin, c.norm_eps)?,
            conv1: Conv2d::new(&p.pp("conv1"), cin, cout, 3, 1)?,
            time_emb_proj: Linear::new(&p.pp("time_emb_proj"), c.time_embed_dim(), emb_out)?,
            norm2: GroupNorm::with_eps(&p.pp("norm2"), c.groups, cout, c.norm_eps)?,
            conv2: Conv2d::zeros(&p.pp("conv2"), cout, cout, 3)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p.pp("conv_shortcut"), cin, cout, 1, 1)?)
            } else {
                None
            },
            resample,
            scale_shift: c.scale_shift,
            skip_rescale: c.skip_rescale,
            dropout: c.dropout,
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let h = resample(&h, self.resample)?;
        let x = resample(x, self.resample)?;
        let h = self.conv1.forward(&h)?;
        let e = self.time_emb_proj.forward(emb)?;
        let h = if self.scale_shift {
            let cout = h.dims()[1];
            let scale = e.narrow(1, 0, cout)?;
            let shift = e.narrow(1, cout, cout)?;
            self.norm2.forward_scale_shift(&h, &scale, &shift, true)?
        } else {
            let (b, c) = e.dims2()?;
            self.norm2
                .forward_silu(&h.broadcast_add(&e.reshape((b, c, 1, 1))?)?)?
        };
        let h = ctx.dropout(&h, self.dropout)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(&x)?,
            None => x,
        };
        let y = (skip + h)?;
        Ok(if self.skip_rescale {
            (y * std::f64::consts::FRAC_1_SQRT_2)?
        } else {
            y
        })
    }
}

/// Strided-conv downsampling, or nearest upsampling followed by a conv; or a resampling
/// residual block (`resblock_updown`).
#[derive(Clone)]
enum Sampler {
    Conv(Conv2d, Resample),
    Block(ResBlock),
}

impl Sampler {
    fn new(p: &Path, c: &UNetConfig, ch: usize, r: Resample) -> Result<Self> {
        Ok(if c.resblock_updown {
            Sampler::Block(ResBlock::new(p, c, ch, ch, r)?)
        } else if r == Resample::Down {
            // downsample_padding 0 pads the bottom and right alone, in `forward`.
            let pad = c.downsample_padding;
            Sampler::Conv(Conv2d::with_padding(&p.pp("conv"), ch, ch, 3, 2, pad)?, r)
        } else {
            Sampler::Conv(Conv2d::new(&p.pp("conv"), ch, ch, 3, 1)?, r)
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Sampler::Block(b) => b.forward(x, emb, ctx),
            Sampler::Conv(conv, Resample::Up) => conv.forward(&resample(x, Resample::Up)?),
            Sampler::Conv(conv, _) if conv.padding() == 0 => {
                conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
            }
            Sampler::Conv(conv, _) => conv.forward(x),
        }
    }
}

#[derive(Clone)]
struct Level {
    resnets: Vec<ResBlock>,
    attentions: Vec<Option<AttentionBlock>>,
    cross: Vec<Option<AttentionBlock>>,
    sampler: Option<Sampler>,
}

impl Level {
    /// Residual block j, then its self- and cross-attention where present.
    fn block(
        &self,
        j: usize,
        h: &Tensor,
        emb: &Tensor,
        context: Option<&Tensor>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let mut h = self.resnets[j].forward(h, emb, ctx)?;
        if let Some(a) = &self.attentions[j] {
            h = a.forward(&h)?;
        }
        if let (Some(a), Some(c)) = (&self.cross[j], context) {
            h = a.forward_cross(&h, c)?;
        }
        Ok(h)
    }
}

#[derive(Clone)]
pub struct UNet {
    config: UNetConfig,
    time_1: Linear,
    time_2: Linear,
    class_embedding: Option<Embedding>,
    guidance_embedding: Option<(Linear, Linear)>,
    aug_embedding: Option<(Linear, Linear)>,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: (ResBlock, AttentionBlock, ResBlock),
    mid_cross: Option<AttentionBlock>,
    /// The learned context [1, context_dim] of unconditional rows.
    null_context: Option<Tensor>,
    up: Vec<Level>,
    /// None in an encoder-only copy (ControlNet's trainable branch).
    conv_norm_out: Option<GroupNorm>,
    conv_out: Option<Conv2d>,
    /// Channels of the skip stack in push order, and of the middle block's output.
    skip_channels: Vec<usize>,
    mid_channels: usize,
}

/// What the encoder half of a U-Net hands the decoder half: the middle block's output, the
/// skip stack, the conditioning embedding, the attended context and conv_in's output.
pub(crate) struct Encoded {
    pub(crate) h: Tensor,
    pub(crate) skips: Vec<Tensor>,
    emb: Tensor,
    context: Option<Tensor>,
    input_features: Tensor,
}

impl UNet {
    pub fn new(p: &Path, c: &UNetConfig) -> Result<Self> {
        Self::build(p, c, false)
    }

    /// conv_in, the embeddings, the down levels and the middle block alone, under the same
    /// parameter names (ControlNet's trainable copy of a U-Net's encoder).
    pub(crate) fn new_encoder(p: &Path, c: &UNetConfig) -> Result<Self> {
        Self::build(p, c, true)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Channels of the skip connections in the order the encoder pushes them.
    pub(crate) fn skip_channels(&self) -> &[usize] {
        &self.skip_channels
    }

    /// Channels of the middle block's output.
    pub(crate) fn mid_channels(&self) -> usize {
        self.mid_channels
    }

    fn build(p: &Path, c: &UNetConfig, encoder_only: bool) -> Result<Self> {
        c.validate()?;
        let base = c.base_channels;
        let emb_dim = c.time_embed_dim();
        // Self-attention (keys from the feature map) or, with `kv_dim` = context_dim,
        // cross-attention, after each block whose side is in attention_resolutions.
        let attention = |p: &Path, ch: usize, kv_dim: usize, res: usize| {
            if kv_dim > 0 && c.attention_resolutions.contains(&res) {
                AttentionBlock::with_kv_dim(p, ch, kv_dim, c.num_heads, c.groups, c.skip_rescale)
                    .map(|a| Some(a.with_norm_eps(c.norm_eps)))
            } else {
                Ok(None)
            }
        };
        let mut ch = base * c.channel_mult[0];
        let conv_in = Conv2d::new(&p.pp("conv_in"), c.in_channels + c.cond_channels, ch, 3, 1)?;
        let input_channels = ch;
        // With downsample_first, conv_in's output joins at the very end instead of the stack.
        let mut skips = if c.downsample_first { vec![] } else { vec![ch] };
        let mut res = c.image_size;
        let levels = c.channel_mult.len();
        let mut down = Vec::with_capacity(levels);
        for (l, m) in c.channel_mult.iter().enumerate() {
            let lp = p.pp("down_blocks").pp(l);
            let (mut resnets, mut attentions, mut crosses) = (Vec::new(), Vec::new(), Vec::new());
            let pre_sampler = if c.downsample_first {
                res /= 2;
                Some(Sampler::new(
                    &lp.pp("downsamplers").pp(0),
                    c,
                    ch,
                    Resample::Down,
                )?)
            } else {
                None
            };
            for j in 0..c.num_res_blocks.at(l) {
                resnets.push(ResBlock::new(
                    &lp.pp("resnets").pp(j),
                    c,
                    ch,
                    base * m,
                    Resample::None,
                )?);
                ch = base * m;
                attentions.push(attention(&lp.pp("attentions").pp(j), ch, ch, res)?);
                crosses.push(attention(
                    &lp.pp("cross_attentions").pp(j),
                    ch,
                    c.context_dim,
                    res,
                )?);
                skips.push(ch);
            }
            let sampler = if c.downsample_first {
                pre_sampler
            } else if l + 1 < levels {
                let s = Sampler::new(&lp.pp("downsamplers").pp(0), c, ch, Resample::Down)?;
                skips.push(ch);
                res /= 2;
                Some(s)
            } else {
                None
            };
            down.push(Level {
                resnets,
                attentions,
                cross: crosses,
                sampler,
            });
        }
        let skip_channels = skips.clone();
        let mid_channels = ch;
        let mp = p.pp("mid_block");
        let mid = (
            ResBlock::new(&mp.pp("resnets").pp(0), c, ch, ch, Resample::None)?,
            AttentionBlock::new(
                &mp.pp("attentions").pp(0),
                ch,
                c.num_heads.max(1),
                c.groups,
                c.skip_rescale,
            )?
            .with_norm_eps(c.norm_eps),
            ResBlock::new(&mp.pp("resnets").pp(1), c, ch, ch, Resample::None)?,
        );
        let mid_cross = if c.context_dim > 0 {
            Some(
                AttentionBlock::with_kv_dim(
                    &mp.pp("cross_attentions").pp(0),
                    ch,
                    c.context_dim,
                    c.num_heads.max(1),
                    c.groups,
                    c.skip_rescale,
                )?
                .with_norm_eps(c.norm_eps),
            )
        } else {
            None
        };
        let null_context = if c.context_dim > 0 {
            Some(p.var("null_context", &[1, c.context_dim], Init::Normal(1.0))?)
        } else {
            None
        };
        let mut up = Vec::with_capacity(levels);
        if encoder_only {
            skips.clear();
        }
        let up_levels = if encoder_only { 0 } else { levels };
        for (k, (l, m)) in c
            .channel_mult
            .iter()
            .enumerate()
            .rev()
            .take(up_levels)
            .enumerate()
        {
            let lp = p.pp("up_blocks").pp(k);
            let (mut resnets, mut attentions, mut crosses) = (Vec::new(), Vec::new(), Vec::new());
            let blocks = c.num_res_blocks.at(l) + usize::from(!c.downsample_first);
            for j in 0..blocks {
                let skip = skips.pop().unwrap_or(0);
                resnets.push(ResBlock::new(
                    &lp.pp("resnets").pp(j),
                    c,
                    ch + skip,
                    base * m,
                    Resample::None,
                )?);
                ch = base * m;
                attentions.push(attention(&lp.pp("attentions").pp(j), ch, ch, res)?);
                crosses.push(attention(
                    &lp.pp("cross_attentions").pp(j),
                    ch,
                    c.context_dim,
                    res,
                )?);
            }
            let sampler = if l > 0 || c.downsample_first {
                res *= 2;
                Some(Sampler::new(
                    &lp.pp("upsamplers").pp(0),
                    c,
                    ch,
                    Resample::Up,
                )?)
            } else {
                None
            };
            up.push(Level {
                resnets,
                attentions,
                cross: crosses,
                sampler,
            });
        }
        debug_assert!(skips.is_empty(), "every skip is consumed by the up path");
        let final_skip = if c.downsample_first {
            input_channels
        } else {
            0
        };
        Ok(UNet {
            skip_channels,
            mid_channels,
            config: c.clone(),
            time_1: Linear::new(&p.pp("time_embedding").pp("linear_1"), base, emb_dim)?,
            time_2: Linear::new(&p.pp("time_embedding").pp("linear_2"), emb_dim, emb_dim)?,
            class_embedding: if c.num_classes > 0 {
                Some(Embedding::new(
                    &p.pp("class_embedding"),
                    c.num_classes + 1,
                    emb_dim,
                )?)
            } else {
                None
            },
            guidance_embedding: if c.guidance_embed {
                let g = p.pp("guidance_embedding");
                Some((
                    Linear::new(&g.pp("linear_1"), base, emb_dim)?,
                    Linear::zeros(&g.pp("linear_2"), emb_dim, emb_dim)?,
                ))
            } else {
                None
            },
            aug_embedding: if c.aug_embed {
                let g = p.pp("aug_embedding");
                Some((
                    Linear::new(&g.pp("linear_1"), base, emb_dim)?,
                    Linear::new(&g.pp("linear_2"), emb_dim, emb_dim)?,
                ))
            } else {
                None
            },
            conv_in,
            down,
            mid,
            mid_cross,
            null_context,
            up,
            conv_norm_out: if encoder_only {
                None
            } else {
                Some(GroupNorm::with_eps(
                    &p.pp("conv_norm_out"),
                    c.groups,
                    ch + final_skip,
                    c.norm_eps,
                )?)
            },
            conv_out: if encoder_only {
                None
            } else {
                Some(Conv2d::zeros(
                    &p.pp("conv_out"),
                    ch + final_skip,
                    c.out_channels(),
                    3,
                )?)
            },
        })
    }

    /// Checks an input shape [B, C, H, W] against the configuration.
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        let c = &self.config;
        let factor = c.downsampling_factor();
        if shape.len() != 4
            || shape[1] != c.in_channels
            || !shape[2].is_multiple_of(factor)
            || !shape[3].is_multiple_of(factor)
        {
            shape_error!(
                "x has shape {shape:?} but the U-Net takes [B, {}, H, W] with H and W divisible by {factor} \
                 (trained at {}x{})",
                c.in_channels,
                c.image_size,
                c.image_size
            );
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor, t: &[f32], cond: &Cond, ctx: &Ctx) -> Result<Tensor> {
        let encoded = self.encode(x, t, cond, ctx, None)?;
        self.decode(encoded, None, ctx)
    }

    /// The encoder half: embeddings, conv_in (plus `added`, ControlNet's embedded control
    /// image, to its output), the down levels and the middle block.
    pub(crate) fn encode(
        &self,
        x: &Tensor,
        t: &[f32],
        cond: &Cond,
        ctx: &Ctx,
        added: Option<&Tensor>,
    ) -> Result<Encoded> {
        let context = super::attended_context(self.null_context.as_ref(), x.dims()[0], cond)?;
        let context_ref = context.as_ref();
        let c = &self.config;
        let temb = timestep_embedding_with(
            t,
            c.base_channels,
            c.flip_sin_to_cos,
            c.freq_shift,
            x.device(),
        )?
        .to_dtype(x.dtype())?;
        let mut emb = self.time_2.forward(&silu(&self.time_1.forward(&temb)?)?)?;
        if let (Some(table), Some(y)) = (&self.class_embedding, cond.labels) {
            emb = (emb + table.forward(y)?)?;
        }
        if let Some((g1, g2)) = &self.guidance_embedding {
            let w = cond.guidance.ok_or_else(|| {
                crate::Error::Value("this model takes the guidance scale as an input".into())
            })?;
            let scaled: Vec<f32> = w.iter().map(|v| v * GUIDANCE_EMBED_SCALE).collect();
            let g = timestep_embedding(&scaled, self.config.base_channels, x.device())?
                .to_dtype(x.dtype())?;
            emb = (emb + g2.forward(&silu(&g1.forward(&g)?)?)?)?;
        }
        if let Some((a1, a2)) = &self.aug_embedding {
            let b = x.dims()[0];
            let levels = cond.aug_level.map_or_else(|| vec![0f32; b], |l| l.to_vec());
            let scaled: Vec<f32> = levels.iter().map(|v| v * AUG_EMBED_SCALE).collect();
            let a = timestep_embedding(&scaled, self.config.base_channels, x.device())?
                .to_dtype(x.dtype())?;
            emb = (emb + a2.forward(&silu(&a1.forward(&a)?)?)?)?;
        }
        let emb = silu(&emb)?;
        let input = if self.config.cond_channels > 0 {
            let Some(low) = cond.low_res else {
                value_error!(
                    "this super-resolution model is conditioned on a low-resolution image: pass \
                     low_res= (or use Model.with_low_res / fd.Cascade)"
                );
            };
            let (b, _, h, w) = x.dims4()?;
            let want = [b, self.config.cond_channels, h, w];
            if low.dims() != want {
                shape_error!(
                    "the conditioning image has shape {:?} but this batch needs {want:?} (upsampled to the model's resolution)",
                    low.dims()
                );
            }
            Tensor::cat(&[x, &low.to_dtype(x.dtype())?], 1)?
        } else {
            x.clone()
        };
        let first = self.config.downsample_first;
        let mut h = self.conv_in.forward(&input)?;
        if let Some(a) = added {
            h = (h + a.to_dtype(x.dtype())?)?;
        }
        let input_features = h.clone();
        let mut skips = if first { vec![] } else { vec![h.clone()] };
        for level in &self.down {
            if let (true, Some(s)) = (first, &level.sampler) {
                h = s.forward(&h, &emb, ctx)?;
            }
            for j in 0..level.resnets.len() {
                h = level.block(j, &h, &emb, context_ref, ctx)?;
                skips.push(h.clone());
            }
            if let (false, Some(s)) = (first, &level.sampler) {
                h = s.forward(&h, &emb, ctx)?;
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(&h, &emb, ctx)?;
        h = self.mid.1.forward(&h)?;
        if let (Some(a), Some(c)) = (&self.mid_cross, context_ref) {
            h = a.forward_cross(&h, c)?;
        }
        h = self.mid.2.forward(&h, &emb, ctx)?;
        Ok(Encoded {
            h,
            skips,
            emb,
            context,
            input_features,
        })
    }

    /// The decoder half from an [`Encoded`], with ControlNet's `residuals` (one per skip, in
    /// push order, and one for the middle block's output) added first.
    pub(crate) fn decode(
        &self,
        encoded: Encoded,
        residuals: Option<(&[Tensor], &Tensor)>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let Encoded {
            mut h,
            mut skips,
            emb,
            context,
            input_features,
        } = encoded;
        let context = context.as_ref();
        let first = self.config.downsample_first;
        if let Some((down, mid)) = residuals {
            if down.len() != skips.len() {
                shape_error!(
                    "{} control residuals for {} skip connections",
                    down.len(),
                    skips.len()
                );
            }
            for (s, r) in skips.iter_mut().zip(down) {
                *s = (&*s + r)?;
            }
            h = (h + mid)?;
        }
        let (Some(norm_out), Some(conv_out)) = (&self.conv_norm_out, &self.conv_out) else {
            value_error!("an encoder-only U-Net has no decoder");
        };
        for level in &self.up {
            for j in 0..level.resnets.len() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| crate::Error::Value("U-Net skip stack underflow".into()))?;
                h = level.block(j, &Tensor::cat(&[&h, &skip], 1)?, &emb, context, ctx)?;
            }
            if let Some(s) = &level.sampler {
                h = s.forward(&h, &emb, ctx)?;
            }
        }
        if first {
            h = Tensor::cat(&[&h, &input_features], 1)?;
        }
        let h = norm_out.forward_silu(&h)?;
        conv_out.forward(&h)
    }
}
