//! The patch discriminator of an autoencoder's adversarial loss (PatchGAN, Isola et al. 2017, as
//! taming-transformers and latent diffusion use it): a stack of 4x4 convolutions that maps an
//! image [B, C, H, W] to a grid of real/fake logits [B, 1, h, w], one per overlapping patch.
//!
//! Layers, with `channels` = d and `layers` = n: conv(C → d, stride 2) + LeakyReLU(0.2); then for
//! k = 1 .. n − 1 conv(→ d·min(2^k, 8), stride 2, no bias) + BatchNorm + LeakyReLU; conv(→
//! d·min(2^n, 8), stride 1, no bias) + BatchNorm + LeakyReLU; conv(→ 1, stride 1). Every conv
//! has kernel 4 and padding 1, so a side s becomes ⌊s / 2^n⌋ − 2. Conv weights start from
//! N(0, 0.02²), biases at 0, the BatchNorm scale at 1 and shift at 0. BatchNorm always uses the
//! batch's statistics (ε 1e-5): the discriminator exists only during training, so it keeps no
//! running averages.

use candle_core::{DType, Device, Tensor};

use super::kernels::conv2d;
use super::params::{Init, ParamStore};
use crate::error::Result;
use crate::{shape_error, value_error};

const KERNEL: usize = 4;
const PADDING: usize = 1;
const SLOPE: f64 = 0.2;
const BN_EPS: f64 = 1e-5;
const INIT_STD: f64 = 0.02;

struct Layer {
    weight: Tensor,
    bias: Option<Tensor>,
    /// BatchNorm scale and shift [C].
    norm: Option<(Tensor, Tensor)>,
    stride: usize,
    leaky: bool,
}

pub struct PatchDiscriminator {
    params: ParamStore,
    layers: Vec<Layer>,
    in_channels: usize,
    depth: usize,
}

impl PatchDiscriminator {
    /// A discriminator of `in_channels`-channel images with `layers` stride-2 stages of base
    /// width `channels`, its weights drawn from `seed` in `dtype` (f32; f64 for exact checks).
    pub fn new(
        in_channels: usize,
        channels: usize,
        layers: usize,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if in_channels == 0 || channels == 0 || layers == 0 {
            value_error!(
                "the patch discriminator needs positive in_channels, disc_channels and disc_layers, \
                 got {in_channels}, {channels}, {layers}"
            );
        }
        let params = ParamStore::new(seed, device.clone(), dtype);
        let root = params.root();
        let width = |k: usize| channels * (1usize << k.min(3));
        let mut out = Vec::with_capacity(layers + 2);
        let mut cin = in_channels;
        for k in 0..=layers + 1 {
            let p = root.pp("layers").pp(k);
            let last = k == layers + 1;
            let cout = if last { 1 } else { width(k) };
            let normed = k > 0 && !last;
            out.push(Layer {
                weight: p.var(
                    "weight",
                    &[cout, cin, KERNEL, KERNEL],
                    Init::Normal(INIT_STD),
                )?,
                bias: if normed {
                    None
                } else {
                    Some(p.var("bias", &[cout], Init::Zeros)?)
                },
                norm: if normed {
                    Some((
                        p.var("norm.weight", &[cout], Init::Ones)?,
                        p.var("norm.bias", &[cout], Init::Zeros)?,
                    ))
                } else {
                    None
                },
                stride: if k < layers { 2 } else { 1 },
                leaky: !last,
            });
            cin = cout;
        }
        Ok(PatchDiscriminator {
            params,
            layers: out,
            in_channels,
            depth: layers,
        })
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The side of the logit grid for an input side `side` (0: too small).
    pub fn output_side(side: usize, layers: usize) -> usize {
        (side >> layers).saturating_sub(2)
    }

    /// The smallest input side that leaves at least one logit.
    pub fn min_side(layers: usize) -> usize {
        3 << layers
    }

    /// Patch logits [B, 1, h, w] of images x [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != self.in_channels {
            shape_error!(
                "the discriminator takes images [B, {}, H, W], got {dims:?}",
                self.in_channels
            );
        }
        let side = dims[2].min(dims[3]);
        if Self::output_side(side, self.depth) == 0 {
            shape_error!(
                "images of side {side} are too small for a patch discriminator with disc_layers = \
                 {} (at least {} pixels): use fewer layers",
                self.depth,
                Self::min_side(self.depth)
            );
        }
        let mut h = x.clone();
        for layer in &self.layers {
            h = conv2d(&h, &layer.weight, layer.stride, PADDING)?;
            if let Some(b) = &layer.bias {
                h = h.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
            }
            if let Some((scale, shift)) = &layer.norm {
                h = batch_norm(&h, scale, shift)?;
            }
            if layer.leaky {
                h = leaky_relu(&h)?;
            }
        }
        Ok(h)
    }
}

/// Training-mode batch normalisation: statistics over (B, H, W) per channel, biased variance.
fn batch_norm(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let c = x.dims()[1];
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    let normed = centred.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
    Ok(normed
        .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, c, 1, 1))?)?)
}

/// max(x, 0.2 x), as relu(x) − 0.2 relu(−x) (both pieces have candle gradients).
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? - (x.neg()?.relu()? * SLOPE)?)?)
}
