//! Samplers. A step is a handful of scalar coefficients from the schedule (computed in f64, per
//! row) plus one fused pass over the data (`kernels::fused_step`).

pub mod consistency;
mod ddim;
mod ddpm;
mod denoiser;
pub mod engine;
pub mod guidance;
pub mod langevin;
pub mod ode;
pub mod sigma;

pub use ddim::{Ddim, DdimConfig};
pub use ddpm::{Ddpm, DdpmConfig, VarianceType};
pub use denoiser::{
    edit_start, integral_timesteps, invert_loop, noised_start, sample_loop, sample_loop_edit,
    Denoiser, Edit, LoopHooks, ModelOutput, NoHooks,
};
pub use guidance::{
    ClassifierFactor, ClassifierGuided, Conditioned, GradLogProb, Guidance, LabeledDenoiser,
};

use crate::diffusion::{x0_coefficients, Prediction};
use crate::error::{Error, Result};
use crate::kernels::{fused_step, rng, threshold_scales, Noise, RowStep};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// The stream of the initial noise x_T: no timestep can take this value, so `randn(shape, seed)`
/// never repeats a sampler step's noise.
pub const INITIAL_NOISE_STREAM: u64 = u64::MAX;

/// Standard normal noise of `len` elements, a pure function of (seed, stream, element index).
pub fn randn(len: usize, seed: u64, stream: u64) -> Vec<f32> {
    let mut out = vec![0f32; len];
    randn_into(&mut out, seed, stream);
    out
}

/// Fills `out` with the noise of `randn` (element i of the stream at index i).
pub fn randn_into(out: &mut [f32], seed: u64, stream: u64) {
    crate::kernels::for_each_chunk(out, |start, chunk| {
        rng::fill_normal(seed, stream, start as u64, chunk)
    });
}

/// Imagen's dynamic thresholding settings (Saharia et al. 2022).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicThreshold {
    /// Quantile of |x0| per sample (Imagen: 0.995).
    pub ratio: f64,
    /// Upper bound on the per-sample threshold (diffusers' `sample_max_value`); None: Imagen's rule.
    pub max_value: Option<f64>,
}

/// Imagen's percentile, p = 99.5 %.
pub const DYNAMIC_THRESHOLD_RATIO: f64 = 0.995;

impl DynamicThreshold {
    pub fn new(ratio: f64, max_value: Option<f64>) -> Result<Self> {
        if !(ratio.is_finite() && ratio > 0.0 && ratio <= 1.0) {
            value_error!("DynamicThreshold ratio must be in (0, 1], got {ratio}");
        }
        if let Some(m) = max_value {
            if !(m.is_finite() && m >= 1.0) {
                value_error!("DynamicThreshold max_value must be finite and >= 1, got {m}");
            }
        }
        Ok(DynamicThreshold { ratio, max_value })
    }
}

/// What happens to the predicted x0 before it is used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum X0Processing {
    None,
    /// Clamp to [-r, r] (diffusers' `clip_sample` with `clip_sample_range = r`).
    Clip(f64),
    Threshold(DynamicThreshold),
}

impl X0Processing {
    /// From the user's `clip_sample` and `threshold`; giving both is an error.
    pub fn from_options(
        clip_sample: Option<f64>,
        threshold: Option<DynamicThreshold>,
    ) -> Result<Self> {
        match (clip_sample, threshold) {
            (Some(_), Some(_)) => value_error!(
                "clip_sample and threshold are exclusive: dynamic thresholding already clamps x0 (pass one of them)"
            ),
            (Some(r), None) => {
                if !(r.is_finite() && r > 0.0) {
                    value_error!("clip_sample must be a positive finite range, got {r}");
                }
                Ok(X0Processing::Clip(r))
            }
            (None, Some(t)) => Ok(X0Processing::Threshold(t)),
            (None, None) => Ok(X0Processing::None),
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, X0Processing::None)
    }
}

