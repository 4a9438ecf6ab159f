//! The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
//! Transformers") with adaLN-Zero conditioning, as facebookresearch/DiT builds it:
//!
//! - patchify: a p×p convolution of stride p maps x [B, C, H, W] to N = (H/p)·(W/p) tokens of
//!   width D, plus a fixed (not trained) 2-D sin-cos position embedding;
//! - conditioning c = t_emb + y_emb: an MLP (Linear, SiLU, Linear) of the 256-wide sinusoidal
//!   timestep embedding, plus a class embedding whose last row is the null class of
//!   classifier-free guidance;
//! - `depth` blocks, each x += gate_msa ⊙ Attn(modulate(LN(x), shift_msa, scale_msa)), then
//!   x += gate_mlp ⊙ MLP(modulate(LN(x), shift_mlp, scale_mlp)), the six vectors a linear map of
//!   SiLU(c) that starts at zero (adaLN-Zero: every block starts as the identity); LN has no
//!   affine parameters and ε = 1e-6, the MLP uses GELU's tanh approximation;
//! - with `context_dim` > 0, a cross-attention x += Attn(LN(x), context) after each block's
//!   self-attention (diffusers' `BasicTransformerBlock` layout; its output projection starts at
//!   zero, as PixArt-α's does), with a learned null context for unconditional rows;
//! - final layer: modulate(LN(x), shift, scale) (adaLN, zero-initialised) and a zero-initialised
//!   linear map to p·p·C_out per token, unpatchified to [B, C_out, H, W] (C_out = 2C with
//!   `learn_sigma`: the mean's output and the variance interpolation, as the U-Net's).
//!
//! Parameter names follow diffusers' `DiTTransformer2DModel` (`pos_embed.proj`,
//! `transformer_blocks.{i}.norm1.linear`, `.attn1.to_q`/`to_k`/`to_v`/`to_out.0`,
//! `.ff.net.0.proj`, `.ff.net.2`, `proj_out_1`, `proj_out_2`; `attn2` for the cross-attention)
//! except for the conditioning embedder: diffusers gives every block a copy of it
//! (`transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1`, ...), all equal in converted
//! checkpoints and only block 0's used by the final layer, where the paper has one. Here it is
//! one shared `timestep_embedder.linear_1`/`linear_2` and `class_embedder.embedding_table`:
//! importing a diffusers checkpoint takes block 0's copy. The timestep frequencies follow the
//! paper's code (exp(−ln 10⁴ · i / 128)); diffusers' DiT divides by 127 instead
//! (`downscale_freq_shift=1`), a slightly different embedding of the same t.
//!
//! Initialisation follows facebookresearch/DiT: Xavier-uniform linear layers with zero biases
//! (q, k and v with the bound of its fused qkv layer), N(0, 0.02²) timestep-MLP weights and
//! class embeddings, and zeros for every adaLN modulation and the final linear map.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::ada_norm::{layer_norm, modulated_layer_norm, LAYER_NORM_EPS};
use super::dit_sublayer::{sublayer, Chunks, Middle, Weights};
use super::layers::{multi_head_attention, silu, timestep_embedding, Ctx, Embedding, Linear};
use super::linear::linear;
use super::params::{Init, Path};
use super::Cond;
use crate::error::Result;
use crate::{shape_error, value_error};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiTConfig {
    pub in_channels: usize,
    /// Side of the (square) images; the position embedding is fixed for this size.
    pub image_size: usize,
    /// Side p of the square patches: N = (image_size / p)² tokens.
    pub patch_size: usize,
    /// Token width D.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    pub num_heads: usize,
    /// The MLP's hidden width is ⌊D · mlp_ratio⌋.
    pub mlp_ratio: f64,
    /// Class-conditional with this many classes and a null class (0: unconditional).
    pub num_classes: usize,
    /// Output 2C channels: the mean's output and the variance interpolation.
    pub learn_sigma: bool,
    /// Width of the embeddings of a cross-attention context [B, M, context_dim]; 0: none.
    pub context_dim: usize,
}

