//! AdamW (Loshchilov & Hutter 2019) with its moments exposed for checkpoints (candle-nn's
//! optimizer keeps them private). The update matches `torch.optim.AdamW`:
//! θ ← θ(1 - lr·λ) - lr · m̂ / (√v̂ + ε), with bias-corrected moments m̂, v̂.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
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
        if !(self.eps > 0.0) || !(self.weight_decay >= 0.0) {
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
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    /// Updates made so far (the t of the bias corrections).
    pub steps: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first_moment = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let second_moment = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            first_moment,
            second_moment,
            steps: 0,
        })
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for (_, v) in &self.params {
            if let Some(g) = grads.get(v.as_tensor()) {
                sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
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
        for (i, (_, var)) in self.params.iter().enumerate() {
            let theta = var.as_tensor();
            let g = match grads.get(theta) {
                Some(g) => (g * grad_scale)?,
                None => theta.zeros_like()?,
            };
            let m = ((&self.first_moment[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.second_moment[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * (1.0 / bias1))? / ((&v * (1.0 / bias2))?.sqrt()? + c.eps)?)?;
            let decayed = (theta * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first_moment[i] = m;
            self.second_moment[i] = v;
        }
        Ok(())
    }

    /// The moments as `m.{name}` / `v.{name}`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.first_moment[i].clone());
            out.insert(format!("v.{name}"), self.second_moment[i].clone());
        }
        out
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
                *slot = t.to_device(var.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
