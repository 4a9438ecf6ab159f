//! Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to zero at
//! `total_steps` (diffusers' `get_scheduler` shapes, with the warm-up counting step 0 as 1).

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::value_error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    Constant,
    Linear,
    Cosine,
}

impl LrDecay {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "constant" => LrDecay::Constant,
            "linear" => LrDecay::Linear,
            "cosine" => LrDecay::Cosine,
            other => {
                value_error!("lr_schedule must be 'constant', 'linear' or 'cosine', got {other:?}")
            }
        })
    }
}

/// The factor multiplying the base learning rate at step `step` (0-based).
pub fn lr_factor(decay: LrDecay, warmup_steps: u64, total_steps: u64, step: u64) -> f64 {
    if step < warmup_steps {
        return (step + 1) as f64 / warmup_steps as f64;
    }
    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
    let progress = ((step - warmup_steps) as f64 / span).min(1.0);
    match decay {
        LrDecay::Constant => 1.0,
        LrDecay::Linear => 1.0 - progress,
        LrDecay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
