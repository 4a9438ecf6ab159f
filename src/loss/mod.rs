//! Training objectives and the likelihood: targets and weights of the simple loss, the simple
//! loss with its gradient, the variational bound in bits/dim (OpenAI's conventions).

mod bpd;
mod hybrid;
pub mod likelihood;
pub mod simple;
pub mod tensors;
mod timestep_sampler;
pub mod weights;

pub use bpd::{bits_per_dim, p_mean_log_variance, vb_terms_from_output, BitsPerDim, BpdConfig};
pub use hybrid::{hybrid_loss, HybridLoss, HYBRID_VLB_WEIGHT};
pub use timestep_sampler::{TimestepSampler, TimestepSampling, HISTORY_PER_TERM, UNIFORM_PROB};

use crate::diffusion::{self, Prediction};
use crate::error::Result;
use crate::schedule::Schedule;

/// The regression target of a model of type `prediction` for x_t = q_sample(x0, t, noise):
/// ε → noise, x0 → x0, v → sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0.
pub fn training_target(
    schedule: &Schedule,
    shape: &[usize],
    x0: &[f32],
    noise: &[f32],
    t: &[i64],
    prediction: Prediction,
    out: &mut [f32],
) -> Result<()> {
    diffusion::row_alpha_bars(schedule, shape, t)?;
    match prediction {
        Prediction::Epsilon => out.copy_from_slice(noise),
        Prediction::X0 => out.copy_from_slice(x0),
        Prediction::V => diffusion::velocity(schedule, shape, x0, t, noise, out)?,
    }
    Ok(())
}