/// Width of the sinusoidal timestep embedding fed to the timestep MLP (facebookresearch/DiT's
/// `frequency_embedding_size`).
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;
/// Standard deviation of the initial timestep-MLP weights and class embeddings
/// (facebookresearch/DiT's `initialize_weights`).
const EMBEDDING_INIT_STD: f64 = 0.02;
/// Base of the 2-D sin-cos position embedding's frequencies (facebookresearch/DiT, MAE).
const POSITION_MAX_PERIOD: f64 = 10_000.0;

/// The named model sizes: (name, depth, hidden_size, num_heads). S, B, L and XL are the
/// paper's (Table 1); XS and Ti are small ones for CPUs (Ti as DeiT-Ti).
pub const VARIANTS: [(&str, usize, usize, usize); 6] = [
    ("DiT-XS", 4, 128, 4),
    ("DiT-Ti", 12, 192, 3),
    ("DiT-S", 12, 384, 6),
    ("DiT-B", 12, 768, 12),
    ("DiT-L", 24, 1024, 16),
    ("DiT-XL", 28, 1152, 16),
];

impl Default for DiTConfig {
    /// DiT-XS/2 on 1×8×8 images (the bundled digits).
    fn default() -> Self {
        DiTConfig {
            in_channels: 1,
            image_size: 8,
            patch_size: 2,
            hidden_size: 128,
            depth: 4,
            num_heads: 4,
            mlp_ratio: 4.0,
            num_classes: 0,
            learn_sigma: false,
            context_dim: 0,
        }
    }
}

