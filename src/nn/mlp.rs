//! A residual MLP denoiser for low-dimensional data (2-D toys, flattened 8x8 digits): each
//! block adds the time (and class) embedding between two linear layers.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{silu, timestep_embedding, Ctx, Embedding, Linear};
use super::params::Path;
use crate::error::Result;
use crate::value_error;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    /// One sample's shape, e.g. [2] for 2-D points or [1, 8, 8] for digits (flattened inside).
    pub data_shape: Vec<usize>,
    /// Width of the hidden layers.
    pub hidden: usize,
    /// Residual blocks.
    pub blocks: usize,
    /// Width of the sinusoidal time embedding fed to the time MLP.
    pub time_embed_dim: usize,
    /// Classes for conditioning (0: unconditional); row `num_classes` is the null class.
    pub num_classes: usize,
    pub dropout: f64,
    /// Output twice the data's first dimension: mean and variance interpolation v.
    pub learn_sigma: bool,
    /// Scale each residual sum by 1/√2.
    pub skip_rescale: bool,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            data_shape: vec![2],
            hidden: 256,
            blocks: 3,
            time_embed_dim: 128,
            num_classes: 0,
            dropout: 0.0,
            learn_sigma: false,
            skip_rescale: false,
        }
    }
}

impl MlpConfig {
    pub fn validate(&self) -> Result<()> {
        if self.data_shape.is_empty() || self.data_shape.contains(&0) {
            value_error!(
                "data_shape must be non-empty with positive sizes, got {:?}",
                self.data_shape
            );
        }
        if self.hidden == 0 || self.blocks == 0 {
            value_error!(
                "hidden and blocks must be positive, got {} and {}",
                self.hidden,
                self.blocks
            );
        }
        if self.time_embed_dim < 2 || !self.time_embed_dim.is_multiple_of(2) {
            value_error!(
                "time_embed_dim must be even and at least 2, got {}",
                self.time_embed_dim
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            value_error!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    pub fn in_dim(&self) -> usize {
        self.data_shape.iter().product()
    }
}

#[derive(Clone)]
struct Block {
    linear_1: Linear,
    emb_proj: Linear,
    linear_2: Linear,
}

#[derive(Clone)]
pub struct Mlp {
    config: MlpConfig,
    time_1: Linear,
    time_2: Linear,
    class_embedding: Option<Embedding>,
    proj_in: Linear,
    blocks: Vec<Block>,
    proj_out: Linear,
}

impl Mlp {
    pub fn new(p: &Path, config: &MlpConfig) -> Result<Self> {
        config.validate()?;
        let (d, h) = (config.in_dim(), config.hidden);
        let out = if config.learn_sigma { 2 * d } else { d };
        let te = p.pp("time_embedding");
        Ok(Mlp {
            config: config.clone(),
            time_1: Linear::new(&te.pp("linear_1"), config.time_embed_dim, h)?,
            time_2: Linear::new(&te.pp("linear_2"), h, h)?,
            class_embedding: if config.num_classes > 0 {
                Some(Embedding::new(
                    &p.pp("class_embedding"),
                    config.num_classes + 1,
                    h,
                )?)
            } else {
                None
            },
            proj_in: Linear::new(&p.pp("proj_in"), d, h)?,
            blocks: (0..config.blocks)
                .map(|i| {
                    let b = p.pp("blocks").pp(i);
                    Ok(Block {
                        linear_1: Linear::new(&b.pp("linear_1"), h, h)?,
                        emb_proj: Linear::new(&b.pp("emb_proj"), h, h)?,
                        linear_2: Linear::new(&b.pp("linear_2"), h, h)?,
                    })
                })
                .collect::<Result<_>>()?,
            proj_out: Linear::new(&p.pp("proj_out"), h, out)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        t: &[f32],
        labels: Option<&[u32]>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let b = x.dims()[0];
        let flat = x.reshape((b, self.config.in_dim()))?;
        let temb =
            timestep_embedding(t, self.config.time_embed_dim, x.device())?.to_dtype(x.dtype())?;
        let mut emb = self.time_2.forward(&silu(&self.time_1.forward(&temb)?)?)?;
        if let (Some(table), Some(y)) = (&self.class_embedding, labels) {
            emb = (emb + table.forward(y)?)?;
        }
        let emb = silu(&emb)?;
        let mut h = self.proj_in.forward(&flat)?;
        for block in &self.blocks {
            let z = block.linear_1.forward(&silu(&h)?)?;
            let z = (z + block.emb_proj.forward(&emb)?)?;
            let z = ctx.dropout(&silu(&z)?, self.config.dropout)?;
            h = (h + block.linear_2.forward(&z)?)?;
            if self.config.skip_rescale {
                h = (h * std::f64::consts::FRAC_1_SQRT_2)?;
            }
        }
        let y = self.proj_out.forward(&silu(&h)?)?;
        let mut shape = vec![b];
        shape.extend_from_slice(&self.config.data_shape);
        if self.config.learn_sigma {
            shape[1] *= 2;
        }
        Ok(y.reshape(shape)?)
    }
}