/// What every sampler offers to the step function and loops.
pub trait Sampler: Sync {
    fn schedule(&self) -> &Schedule;
    /// The timesteps visited, descending.
    fn timesteps(&self) -> &[i64];
    fn prediction(&self) -> Prediction;
    fn x0_processing(&self) -> X0Processing;
    /// Per-row coefficients of the step at each row's timestep (clip bounds left open).
    fn row_steps(&self, t: &[i64]) -> Result<Vec<RowStep>>;
    /// Whether this sampler reads the variance half of a 2C-channel output.
    fn uses_learned_variance(&self) -> bool {
        false
    }
    /// Classifier guidance as a shift of the ε-prediction, ε' = ε − k · s · ∇ log f(y | x_t):
    /// the factor k at timestep t. The default is the ε form of DDIM (Dhariwal & Nichol 2021,
    /// algorithm 2): k = √(1 − ᾱ_t).
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64> {
        let i = self.schedule().check_timestep(t)?;
        Ok((1.0 - self.schedule().alphas_cumprod[i]).sqrt())
    }
}

/// Per-row coefficients, computed once per distinct run of equal timesteps (batches usually
/// share one t, and a (256, 2) step must not pay 256 times for the same scalars).
pub(crate) fn rows_with_repeats(
    t: &[i64],
    mut f: impl FnMut(i64) -> Result<RowStep>,
) -> Result<Vec<RowStep>> {
    let mut rows: Vec<RowStep> = Vec::with_capacity(t.len());
    for &ti in t {
        match rows.last() {
            Some(last) if last.timestep == ti => {
                let copy = *last;
                rows.push(copy);
            }
            _ => rows.push(f(ti)?),
        }
    }
    Ok(rows)
}

/// Position of every training timestep in a descending list (None if absent).
pub(crate) fn positions(num_train_timesteps: usize, timesteps: &[i64]) -> Vec<Option<usize>> {
    let mut pos = vec![None; num_train_timesteps];
    for (i, &t) in timesteps.iter().enumerate() {
        pos[t as usize] = Some(i);
    }
    pos
}

/// Looks a row's timestep up in the sampler's list.
pub(crate) fn position_of(pos: &[Option<usize>], timesteps: &[i64], t: i64) -> Result<usize> {
    if t >= 0 && (t as usize) < pos.len() {
        if let Some(p) = pos[t as usize] {
            return Ok(p);
        }
    }
    let shown: Vec<String> = if timesteps.len() > 12 {
        let mut v: Vec<String> = timesteps[..6].iter().map(|t| t.to_string()).collect();
        v.push("...".into());
        v.extend(
            timesteps[timesteps.len() - 3..]
                .iter()
                .map(|t| t.to_string()),
        );
        v
    } else {
        timesteps.iter().map(|t| t.to_string()).collect()
    };
    value_error!(
        "timestep {t} is not one of this sampler's {} timesteps [{}] (see .timesteps)",
        timesteps.len(),
        shown.join(", ")
    )
}

/// x0 coefficients as f32 with an open clip: the start of every row's step.
pub(crate) fn base_row(prediction: Prediction, alpha_bar: f64, timestep: i64) -> RowStep {
    let (a, b) = x0_coefficients(prediction, alpha_bar);
    RowStep {
        timestep,
        x0_from_x: a as f32,
        x0_from_model: b as f32,
        clip_min: f32::NEG_INFINITY,
        clip_max: f32::INFINITY,
        clip_scale: 1.0,
        prev_from_x0: 0.0,
        prev_from_x: 0.0,
        prev_from_model: 0.0,
        noise_std: 0.0,
        learned_log_variance: None,
    }
}

/// The number of elements per row of `shape` and whether a model output of `model_shape`
/// carries a variance half (2C channels).
pub fn model_output_layout(x_shape: &[usize], model_shape: &[usize]) -> Result<(usize, usize)> {
    if x_shape.is_empty() {
        shape_error!("x must have a batch dimension, got a 0-d array");
    }
    let batch = x_shape[0];
    let row_len: usize = x_shape[1..].iter().product();
    if model_shape == x_shape {
        return Ok((row_len, row_len));
    }
    let doubled = x_shape.len() >= 2
        && model_shape.len() == x_shape.len()
        && model_shape[0] == batch
        && model_shape[1] == 2 * x_shape[1]
        && model_shape[2..] == x_shape[2..];
    if doubled {
        return Ok((row_len, 2 * row_len));
    }
    shape_error!(
        "model_output has shape {model_shape:?} but x has shape {x_shape:?} (expected the same shape, or twice the channels for a learned-variance output)"
    )
}