impl DiTConfig {
    /// The default configuration with the size of a named variant, `"DiT-S/2"` (depth 12,
    /// width 384, 6 heads, patch 2): one of [`VARIANTS`] and the patch size after the slash.
    pub fn named(name: &str) -> Result<Self> {
        let known = || {
            VARIANTS
                .iter()
                .map(|v| format!("{}/p", v.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some((size, patch)) = name.split_once('/') else {
            value_error!("DiT variant {name:?} has no patch size: expected one of {} with p the patch size (e.g. \"DiT-S/2\")", known());
        };
        let Some(&(_, depth, hidden_size, num_heads)) =
            VARIANTS.iter().find(|v| v.0.eq_ignore_ascii_case(size))
        else {
            value_error!("unknown DiT variant {name:?}: expected one of {}", known());
        };
        let patch_size: usize = match patch.parse() {
            Ok(p) if p > 0 => p,
            _ => value_error!(
                "DiT variant {name:?}: the patch size after '/' must be a positive integer"
            ),
        };
        Ok(DiTConfig {
            patch_size,
            hidden_size,
            depth,
            num_heads,
            ..DiTConfig::default()
        })
    }

    pub fn validate(&self) -> Result<()> {
        if self.in_channels == 0 || self.image_size == 0 || self.patch_size == 0 {
            value_error!(
                "in_channels, image_size and patch_size must be positive, got {}, {} and {}",
                self.in_channels,
                self.image_size,
                self.patch_size
            );
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            value_error!(
                "image_size {} is not divisible by patch_size {}",
                self.image_size,
                self.patch_size
            );
        }
        if self.depth == 0 {
            value_error!("depth must be at least 1");
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            value_error!(
                "num_heads = {} must divide hidden_size = {}",
                self.num_heads,
                self.hidden_size
            );
        }
        if self.hidden_size == 0 || !self.hidden_size.is_multiple_of(4) {
            value_error!(
                "hidden_size must be a positive multiple of 4 (the 2-D sin-cos position embedding \
                 splits it into four), got {}",
                self.hidden_size
            );
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            value_error!(
                "mlp_ratio must be positive and leave the MLP at least one hidden unit, got {}",
                self.mlp_ratio
            );
        }
        Ok(())
    }

    fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// Tokens per side.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// facebookresearch/DiT's `get_2d_sincos_pos_embed` for a `rows`×`cols` grid of tokens
/// (row-major), [rows·cols, dim] row-major: token (i, j) gets [sin(j ω), cos(j ω)] in its first
/// half (from the column, as the reference's meshgrid puts the column first) and
/// [sin(i ω), cos(i ω)] in its second, ω_k = 10000^(−k / (dim/4)), k < dim/4. In f64.
pub fn position_embedding_2d(dim: usize, rows: usize, cols: usize) -> Vec<f64> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| POSITION_MAX_PERIOD.powf(-(k as f64) / quarter as f64))
        .collect();
    let mut out = vec![0f64; rows * cols * dim];
    for (token, row) in out.chunks_mut(dim).enumerate() {
        let (i, j) = ((token / cols) as f64, (token % cols) as f64);
        for (half, pos) in [j, i].into_iter().enumerate() {
            let part = &mut row[half * 2 * quarter..(half + 1) * 2 * quarter];
            for (k, &w) in omega.iter().enumerate() {
                part[k] = (pos * w).sin();
                part[quarter + k] = (pos * w).cos();
            }
        }
    }
    out
}

/// Multi-head attention over tokens (diffusers' `Attention` names: to_q, to_k, to_v, to_out.0).
#[derive(Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// Queries from `dim`-wide tokens, keys and values from `kv_dim`-wide ones; `qkv_bound`
    /// the Xavier bound of the projections, `out` the output projection's initial weight (its
    /// bias starts at zero).
    fn new(
        p: &Path,
        dim: usize,
        kv_dim: usize,
        heads: usize,
        qkv_bound: f64,
        out: Init,
    ) -> Result<Self> {
        let xavier = |p: &Path, i: usize, o: usize, bound: f64| {
            Linear::with_inits(p, i, o, Init::Uniform(bound), Init::Zeros)
        };
        let kv_bound = if kv_dim == dim {
            qkv_bound
        } else {
            xavier_bound(kv_dim, dim)
        };
        Ok(Attention {
            to_q: xavier(&p.pp("to_q"), dim, dim, qkv_bound)?,
            to_k: xavier(&p.pp("to_k"), kv_dim, dim, kv_bound)?,
            to_v: xavier(&p.pp("to_v"), kv_dim, dim, kv_bound)?,
            to_out: Linear::with_inits(&p.pp("to_out").pp(0), dim, dim, out, Init::Zeros)?,
            heads,
        })
    }

    /// x [B, N, D] attending to `context` [B, M, kv_dim].
    fn cross_attention(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let o = multi_head_attention(
            &self.to_q.forward(x)?,
            &self.to_k.forward(context)?,
            &self.to_v.forward(context)?,
            self.heads,
        )?;
        self.to_out.forward(&o)
    }
}

/// √(6 / (fan_in + fan_out)): Xavier/Glorot uniform.
fn xavier_bound(fan_in: usize, fan_out: usize) -> f64 {
    (6.0 / (fan_in + fan_out) as f64).sqrt()
}

/// One DiT block with adaLN-Zero (and a cross-attention when the model has a context).
#[derive(Clone)]
struct Block {
    /// SiLU(c) -> [shift, scale, gate] for the attention, then for the MLP (`norm1.linear`).
    modulation: Linear,
    attn1: Attention,
    attn2: Option<Attention>,
    ff_in: Linear,
    ff_out: Linear,
}

/// The six chunks of a block's modulation, in facebookresearch/DiT's order.
const SHIFT_MSA: usize = 0;
const SCALE_MSA: usize = 1;
const GATE_MSA: usize = 2;
const SHIFT_MLP: usize = 3;
const SCALE_MLP: usize = 4;
const GATE_MLP: usize = 5;

impl Block {
    fn new(p: &Path, c: &DiTConfig) -> Result<Self> {
        let d = c.hidden_size;
        let xavier = |p: &Path, i: usize, o: usize| {
            Linear::with_inits(p, i, o, Init::Uniform(xavier_bound(i, o)), Init::Zeros)
        };
        Ok(Block {
            modulation: Linear::zeros(&p.pp("norm1").pp("linear"), d, 6 * d)?,
            attn1: Attention::new(
                &p.pp("attn1"),
                d,
                d,
                c.num_heads,
                xavier_bound(d, 3 * d),
                Init::Uniform(xavier_bound(d, d)),
            )?,
            attn2: if c.context_dim > 0 {
                Some(Attention::new(
                    &p.pp("attn2"),
                    d,
                    c.context_dim,
                    c.num_heads,
                    xavier_bound(d, d),
                    Init::Zeros,
                )?)
            } else {
                None
            },
            ff_in: xavier(&p.pp("ff").pp("net").pp(0).pp("proj"), d, c.mlp_hidden())?,
            ff_out: xavier(&p.pp("ff").pp("net").pp(2), c.mlp_hidden(), d)?,
        })
    }

