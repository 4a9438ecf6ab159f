//! Building blocks of the networks. They are written from candle's differentiable primitives
//! (candle 0.11's own fused LayerNorm, softmax and attention drop gradients), except where one
//! of our CPU kernels with its own backward replaces a hot path: conv2d (`super::kernels`),
//! GroupNorm with its scale-shift and SiLU (`super::norm`), linear layers (`super::linear`) and
//! softmax attention (`super::attention`). Parameter names follow diffusers'
//! (`weight`, `bias`, `to_q`, `norm1`, ...).

use std::cell::Cell;

use candle_core::{Device, Tensor, D};

use super::linear::linear;
use super::norm::{group_norm, Act};
use super::params::{uniforms, Init, Path};
use crate::error::Result;
use crate::value_error;

/// Per-forward state: training mode (dropout on) and the generator position of the masks.
pub struct Ctx {
    pub train: bool,
    seed: u64,
    /// Each dropout call takes the next stream, so masks differ between layers and steps.
    stream: Cell<u64>,
}

/// Stream domain of dropout masks (the step index lives in the high 32 bits).
const DROPOUT_STREAM: u64 = 0xD50_0000_0000_0000;

impl Ctx {
    /// Inference: no dropout.
    pub fn eval() -> Self {
        Ctx {
            train: false,
            seed: 0,
            stream: Cell::new(0),
        }
    }

    /// Training step `step` of a run seeded with `seed`.
    pub fn train(seed: u64, step: u64) -> Self {
        Ctx {
            train: true,
            seed,
            stream: Cell::new(DROPOUT_STREAM ^ (step << 24)),
        }
    }

    /// Inverted dropout with probability `p` (identity at inference or p = 0).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let stream = self.stream.get();
        self.stream.set(stream + 1);
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = uniforms(self.seed, stream, x.elem_count())
            .into_iter()
            .map(|u| if (u as f64) < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// y = x Wᵀ + b over the last dimension (PyTorch's initialisation).
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(p: &Path, in_dim: usize, out_dim: usize) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        Self::with_init(p, in_dim, out_dim, Init::Uniform(bound))
    }

    /// Zero weights and bias: a residual branch that starts as the identity.
    pub fn zeros(p: &Path, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::with_init(p, in_dim, out_dim, Init::Zeros)
    }

    fn with_init(p: &Path, in_dim: usize, out_dim: usize, init: Init) -> Result<Self> {
        let bias_init = match init {
            Init::Zeros => Init::Zeros,
            _ => Init::Uniform(1.0 / (in_dim as f64).sqrt()),
        };
        Self::with_inits(p, in_dim, out_dim, init, bias_init)
    }

    /// Weight [out_dim, in_dim] and bias [out_dim] initialised as given.
    pub fn with_inits(
        p: &Path,
        in_dim: usize,
        out_dim: usize,
        weight: Init,
        bias: Init,
    ) -> Result<Self> {
        Ok(Linear {
            weight: p.var("weight", &[out_dim, in_dim], weight)?,
            bias: p.var("bias", &[out_dim], bias)?,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// x [..., in] -> [..., out] (the fused kernel of `super::linear`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(linear(x, &self.weight, &self.bias)?)
    }
}

/// 2-D convolution, NCHW, square kernel, "same" padding for odd kernels.
#[derive(Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(p: &Path, cin: usize, cout: usize, kernel: usize, stride: usize) -> Result<Self> {
        let bound = 1.0 / ((cin * kernel * kernel) as f64).sqrt();
        Self::with_init(p, cin, cout, kernel, stride, Init::Uniform(bound))
    }

    /// As [`Conv2d::new`] with an explicit zero `padding` on every side.
    pub fn with_padding(
        p: &Path,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let mut conv = Self::new(p, cin, cout, kernel, stride)?;
        conv.padding = padding;
        Ok(conv)
    }

    /// Zero-initialised (the last layer of a residual branch; OpenAI's `zero_module`).
    pub fn zeros(p: &Path, cin: usize, cout: usize, kernel: usize) -> Result<Self> {
        Self::with_init(p, cin, cout, kernel, 1, Init::Zeros)
    }

    fn with_init(
        p: &Path,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        init: Init,
    ) -> Result<Self> {
        let bias_init = match init {
            Init::Zeros => Init::Zeros,
            _ => Init::Uniform(1.0 / ((cin * kernel * kernel) as f64).sqrt()),
        };
        Ok(Conv2d {
            weight: p.var("weight", &[cout, cin, kernel, kernel], init)?,
            bias: p.var("bias", &[cout], bias_init)?,
            stride,
            padding: kernel / 2,
        })
    }

