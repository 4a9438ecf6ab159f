//! AdamW (Loshchilov & Hutter 2019) with its moments exposed for checkpoints (candle-nn's
//! optimizer keeps them private). The update matches `torch.optim.AdamW`:
//! θ ← θ(1 - lr·λ) - lr · m̂ / (√v̂ + ε), with bias-corrected moments m̂, v̂.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::{shape_error, value_error};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except weight decay (0 here: diffusion models are usually trained
    /// without it; diffusers' scripts default to 1e-6).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                value_error!("{name} must be in [0, 1), got {b}");
            }
        }
        if self.eps.is_nan()
            || self.eps <= 0.0
            || self.weight_decay.is_nan()
            || self.weight_decay < 0.0
        {
            value_error!(
                "eps must be positive and weight_decay non-negative, got {} and {}",
                self.eps,
                self.weight_decay
            );
        }
        Ok(())
    }
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    /// First and second moments, on the host: one fused pass per parameter updates both and
    /// the weights (fifteen candle ops per parameter cost more than the network's backward
    /// for small models).
    first_moment: Vec<Vec<f32>>,
    second_moment: Vec<Vec<f32>>,
    /// Updates made so far (the t of the bias corrections).
    pub steps: u64,
}

/// A tensor's values as a host f32 vector.
pub(crate) fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let zeros: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, v)| vec![0f32; v.elem_count()])
            .collect();
        Ok(AdamW {
            config,
            first_moment: zeros.clone(),
            second_moment: zeros,
            params,
            steps: 0,
        })
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for (_, v) in &self.params {
            if let Some(g) = grads.get(v.as_tensor()) {
                sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` (clipping).
    /// A parameter without a gradient is treated as having a zero gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step_size = (lr / bias1) as f32;
        let inv_sqrt_bias2 = (1.0 / bias2.sqrt()) as f32;
        let (eps, decay, scale) = (
            c.eps as f32,
            (1.0 - lr * c.weight_decay) as f32,
            grad_scale as f32,
        );
        for (i, (_, var)) in self.params.iter().enumerate() {
            let theta_t = var.as_tensor();
            let mut theta = host_values(theta_t)?;
            let g = match grads.get(theta_t) {
                Some(g) => host_values(g)?,
                None => vec![0f32; theta.len()],
            };
            let (m, v) = (&mut self.first_moment[i], &mut self.second_moment[i]);
            // Zipped iterators (no bounds checks) so the loop vectorises.
            for (((th, &gj), mj), vj) in
                theta.iter_mut().zip(&g).zip(m.iter_mut()).zip(v.iter_mut())
            {
                let gj = gj * scale;
                *mj = b1 * *mj + (1.0 - b1) * gj;
                *vj = b2 * *vj + (1.0 - b2) * gj * gj;
                // θ(1 - lr λ) - (lr / (1 - β1^t)) m / (sqrt(v / (1 - β2^t)) + ε)
                *th = *th * decay - step_size * *mj / (vj.sqrt() * inv_sqrt_bias2 + eps);
            }
            let t = Tensor::from_vec(theta, theta_t.dims(), theta_t.device())?
                .to_dtype(theta_t.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The moments as `m.{name}` / `v.{name}`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            let dev = var.device();
            out.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.first_moment[i], var.dims(), dev)?,
            );
            out.insert(
                format!("v.{name}"),
                Tensor::from_slice(&self.second_moment[i], var.dims(), dev)?,
            );
        }
        Ok(out)
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (key, slot) in [
                ("m", &mut self.first_moment[i]),
                ("v", &mut self.second_moment[i]),
            ] {
                let t = state.get(&format!("{key}.{name}")).ok_or_else(|| {
                    crate::Error::Shape(format!(
                        "the checkpoint's optimizer state has no moment for {name}"
                    ))
                })?;
                if t.dims() != var.dims() {
                    shape_error!(
                        "the checkpoint's optimizer moment for {name} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = host_values(t)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