    /// x [B, N, D] conditioned on `cond` = SiLU(c) [B, D] (and on `context` [B, M, ·]).
    fn forward(&self, x: &Tensor, cond: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let m = self.modulation.forward(cond)?;
        let a = &self.attn1;
        let attention = Weights {
            w1: &[a.to_q.weight(), a.to_k.weight(), a.to_v.weight()],
            b1: &[a.to_q.bias(), a.to_k.bias(), a.to_v.bias()],
            w2: a.to_out.weight(),
            b2: a.to_out.bias(),
        };
        let msa = Chunks {
            shift: SHIFT_MSA,
            scale: SCALE_MSA,
            gate: GATE_MSA,
        };
        let heads = Middle::Attention { heads: a.heads };
        let x = sublayer(x, &m, msa, &attention, heads, LAYER_NORM_EPS)?;
        let x = match (&self.attn2, context) {
            (Some(a), Some(c)) => (&x + a.cross_attention(&layer_norm(&x, LAYER_NORM_EPS)?, c)?)?,
            _ => x,
        };
        let mlp = Weights {
            w1: &[self.ff_in.weight()],
            b1: &[self.ff_in.bias()],
            w2: self.ff_out.weight(),
            b2: self.ff_out.bias(),
        };
        let chunks = Chunks {
            shift: SHIFT_MLP,
            scale: SCALE_MLP,
            gate: GATE_MLP,
        };
        Ok(sublayer(
            &x,
            &m,
            chunks,
            &mlp,
            Middle::Gelu,
            LAYER_NORM_EPS,
        )?)
    }
}

#[derive(Clone)]
pub struct DiT {
    config: DiTConfig,
    /// The patchifying convolution [D, C, p, p] and its bias (`pos_embed.proj`).
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// The fixed position embedding [N, D] (not a parameter).
    position: Tensor,
    time_1: Linear,
    time_2: Linear,
    class_embedding: Option<Embedding>,
    blocks: Vec<Block>,
    /// The learned context [1, context_dim] of unconditional rows.
    null_context: Option<Tensor>,
    /// SiLU(c) -> [shift, scale] of the final layer.
    final_modulation: Linear,
    final_linear: Linear,
}

impl DiT {
    pub fn new(p: &Path, c: &DiTConfig) -> Result<Self> {
        c.validate()?;
        let (d, ps) = (c.hidden_size, c.patch_size);
        let patch_in = c.in_channels * ps * ps;
        let pp = p.pp("pos_embed").pp("proj");
        let grid = c.grid();
        let position = Tensor::from_vec(
            position_embedding_2d(d, grid, grid),
            (grid * grid, d),
            p.device(),
        )?
        .to_dtype(p.dtype())?;
        let normal = |p: &Path, i: usize, o: usize| {
            Linear::with_inits(p, i, o, Init::Normal(EMBEDDING_INIT_STD), Init::Zeros)
        };
        let te = p.pp("timestep_embedder");
        Ok(DiT {
            config: c.clone(),
            patch_weight: pp.var(
                "weight",
                &[d, c.in_channels, ps, ps],
                Init::Uniform(xavier_bound(patch_in, d)),
            )?,
            patch_bias: pp.var("bias", &[d], Init::Zeros)?,
            position,
            time_1: normal(&te.pp("linear_1"), FREQUENCY_EMBEDDING_SIZE, d)?,
            time_2: normal(&te.pp("linear_2"), d, d)?,
            class_embedding: if c.num_classes > 0 {
                Some(Embedding::with_std(
                    &p.pp("class_embedder").pp("embedding_table"),
                    c.num_classes + 1,
                    d,
                    EMBEDDING_INIT_STD,
                )?)
            } else {
                None
            },
            blocks: (0..c.depth)
                .map(|i| Block::new(&p.pp("transformer_blocks").pp(i), c))
                .collect::<Result<_>>()?,
            null_context: if c.context_dim > 0 {
                Some(p.var("null_context", &[1, c.context_dim], Init::Normal(1.0))?)
            } else {
                None
            },
            final_modulation: Linear::zeros(&p.pp("proj_out_1"), d, 2 * d)?,
            final_linear: Linear::zeros(&p.pp("proj_out_2"), d, ps * ps * c.out_channels())?,
        })
    }