    /// The weight [Cout, Cin, k, k].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The zero padding on every side.
    pub fn padding(&self) -> usize {
        self.padding
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(super::kernels::conv2d_bias(
            x,
            &self.weight,
            &self.bias,
            self.stride,
            self.padding,
        )?)
    }
}

/// Group normalisation (Wu & He 2018) with an affine transform, optionally fused with AdaGN's
/// per-sample scale and shift and a SiLU: one kernel pass (`super::norm`) instead of a dozen
/// elementwise ones.
#[derive(Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// GroupNorm's ε (PyTorch's default).
pub const GROUP_NORM_EPS: f64 = 1e-5;

impl GroupNorm {
    pub fn new(p: &Path, groups: usize, channels: usize) -> Result<Self> {
        Self::with_eps(p, groups, channels, GROUP_NORM_EPS)
    }

    /// As [`GroupNorm::new`] with ε = `eps` (diffusers' autoencoders use 1e-6).
    pub fn with_eps(p: &Path, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            value_error!("GroupNorm: {channels} channels are not divisible into {groups} groups");
        }
        Ok(GroupNorm {
            weight: p.var("weight", &[channels], Init::Ones)?,
            bias: p.var("bias", &[channels], Init::Zeros)?,
            groups,
            eps,
        })
    }

    /// GroupNorm(x) for x [B, C, ...].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, None, Act::Identity)
    }

    /// SiLU(GroupNorm(x)).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, None, Act::Silu)
    }

    /// AdaGN (Dhariwal & Nichol 2021): GroupNorm(x) · (1 + scale) + shift with per-sample
    /// `scale`, `shift` of shape [B, C], then SiLU when `silu`.
    pub fn forward_scale_shift(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        let act = if silu { Act::Silu } else { Act::Identity };
        self.fused(x, Some((scale, shift)), act)
    }

    /// act(x̂ · a + d) with a = γ (1 + scale), d = β (1 + scale) + shift per (item, channel).
    fn fused(
        &self,
        x: &Tensor,
        scale_shift: Option<(&Tensor, &Tensor)>,
        act: Act,
    ) -> Result<Tensor> {
        let b = x.dims()[0];
        let c = self.weight.dims()[0];
        let gamma = self.weight.unsqueeze(0)?;
        let beta = self.bias.unsqueeze(0)?;
        let (a, d) = match scale_shift {
            None => (gamma.broadcast_as((b, c))?, beta.broadcast_as((b, c))?),
            Some((scale, shift)) => {
                let s1 = (scale + 1.0)?;
                (
                    s1.broadcast_mul(&gamma)?,
                    (s1.broadcast_mul(&beta)? + shift)?,
                )
            }
        };
        Ok(group_norm(x, &a, &d, self.groups, self.eps, act)?)
    }
}

/// A lookup table (class embeddings; the last row is the null class).
#[derive(Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn new(p: &Path, rows: usize, dim: usize) -> Result<Self> {
        Self::with_std(p, rows, dim, 1.0)
    }

    /// A table of N(0, std²) entries.
    pub fn with_std(p: &Path, rows: usize, dim: usize, std: f64) -> Result<Self> {
        Ok(Embedding {
            table: p.var("weight", &[rows, dim], Init::Normal(std))?,
        })
    }

    pub fn rows(&self) -> usize {
        self.table.dims()[0]
    }

    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let rows = self.rows() as u32;
        if let Some(&bad) = ids.iter().find(|&&i| i >= rows) {
            value_error!("label {bad} is out of range: the model has {rows} class rows");
        }
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), self.table.device())?;
        Ok(self.table.index_select(&idx, 0)?)
    }
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(super::act::silu(x)?)
}

/// Softmax over the last dimension from differentiable ops (candle's fused
/// `softmax_last_dim` has no backward); the max is a constant shift and carries no gradient.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]: the frequencies
/// are exp(-ln(max_period) · i / half) and the output is [cos, sin] (diffusers'
/// `flip_sin_to_cos=True`, `downscale_freq_shift=0`; OpenAI's `timestep_embedding`).
pub fn timestep_embedding(t: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    timestep_embedding_with(t, dim, true, 0.0, device)
}

