//! Reading a diffusers `scheduler_config.json` (DDPMScheduler / DDIMScheduler keys).

use serde_json::Value;

use super::{Schedule, Spacing};
use crate::error::{Error, Result};
use crate::value_error;

/// The settings of a diffusers scheduler config that ferrodiff carries over, with diffusers'
/// defaults for absent keys. Unknown keys (`_class_name`, ...) are ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusersConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub steps_offset: i64,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub variance_type: String,
    pub set_alpha_to_one: bool,
}

impl Default for DiffusersConfig {
    fn default() -> Self {
        DiffusersConfig {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            variance_type: "fixed_small".into(),
            set_alpha_to_one: true,
        }
    }
}

fn bad(key: &str, expected: &str, v: &Value) -> Error {
    Error::Value(format!(
        "scheduler config key {key:?} must be {expected}, got {v}"
    ))
}

impl DiffusersConfig {
    /// Parses the JSON text of a scheduler config.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Value(format!("scheduler config is not valid JSON: {e}")))?;
        let obj = match v.as_object() {
            Some(o) => o,
            None => value_error!("scheduler config must be a JSON object, got {v}"),
        };
        let mut c = DiffusersConfig::default();
        for (key, val) in obj {
            let num = || val.as_f64().ok_or_else(|| bad(key, "a number", val));
            let boolean = || val.as_bool().ok_or_else(|| bad(key, "true or false", val));
            let string = || {
                val.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(key, "a string", val))
            };
            match key.as_str() {
                "num_train_timesteps" => {
                    c.num_train_timesteps = val
                        .as_u64()
                        .ok_or_else(|| bad(key, "a positive integer", val))?
                        as usize
                }
                "beta_start" => c.beta_start = num()?,
                "beta_end" => c.beta_end = num()?,
                "beta_schedule" => c.beta_schedule = string()?,
                "trained_betas" => {
                    c.trained_betas = match val {
                        Value::Null => None,
                        Value::Array(a) => Some(
                            a.iter()
                                .map(|x| {
                                    x.as_f64().ok_or_else(|| bad(key, "a list of numbers", val))
                                })
                                .collect::<Result<_>>()?,
                        ),
                        _ => return Err(bad(key, "a list of numbers or null", val)),
                    }
                }
                "rescale_betas_zero_snr" => c.rescale_betas_zero_snr = boolean()?,
                "prediction_type" => c.prediction_type = string()?,
                "timestep_spacing" => c.timestep_spacing = string()?,
                "steps_offset" => {
                    c.steps_offset = val.as_i64().ok_or_else(|| bad(key, "an integer", val))?
                }
                "clip_sample" => c.clip_sample = boolean()?,
                "clip_sample_range" => c.clip_sample_range = num()?,
                "thresholding" => c.thresholding = boolean()?,
                "dynamic_thresholding_ratio" => c.dynamic_thresholding_ratio = num()?,
                "sample_max_value" => c.sample_max_value = num()?,
                "variance_type" => {
                    c.variance_type = match val {
                        Value::Null => "fixed_small".into(),
                        _ => string()?,
                    }
                }
                "set_alpha_to_one" => c.set_alpha_to_one = boolean()?,
                _ => {}
            }
        }
        Ok(c)
    }

    /// The training schedule the config describes.
    pub fn schedule(&self) -> Result<Schedule> {
        let t = self.num_train_timesteps;
        let s = if let Some(b) = &self.trained_betas {
            if b.len() != t {
                value_error!(
                    "trained_betas has {} entries but num_train_timesteps is {t}",
                    b.len()
                );
            }
            Schedule::from_betas(b.clone())?
        } else {
            match self.beta_schedule.as_str() {
                "linear" => Schedule::linear(t, self.beta_start, self.beta_end, false)?,
                "scaled_linear" => Schedule::scaled_linear(t, self.beta_start, self.beta_end)?,
                "squaredcos_cap_v2" | "cosine" => {
                    Schedule::cosine(t, super::COSINE_OFFSET, super::COSINE_MAX_BETA)?
                }
                "sigmoid" => Schedule::sigmoid(t, self.beta_start, self.beta_end)?,
                other => value_error!(
                    "unknown beta_schedule {other:?}: expected one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid'"
                ),
            }
        };
        if self.rescale_betas_zero_snr {
            s.rescale_zero_terminal_snr()
        } else {
            Ok(s)
        }
    }

    pub fn spacing(&self) -> Result<Spacing> {
        Spacing::parse(&self.timestep_spacing)
    }
}