    pub fn config(&self) -> &DiTConfig {
        &self.config
    }

    /// Checks an input shape [B, C, H, W] against the configuration: the position embedding
    /// is fixed, so H = W = image_size.
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        let c = &self.config;
        if shape.len() != 4
            || shape[1] != c.in_channels
            || shape[2] != c.image_size
            || shape[3] != c.image_size
        {
            shape_error!(
                "x has shape {shape:?} but the DiT takes [B, {}, {s}, {s}] (its position embedding is \
                 fixed for image_size = {s}, patch_size = {})",
                c.in_channels,
                c.patch_size,
                s = c.image_size
            );
        }
        Ok(())
    }

    /// x [B, C, H, W] -> tokens [B, N, D] (row-major patches), position embedding added.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw, d) = (h / p, w / p, self.config.hidden_size);
        // Each patch flattened as (channel, row, column), the order of the conv weight's
        // [D, C, p, p]: the stride-p convolution is one product with the weight as [D, C·p·p].
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute([0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let tokens = linear(
            &patches,
            &self.patch_weight.reshape((d, c * p * p))?,
            &self.patch_bias,
        )?;
        Ok(tokens.broadcast_add(&self.position.unsqueeze(0)?)?)
    }

    /// tokens [B, N, p·p·C_out] (each patch as (row, column, channel)) -> [B, C_out, H, W].
    fn unpatchify(&self, y: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let b = y.dims()[0];
        let p = self.config.patch_size;
        let co = self.config.out_channels();
        Ok(y.reshape((b, h / p, w / p, p, p, co))?
            .permute([0, 5, 1, 3, 2, 4])?
            .contiguous()?
            .reshape((b, co, h, w))?)
    }

    /// SiLU(c) for c = t_emb + y_emb, [B, D]: what every modulation reads.
    fn conditioning(&self, t: &[f32], labels: Option<&[u32]>, like: &Tensor) -> Result<Tensor> {
        let freq = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, like.device())?
            .to_dtype(like.dtype())?;
        let mut c = self.time_2.forward(&silu(&self.time_1.forward(&freq)?)?)?;
        if let (Some(table), Some(y)) = (&self.class_embedding, labels) {
            c = (c + table.forward(y)?)?;
        }
        silu(&c)
    }

    pub fn forward(&self, x: &Tensor, t: &[f32], cond: &Cond, _ctx: &Ctx) -> Result<Tensor> {
        self.check_input(x.dims())?;
        let (b, _, h, w) = x.dims4()?;
        let context = super::attended_context(self.null_context.as_ref(), b, cond)?;
        let c = self.conditioning(t, cond.labels, x)?;
        let mut tokens = self.patchify(x)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, &c, context.as_ref())?;
        }
        // proj_out_1's output is [shift, scale].
        let m = self.final_modulation.forward(&c)?;
        let tokens = modulated_layer_norm(&tokens, &m, 0, 1, LAYER_NORM_EPS)?;
        self.unpatchify(&self.final_linear.forward(&tokens)?, h, w)
    }
}

#[cfg(test)]
#[path = "dit_tests.rs"]
mod tests;