/// diffusers' `get_timestep_embedding`: frequencies exp(−ln(10⁴) i / (half − `freq_shift`)),
/// [cos, sin] halves with `flip_sin_to_cos` (ferrodiff's and diffusers' default) or [sin, cos]
/// (the original DDPM's, with `freq_shift` = 1).
pub fn timestep_embedding_with(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    const MAX_PERIOD: f64 = 10_000.0;
    let half = dim / 2;
    let (first, second) = if flip_sin_to_cos {
        (0, half)
    } else {
        (half, 0)
    };
    let mut out = vec![0f32; t.len() * dim];
    for (row, &ti) in out.chunks_mut(dim).zip(t) {
        for i in 0..half {
            let freq = (-(MAX_PERIOD.ln()) * i as f64 / (half as f64 - freq_shift)).exp();
            let arg = ti as f64 * freq;
            row[first + i] = arg.cos() as f32;
            row[second + i] = arg.sin() as f32;
        }
    }
    Ok(Tensor::from_vec(out, (t.len(), dim), device)?)
}

/// Attention from the spatial positions of [B, C, H, W], with a residual connection, to the
/// positions themselves (self-attention) or to a context [B, M, kv_dim] (cross-attention, latent
/// diffusion's conditioning on embeddings). diffusers' `Attention` names: group_norm, to_q, to_k,
/// to_v, to_out.0; the output projection starts at zero, so a new block is the identity.
#[derive(Clone)]
pub struct AttentionBlock {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    skip_rescale: bool,
}

impl AttentionBlock {
    /// Self-attention over `channels`-wide positions.
    pub fn new(
        p: &Path,
        channels: usize,
        heads: usize,
        groups: usize,
        skip_rescale: bool,
    ) -> Result<Self> {
        Self::with_kv_dim(p, channels, channels, heads, groups, skip_rescale)
    }

    /// Attention whose keys and values come from `kv_dim`-wide tokens (`kv_dim = channels`
    /// for self-attention, the context width for cross-attention).
    pub fn with_kv_dim(
        p: &Path,
        channels: usize,
        kv_dim: usize,
        heads: usize,
        groups: usize,
        skip_rescale: bool,
    ) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            value_error!("attention: {channels} channels do not split into {heads} heads");
        }
        Ok(AttentionBlock {
            norm: GroupNorm::new(&p.pp("group_norm"), groups, channels)?,
            to_q: Linear::new(&p.pp("to_q"), channels, channels)?,
            to_k: Linear::new(&p.pp("to_k"), kv_dim, channels)?,
            to_v: Linear::new(&p.pp("to_v"), kv_dim, channels)?,
            to_out: Linear::zeros(&p.pp("to_out").pp(0), channels, channels)?,
            heads,
            skip_rescale,
        })
    }

    /// The same block with its GroupNorm's ε set to `eps`.
    pub fn with_norm_eps(mut self, eps: f64) -> Self {
        self.norm.eps = eps;
        self
    }

    /// Self-attention of x [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.attend(x, None)
    }

    /// x [B, C, H, W] attending to `context` [B, M, kv_dim].
    pub fn forward_cross(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.attend(x, Some(context))
    }

    fn attend(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = to_tokens(&self.norm.forward(x)?)?;
        let kv = context.unwrap_or(&tokens);
        let o = multi_head_attention(
            &self.to_q.forward(&tokens)?,
            &self.to_k.forward(kv)?,
            &self.to_v.forward(kv)?,
            self.heads,
        )?;
        let o = from_tokens(&self.to_out.forward(&o)?, (b, c, h, w))?;
        residual(x, &o, self.skip_rescale)
    }
}

/// [B, C, H, W] -> [B, H·W, C].
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
}

/// [B, H·W, C] -> [B, C, H, W].
fn from_tokens(x: &Tensor, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    Ok(x.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

fn residual(x: &Tensor, branch: &Tensor, skip_rescale: bool) -> Result<Tensor> {
    let y = (x + branch)?;
    Ok(if skip_rescale {
        (y * std::f64::consts::FRAC_1_SQRT_2)?
    } else {
        y
    })
}

/// softmax(Q Kᵀ / √d) V per head: q [B, N, C], k and v [B, M, C] -> [B, N, C]. The heads are
/// split into a batch of B·heads items for the fused kernel ([`super::attention::attention`]).
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = k.dims()[1];
    let d = c / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, len, d))?)
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let o = super::attention::attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?;
    Ok(o.reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, c))?)
}
