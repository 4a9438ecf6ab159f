//! The autoencoders of latent diffusion (Rombach et al. 2022): a ResNet encoder and decoder
//! with downsampling factor f = 2^(levels − 1) and optional middle self-attention, regularised
//! either by a KL term towards N(0, I) on a diagonal Gaussian posterior (`AutoencoderKL`) or by
//! a vector-quantisation layer (`VQModel`: codebook K × d, commitment β, straight-through
//! gradients; van den Oord et al. 2017). Parameter names follow diffusers' `AutoencoderKL` /
//! `VQModel` (encoder.down_blocks.i.resnets.j.conv1, quant_conv, quantize.embedding, ...), and
//! so does the arithmetic: GroupNorm ε 1e-6, downsampling by a 3x3 stride-2 convolution after
//! padding the right and bottom edges by one, nearest upsampling followed by a 3x3 convolution.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::layers::{AttentionBlock, Conv2d, Ctx, GroupNorm};
use super::params::{Init, Path};
use crate::error::Result;
use crate::{shape_error, value_error};

/// GroupNorm ε of diffusers' autoencoders.
const AE_NORM_EPS: f64 = 1e-6;
/// The log-variance clamp of LDM's `DiagonalGaussianDistribution`.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// Which regulariser the latent space has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoencoderKind {
    /// A diagonal Gaussian posterior with a KL penalty (AutoencoderKL).
    Kl,
    /// A vector-quantised latent (VQModel).
    Vq,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderConfig {
    pub kind: AutoencoderKind,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Side of the (square) training images.
    pub image_size: usize,
    /// Channels of each level; the image is halved between levels, so f = 2^(levels − 1).
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more, as diffusers').
    pub layers_per_block: usize,
    /// Channels of the latent (KL: of the posterior's mean; VQ: of the encoder output).
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Self-attention between the two middle residual blocks of encoder and decoder.
    pub mid_block_add_attention: bool,
    /// VQ: codebook size K.
    pub num_vq_embeddings: usize,
    /// VQ: width d of the codebook vectors (0: latent_channels).
    pub vq_embed_dim: usize,
    /// Latents are multiplied by this before diffusion and divided by it before decoding (LDM
    /// sets 1 / std of the training latents; `fd.LatentDiffusion` computes and stores it).
    pub scaling_factor: f64,
}

impl Default for AutoencoderConfig {
    fn default() -> Self {
        AutoencoderConfig {
            kind: AutoencoderKind::Kl,
            in_channels: 1,
            out_channels: 1,
            image_size: 28,
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 8,
            mid_block_add_attention: true,
            num_vq_embeddings: 256,
            vq_embed_dim: 0,
            scaling_factor: 1.0,
        }
    }
}

