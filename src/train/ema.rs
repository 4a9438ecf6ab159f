//! Exponential moving average of the weights, with diffusers' `EMAModel` decay rule:
//! after `update_after_step` steps the decay at EMA step s is 1 - (1 + s/inv_gamma)^-power
//! (warm-up on) or (1 + s)/(10 + s) (off), capped at `max_decay` and floored at `min_decay`.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw::host_values;
use crate::error::Result;
use crate::value_error;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    pub max_decay: f64,
    pub min_decay: f64,
    pub update_after_step: u64,
    pub use_warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaConfig {
    /// diffusers' `train_unconditional.py` defaults (max 0.9999, warm-up with power 3/4).
    fn default() -> Self {
        EmaConfig {
            max_decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_warmup: true,
            inv_gamma: 1.0,
            power: 0.75,
        }
    }
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.max_decay)
            || !(0.0..=self.max_decay).contains(&self.min_decay)
        {
            value_error!(
                "EMA decays need 0 <= min_decay <= max_decay <= 1, got min {} max {}",
                self.min_decay,
                self.max_decay
            );
        }
        if self.inv_gamma.is_nan()
            || self.inv_gamma <= 0.0
            || self.power.is_nan()
            || self.power <= 0.0
        {
            value_error!("EMA inv_gamma and power must be positive");
        }
        Ok(())
    }

    /// The decay used at optimisation step `optimization_step` (1-based, as diffusers counts).
    pub fn decay(&self, optimization_step: u64) -> f64 {
        let s = optimization_step.saturating_sub(self.update_after_step + 1);
        if s == 0 {
            return 0.0;
        }
        let s = s as f64;
        let d = if self.use_warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        d.min(self.max_decay).max(self.min_decay)
    }
}

pub struct Ema {
    pub config: EmaConfig,
    /// (name, shape, values) of the averaged weights, on the host.
    shadow: Vec<(String, Vec<usize>, Vec<f32>)>,
    device: candle_core::Device,
    /// Updates made so far.
    pub optimization_step: u64,
}

impl Ema {
    pub fn new(params: &[(String, Var)], config: EmaConfig) -> Result<Self> {
        config.validate()?;
        let shadow = params
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.dims().to_vec(), host_values(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        let device = params
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        Ok(Ema {
            config,
            shadow,
            device,
            optimization_step: 0,
        })
    }

    /// shadow ← shadow - (1 - decay)(shadow - θ).
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        self.optimization_step += 1;
        let one_minus = (1.0 - self.config.decay(self.optimization_step)) as f32;
        for ((_, _, s), (_, v)) in self.shadow.iter_mut().zip(params) {
            let theta = host_values(v.as_tensor())?;
            for (sj, tj) in s.iter_mut().zip(&theta) {
                *sj -= one_minus * (*sj - tj);
            }
        }
        Ok(())
    }

    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.shadow
            .iter()
            .map(|(n, shape, v)| {
                Ok((
                    n.clone(),
                    Tensor::from_slice(v, shape.as_slice(), &self.device)?,
                ))
            })
            .collect()
    }

    pub fn load(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        optimization_step: u64,
    ) -> Result<()> {
        for (name, shape, s) in self.shadow.iter_mut() {
            let t = tensors.get(name).ok_or_else(|| {
                crate::Error::Shape(format!(
                    "the checkpoint's EMA weights have no parameter {name}"
                ))
            })?;
            if t.dims() != shape.as_slice() {
                crate::shape_error!(
                    "the checkpoint's EMA weight {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                );
            }
            *s = host_values(t)?;
        }
        self.optimization_step = optimization_step;
        Ok(())
    }
}