/// Arguments of one step over a batch.
pub struct StepArgs<'a> {
    pub model_output: &'a [f32],
    pub model_shape: &'a [usize],
    pub t: &'a [i64],
    /// None: x is read from `out` (in-place update).
    pub x: Option<&'a [f32]>,
    pub x_shape: &'a [usize],
    pub noise: Noise<'a>,
    pub check_finite: bool,
}

/// Resolves the row coefficients of a step, including dynamic thresholds (its own pass).
pub fn prepare_rows<S: Sampler + ?Sized>(
    sampler: &S,
    args: &StepArgs<'_>,
    x_for_threshold: &[f32],
) -> Result<(Vec<RowStep>, usize, usize)> {
    let (row_len, stride) = model_output_layout(args.x_shape, args.model_shape)?;
    let batch = args.x_shape[0];
    if args.t.len() != batch {
        shape_error!(
            "t has {} entries but x has {batch} rows (shape {:?})",
            args.t.len(),
            args.x_shape
        );
    }
    if stride == row_len && sampler.uses_learned_variance() {
        shape_error!(
            "variance='learned_range' needs a model output with twice the channels of x ({:?}), got {:?}",
            args.x_shape,
            args.model_shape
        );
    }
    if let Noise::Given(z) = args.noise {
        if z.len() != batch * row_len {
            shape_error!(
                "noise has {} elements but x has shape {:?}",
                z.len(),
                args.x_shape
            );
        }
    }
    // One timestep for the whole batch (the usual case) and no per-row state: the batch is one
    // long row, so the coefficients are computed once and the pass has no row bookkeeping.
    let per_row_state =
        stride != row_len || matches!(sampler.x0_processing(), X0Processing::Threshold(_));
    if batch > 1 && !per_row_state && args.t.windows(2).all(|w| w[0] == w[1]) {
        let mut rows = sampler.row_steps(&args.t[..1])?;
        if let X0Processing::Clip(r) = sampler.x0_processing() {
            rows[0].clip_min = -r as f32;
            rows[0].clip_max = r as f32;
        }
        let n = batch * row_len;
        return Ok((rows, n, n));
    }
    let mut rows = sampler.row_steps(args.t)?;
    match sampler.x0_processing() {
        X0Processing::None => {}
        X0Processing::Clip(r) => {
            for c in &mut rows {
                c.clip_min = -r as f32;
                c.clip_max = r as f32;
            }
        }
        X0Processing::Threshold(th) => {
            let s = threshold_scales(
                &rows,
                row_len,
                x_for_threshold,
                args.model_output,
                stride,
                th.ratio,
                th.max_value,
            );
            for (c, s) in rows.iter_mut().zip(s) {
                c.clip_min = -s;
                c.clip_max = s;
                c.clip_scale = 1.0 / s;
            }
        }
    }
    Ok((rows, row_len, stride))
}

/// One sampler step: writes x_prev into `out` and, if given, the (clipped) predicted x0.
pub fn step_into<S: Sampler + ?Sized>(
    sampler: &S,
    args: &StepArgs<'_>,
    out: &mut [f32],
    pred_x0: Option<&mut [f32]>,
) -> Result<()> {
    let expected: usize = args.x_shape.iter().product();
    if out.len() != expected {
        shape_error!(
            "out has {} elements but x has shape {:?}",
            out.len(),
            args.x_shape
        );
    }
    if args.model_output.len() != args.model_shape.iter().product::<usize>() {
        shape_error!(
            "model_output data does not match its shape {:?}",
            args.model_shape
        );
    }
    let (rows, row_len, stride) = {
        let xs: &[f32] = match args.x {
            Some(x) => x,
            None => out,
        };
        prepare_rows(sampler, args, xs)?
    };
    let bad = fused_step(
        &rows,
        row_len,
        args.x,
        args.model_output,
        stride,
        args.noise,
        out,
        pred_x0,
    );
    if let (true, Some(i)) = (args.check_finite, bad) {
        return Err(Error::NonFinite {
            timestep: rows[i / row_len.max(1)].timestep,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
