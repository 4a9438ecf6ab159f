//! ferrodiff: diffusion models with a Rust core.
//!
//! Layers, from the bottom: [`schedule`] (β_t and derived tables, timestep spacing),
//! [`diffusion`] (the forward process and parameterizations), [`kernels`] (fused passes over
//! f32 data and the counter-based RNG), [`sample`] (DDPM, DDIM), [`oracles`] (analytic
//! denoisers), [`nn`] (candle denoisers) and [`train`] (optimiser, EMA, checkpoints, trainer). The Python bindings live in `python` behind the cargo feature of that name.

pub mod diffusion;
pub mod error;
pub mod kernels;
pub mod loss;
pub mod metrics;
pub mod nn;
pub mod oracles;
pub mod sample;
pub mod schedule;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