impl AutoencoderConfig {
    pub fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            value_error!("in_channels, out_channels and latent_channels must be positive");
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            value_error!(
                "block_out_channels must be a non-empty list of positive widths, got {:?}",
                self.block_out_channels
            );
        }
        if self.layers_per_block == 0 {
            value_error!("layers_per_block must be at least 1");
        }
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                value_error!(
                    "norm_num_groups = {} must divide every level's channels ({c})",
                    self.norm_num_groups
                );
            }
        }
        let f = self.downsampling_factor();
        if self.image_size == 0 || !self.image_size.is_multiple_of(f) {
            value_error!(
                "image_size {} must be divisible by the downsampling factor f = {f} ({} levels)",
                self.image_size,
                self.block_out_channels.len()
            );
        }
        if self.kind == AutoencoderKind::Vq && self.num_vq_embeddings < 2 {
            value_error!(
                "num_vq_embeddings must be at least 2, got {}",
                self.num_vq_embeddings
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            value_error!(
                "scaling_factor must be positive and finite, got {}",
                self.scaling_factor
            );
        }
        Ok(())
    }

    /// f: the image side over the latent side.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// d of the codebook.
    pub fn embed_dim(&self) -> usize {
        if self.vq_embed_dim == 0 {
            self.latent_channels
        } else {
            self.vq_embed_dim
        }
    }

    /// Channels of the latent that diffusion runs on (VQ: the encoder output before
    /// quantisation, which the decoder quantises first, as LDM's `VQModelInterface`).
    pub fn latent_dim(&self) -> usize {
        match self.kind {
            AutoencoderKind::Kl => self.latent_channels,
            AutoencoderKind::Vq => self.embed_dim(),
        }
    }

    /// [C, h, w] of the latent of a `side` x `side` image.
    pub fn latent_shape(&self, side: usize) -> Vec<usize> {
        let s = side / self.downsampling_factor();
        vec![self.latent_dim(), s, s]
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
#[derive(Clone)]
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(p: &Path, groups: usize, cin: usize, cout: usize) -> Result<Self> {
        Ok(Resnet {
            norm1: GroupNorm::with_eps(&p.pp("norm1"), groups, cin, AE_NORM_EPS)?,
            conv1: Conv2d::new(&p.pp("conv1"), cin, cout, 3, 1)?,
            norm2: GroupNorm::with_eps(&p.pp("norm2"), groups, cout, AE_NORM_EPS)?,
            conv2: Conv2d::new(&p.pp("conv2"), cout, cout, 3, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(&p.pp("conv_shortcut"), cin, cout, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

#[derive(Clone)]
struct MidBlock {
    first: Resnet,
    attention: Option<AttentionBlock>,
    second: Resnet,
}

impl MidBlock {
    fn new(p: &Path, c: &AutoencoderConfig, ch: usize) -> Result<Self> {
        let g = c.norm_num_groups;
        Ok(MidBlock {
            first: Resnet::new(&p.pp("resnets").pp(0), g, ch, ch)?,
            attention: if c.mid_block_add_attention {
                Some(
                    AttentionBlock::new(&p.pp("attentions").pp(0), ch, 1, g, false)?
                        .with_norm_eps(AE_NORM_EPS),
                )
            } else {
                None
            },
            second: Resnet::new(&p.pp("resnets").pp(1), g, ch, ch)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.second.forward(&h)
    }
}

#[derive(Clone)]
struct Level {
    resnets: Vec<Resnet>,
    /// Downsampling (encoder) or upsampling (decoder) convolution after the blocks.
    sampler: Option<Conv2d>,
}

#[derive(Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(p: &Path, c: &AutoencoderConfig, out: usize) -> Result<Self> {
        let boc = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut ch = boc[0];
        let conv_in = Conv2d::new(&p.pp("conv_in"), c.in_channels, ch, 3, 1)?;
        let mut down = Vec::with_capacity(boc.len());
        for (i, &width) in boc.iter().enumerate() {
            let lp = p.pp("down_blocks").pp(i);
            let mut resnets = Vec::with_capacity(c.layers_per_block);
            for j in 0..c.layers_per_block {
                resnets.push(Resnet::new(&lp.pp("resnets").pp(j), g, ch, width)?);
                ch = width;
            }
            let sampler = if i + 1 < boc.len() {
                let cp = lp.pp("downsamplers").pp(0).pp("conv");
                Some(Conv2d::with_padding(&cp, ch, ch, 3, 2, 0)?)
            } else {
                None
            };
            down.push(Level { resnets, sampler });
        }
        Ok(Encoder {
            conv_in,
            down,
            mid: MidBlock::new(&p.pp("mid_block"), c, ch)?,
            conv_norm_out: GroupNorm::with_eps(&p.pp("conv_norm_out"), g, ch, AE_NORM_EPS)?,
            conv_out: Conv2d::new(&p.pp("conv_out"), ch, out, 3, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.sampler {
                // diffusers' Downsample2D(padding=0): pad right and bottom by one, then a 3x3
                // stride-2 convolution, so an even side is exactly halved.
                let padded = h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                h = conv.forward(&padded)?;
            }
        }
        h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(p: &Path, c: &AutoencoderConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let g = c.norm_num_groups;
        let mut ch = boc[boc.len() - 1];
        let conv_in = Conv2d::new(&p.pp("conv_in"), c.latent_channels, ch, 3, 1)?;
        let mid = MidBlock::new(&p.pp("mid_block"), c, ch)?;
        let mut up = Vec::with_capacity(boc.len());
        for (i, &width) in boc.iter().rev().enumerate() {
            let lp = p.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(c.layers_per_block + 1);
            for j in 0..=c.layers_per_block {
                resnets.push(Resnet::new(&lp.pp("resnets").pp(j), g, ch, width)?);
                ch = width;
            }
            let sampler = if i + 1 < boc.len() {
                Some(Conv2d::new(
                    &lp.pp("upsamplers").pp(0).pp("conv"),
                    ch,
                    ch,
                    3,
                    1,
                )?)
            } else {
                None
            };
            up.push(Level { resnets, sampler });
        }
        Ok(Decoder {
            conv_in,
            mid,
            up,
            conv_norm_out: GroupNorm::with_eps(&p.pp("conv_norm_out"), g, ch, AE_NORM_EPS)?,
            conv_out: Conv2d::new(&p.pp("conv_out"), ch, c.out_channels, 3, 1)?,
        })
    }

    /// The images and the input of the last convolution (the adversarial loss's adaptive
    /// weight differentiates through that layer alone).
    fn forward(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid.forward(&h)?;
        for level in &self.up {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.sampler {
                h = conv.forward(&super::upsample::upsample_nearest_2x(&h)?)?;
            }
        }
        let hidden = self.conv_norm_out.forward_silu(&h)?;
        Ok((self.conv_out.forward(&hidden)?, hidden))
    }
}

/// What a training forward pass gives the autoencoder objective.
pub struct AutoencoderOutput {
    /// The reconstruction [B, C, H, W].
    pub reconstruction: Tensor,
    /// The input of the decoder's last convolution (`decoder.conv_out`), whose weight the
    /// adversarial loss's adaptive weight differentiates.
    pub last_hidden: Tensor,
    /// KL: Σ over latent elements of KL(q(z|x) ‖ N(0, I)) per sample [B].
    pub kl: Option<Tensor>,
    /// VQ: mean over latent elements of ‖sg[z] − e‖² per sample [B] (moves the codebook).
    pub codebook: Option<Tensor>,
    /// VQ: mean over latent elements of ‖z − sg[e]‖² per sample [B] (moves the encoder).
    pub commitment: Option<Tensor>,
    /// VQ: the encoder outputs [N, d] (detached) and their codes [N].
    pub assignments: Option<(Tensor, Vec<u32>)>,
}

/// A KL or VQ autoencoder.
#[derive(Clone)]
pub struct Autoencoder {
    config: AutoencoderConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// VQ: the codebook [K, d].
    codebook: Option<Tensor>,
}

impl Autoencoder {
    pub fn new(p: &Path, c: &AutoencoderConfig) -> Result<Self> {
        c.validate()?;
        let (enc_out, quant_out, post_in) = match c.kind {
            AutoencoderKind::Kl => (
                2 * c.latent_channels,
                2 * c.latent_channels,
                c.latent_channels,
            ),
            AutoencoderKind::Vq => (c.latent_channels, c.embed_dim(), c.embed_dim()),
        };
        let codebook = match c.kind {
            // taming-transformers' init: U(−1/K, 1/K).
            AutoencoderKind::Vq => Some(p.pp("quantize").pp("embedding").var(
                "weight",
                &[c.num_vq_embeddings, c.embed_dim()],
                Init::Uniform(1.0 / c.num_vq_embeddings as f64),
            )?),
            AutoencoderKind::Kl => None,
        };
        Ok(Autoencoder {
            config: c.clone(),
            encoder: Encoder::new(&p.pp("encoder"), c, enc_out)?,
            decoder: Decoder::new(&p.pp("decoder"), c)?,
            quant_conv: Conv2d::new(&p.pp("quant_conv"), enc_out, quant_out, 1, 1)?,
            post_quant_conv: Conv2d::new(
                &p.pp("post_quant_conv"),
                post_in,
                c.latent_channels,
                1,
                1,
            )?,
            codebook,
        })
    }

    pub fn config(&self) -> &AutoencoderConfig {
        &self.config
    }

    /// The codebook [K, d] of a VQ model.
    pub fn codebook(&self) -> Option<&Tensor> {
        self.codebook.as_ref()
    }

    /// Checks an image batch shape [B, C, H, W].
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        let c = &self.config;
        let f = c.downsampling_factor();
        if shape.len() != 4
            || shape[0] == 0
            || shape[1] != c.in_channels
            || shape[2] == 0
            || !shape[2].is_multiple_of(f)
            || shape[3] == 0
            || !shape[3].is_multiple_of(f)
        {
            shape_error!(
                "images have shape {shape:?} but the autoencoder takes [B, {}, H, W] with H and W \
                 positive multiples of its downsampling factor {f} (trained at {}x{})",
                c.in_channels,
                c.image_size,
                c.image_size
            );
        }
        Ok(())
    }

    /// Checks a latent batch shape [B, C, h, w].
    pub fn check_latent(&self, shape: &[usize]) -> Result<()> {
        let want = self.config.latent_dim();
        if shape.len() != 4 || shape[0] == 0 || shape[1] != want || shape[2] == 0 || shape[3] == 0 {
            shape_error!(
                "latents have shape {shape:?} but this autoencoder decodes [B, {want}, h, w] \
                 (a {} x {} image has {}x{} latents)",
                self.config.image_size,
                self.config.image_size,
                self.config.image_size / self.config.downsampling_factor(),
                self.config.image_size / self.config.downsampling_factor(),
            );
        }
        Ok(())
    }

    /// The encoder's output after `quant_conv`: KL the posterior's (mean, log-variance)
    /// stacked on channels [B, 2C, h, w]; VQ the pre-quantisation latent [B, d, h, w].
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x.dims())?;
        self.quant_conv.forward(&self.encoder.forward(x)?)
    }

    /// (mean, log-variance clamped to LDM's range) of a KL posterior.
    fn posterior(&self, moments: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.config.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments
            .narrow(1, c, c)?
            .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?;
        Ok((mean, logvar))
    }

    /// The latent of images x: KL the posterior mean (`noise` None) or a sample mean + σ·noise
    /// (`noise` [B, C, h, w]); VQ the pre-quantisation latent (noise must be None).
    pub fn encode(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let m = self.encode_moments(x)?;
        match self.config.kind {
            AutoencoderKind::Vq => {
                if noise.is_some() {
                    value_error!("a VQ autoencoder's latent is deterministic: sample=False");
                }
                Ok(m)
            }
            AutoencoderKind::Kl => {
                let (mean, logvar) = self.posterior(&m)?;
                match noise {
                    None => Ok(mean),
                    Some(n) => Ok((mean + (logvar * 0.5)?.exp()?.mul(n)?)?),
                }
            }
        }
    }

    /// Nearest codebook vectors of z [B, d, h, w]: (e [B, d, h, w] gathered from the codebook,
    /// so differentiable in the codebook; the codes [B·h·w] in row-major (b, y, x) order).
    pub fn quantize(&self, z: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let Some(book) = &self.codebook else {
            value_error!("quantize needs a VQ autoencoder (this one is KL)");
        };
        let (b, d, h, w) = z.dims4()?;
        if d != book.dims()[1] {
            shape_error!(
                "latents have {d} channels but the codebook's vectors have {}",
                book.dims()[1]
            );
        }
        let tokens = z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        let codes = nearest_codes(&tokens.detach(), &book.detach())?;
        let ids = Tensor::from_slice(&codes, codes.len(), z.device())?;
        let e = book
            .index_select(&ids, 0)?
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok((e, codes))
    }

    /// Images from latents z [B, C, h, w]; a VQ model quantises z first (LDM's
    /// `VQModelInterface.decode`: the quantisation belongs to the decoder, so diffusion runs on
    /// the continuous pre-quantisation latent).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latent(z.dims())?;
        let z = match self.config.kind {
            AutoencoderKind::Vq => self.quantize(z)?.0,
            AutoencoderKind::Kl => z.clone(),
        };
        self.decode_quantized(&z)
    }

    fn decode_quantized(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_with_hidden(z)?.0)
    }

    fn decode_with_hidden(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.decoder.forward(&self.post_quant_conv.forward(z)?)
    }

    /// The decoder's last convolution (weight [C, ch, 3, 3], bias [C], padding 1).
    pub fn output_layer(&self) -> &Conv2d {
        &self.decoder.conv_out
    }

    /// The training pass: KL decodes a posterior sample (`noise` [B, C, h, w], or the mean
    /// when None); VQ decodes the straight-through quantised latent z + sg[e − z].
    pub fn forward_train(
        &self,
        x: &Tensor,
        noise: Option<&Tensor>,
        _ctx: &Ctx,
    ) -> Result<AutoencoderOutput> {
        let m = self.encode_moments(x)?;
        let b = x.dims()[0];
        match self.config.kind {
            AutoencoderKind::Kl => {
                let (mean, logvar) = self.posterior(&m)?;
                let z = match noise {
                    Some(n) => (&mean + (&logvar * 0.5)?.exp()?.mul(n)?)?,
                    None => mean.clone(),
                };
                // KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), summed per sample.
                let kl = ((mean.sqr()? + logvar.exp()?)? - 1.0)?
                    .sub(&logvar)?
                    .affine(0.5, 0.0)?
                    .reshape((b, ()))?
                    .sum(1)?;
                let (reconstruction, last_hidden) = self.decode_with_hidden(&z)?;
                Ok(AutoencoderOutput {
                    reconstruction,
                    last_hidden,
                    kl: Some(kl),
                    codebook: None,
                    commitment: None,
                    assignments: None,
                })
            }
            AutoencoderKind::Vq => {
                let (e, codes) = self.quantize(&m)?;
                let per_sample =
                    |t: Tensor| -> Result<Tensor> { Ok(t.sqr()?.reshape((b, ()))?.mean(1)?) };
                let codebook = per_sample((m.detach() - &e)?)?;
                let commitment = per_sample((&m - e.detach())?)?;
                let st = (&m + (&e - &m)?.detach())?;
                let d = m.dims()[1];
                let tokens = m
                    .detach()
                    .permute((0, 2, 3, 1))?
                    .reshape(((), d))?
                    .contiguous()?;
                let (reconstruction, last_hidden) = self.decode_with_hidden(&st)?;
                Ok(AutoencoderOutput {
                    reconstruction,
                    last_hidden,
                    kl: None,
                    codebook: Some(codebook),
                    commitment: Some(commitment),
                    assignments: Some((tokens, codes)),
                })
            }
        }
    }
}

/// For each row of `tokens` [N, d] the index of the nearest row of `book` [K, d] (squared
/// Euclidean distance, ties to the lower index), by ‖e‖² − 2 z·e on the host.
pub fn nearest_codes(tokens: &Tensor, book: &Tensor) -> Result<Vec<u32>> {
    let dots = tokens
        .to_dtype(DType::F32)?
        .matmul(&book.to_dtype(DType::F32)?.t()?)?
        .to_vec2::<f32>()?;
    let norms: Vec<f32> = book
        .to_dtype(DType::F32)?
        .sqr()?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?;
    Ok(dots
        .iter()
        .map(|row| {
            let mut best = (f32::INFINITY, 0u32);
            for (j, (&dot, &n)) in row.iter().zip(&norms).enumerate() {
                let dist = n - 2.0 * dot;
                if dist < best.0 {
                    best = (dist, j as u32);
                }
            }
            best.1
        })
        .collect())
}

/// Codebook usage of `codes` over a K-entry codebook: (entries used, perplexity
/// exp(−Σ p log p) of the code frequencies).
pub fn codebook_usage(codes: &[u32], k: usize) -> (usize, f64) {
    let mut counts = vec![0usize; k];
    for &c in codes {
        if (c as usize) < k {
            counts[c as usize] += 1;
        }
    }
    let n = codes.len().max(1) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    (counts.iter().filter(|&&c| c > 0).count(), entropy.exp())
}

/// Generator stream of posterior samples drawn by [`super::Model::encode_host`].
const POSTERIOR_STREAM: u64 = 0x4145_0000_0000_0000;

impl super::Model {
    /// `f` on row chunks of host data [B, ...] (at most [`super::INFERENCE_CHUNK`] rows per
    /// call; rows are independent, so chunking changes no result), outputs stacked.
    fn map_rows(
        &self,
        data: &[f32],
        shape: &[usize],
        f: impl Fn(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<crate::sample::ModelOutput> {
        let batch = shape[0];
        let row: usize = shape[1..].iter().product();
        let mut out = Vec::new();
        let mut out_shape = Vec::new();
        for start in (0..batch).step_by(super::INFERENCE_CHUNK) {
            let n = super::INFERENCE_CHUNK.min(batch - start);
            let mut sh = shape.to_vec();
            sh[0] = n;
            let x = Tensor::from_slice(
                &data[start * row..(start + n) * row],
                sh.as_slice(),
                self.device(),
            )?
            .to_dtype(self.params().dtype())?;
            let y = f(&x, start)?;
            if out_shape.is_empty() {
                out_shape = y.dims().to_vec();
                out_shape[0] = batch;
            }
            out.extend(y.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(crate::sample::ModelOutput {
            data: out,
            shape: out_shape,
        })
    }

    fn check_finite(data: &[f32], what: &str) -> Result<()> {
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            value_error!("{what} contain a non-finite value at flat index {bad}");
        }
        Ok(())
    }

    /// Latents of images x [B, C, H, W] (unscaled): the posterior mean, or with `seed` a
    /// posterior sample (KL only; the noise of row i depends only on (seed, i)).
    pub fn encode_host(
        &self,
        x: &[f32],
        shape: &[usize],
        seed: Option<u64>,
    ) -> Result<crate::sample::ModelOutput> {
        let ae = self.autoencoder()?;
        ae.check_input(shape)?;
        Self::check_finite(x, "images")?;
        if seed.is_some() && ae.config.kind == AutoencoderKind::Vq {
            value_error!("a VQ autoencoder's latent is deterministic: sample=False");
        }
        self.map_rows(x, shape, |xt, start| {
            let noise = match seed {
                None => None,
                Some(s) => {
                    let f = ae.config.downsampling_factor();
                    let (n, _, h, w) = xt.dims4()?;
                    let dims = (n, ae.config.latent_channels, h / f, w / f);
                    let per = dims.1 * dims.2 * dims.3;
                    let mut v = vec![0f32; n * per];
                    crate::kernels::rng::fill_normal(
                        s,
                        POSTERIOR_STREAM,
                        (start * per) as u64,
                        &mut v,
                    );
                    Some(Tensor::from_vec(v, dims, xt.device())?.to_dtype(xt.dtype())?)
                }
            };
            ae.encode(xt, noise.as_ref())
        })
    }

    /// Images from latents z [B, C, h, w] (unscaled); a VQ model quantises them first.
    pub fn decode_host(&self, z: &[f32], shape: &[usize]) -> Result<crate::sample::ModelOutput> {
        let ae = self.autoencoder()?;
        ae.check_latent(shape)?;
        Self::check_finite(z, "latents")?;
        self.map_rows(z, shape, |zt, _| ae.decode(zt))
    }

    /// The codes [B, h, w] of VQ latents z [B, d, h, w] (nearest codebook vectors).
    pub fn codes_host(&self, z: &[f32], shape: &[usize]) -> Result<Vec<u32>> {
        let ae = self.autoencoder()?;
        if ae.codebook.is_none() {
            value_error!("codes need a VQ autoencoder (fd.nn.VQModel); this one is KL");
        }
        ae.check_latent(shape)?;
        Self::check_finite(z, "latents")?;
        let out = self.map_rows(z, shape, |zt, _| {
            let codes = ae.quantize(zt)?.1;
            Ok(Tensor::from_vec(
                codes,
                zt.dims()[0] * zt.dims()[2] * zt.dims()[3],
                zt.device(),
            )?)
        })?;
        Ok(out.data.iter().map(|&v| v as u32).collect())
    }

    /// The codes [B·h·w] of images x [B, C, H, W] (their encoder outputs quantised) and the
    /// codes' shape [B, h, w].
    pub fn image_codes(&self, x: &[f32], shape: &[usize]) -> Result<(Vec<u32>, [usize; 3])> {
        let z = self.encode_host(x, shape, None)?;
        let dims = [z.shape[0], z.shape[2], z.shape[3]];
        Ok((self.codes_host(&z.data, &z.shape)?, dims))
    }

    /// The same autoencoder (sharing its weights) with `scaling_factor` = `s`.
    pub fn with_scaling_factor(&self, s: f64) -> Result<super::Model> {
        let mut m = self.clone();
        match (&mut m.config, &mut m.net) {
            (super::ModelConfig::Autoencoder(c), super::Net::Autoencoder(a)) => {
                c.scaling_factor = s;
                c.validate()?;
                a.config.scaling_factor = s;
            }
            _ => value_error!("scaling_factor belongs to autoencoders"),
        }
        Ok(m)
    }
}
