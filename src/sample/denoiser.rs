//! The denoiser boundary and the sampling loops written once against it.

use super::{model_output_layout, step_into, Ddim, Sampler, StepArgs};
use crate::error::Result;
use crate::kernels::{fused_step, Noise};
use crate::shape_error;

/// A model output with its shape (`[B, C, ...]` or `[B, 2C, ...]`).
#[derive(Clone, Debug, Default)]
pub struct ModelOutput {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// A thing that maps (x_t, t) to a model output: a candle network, an analytic oracle, or (in
/// the bindings) a Python callable.
pub trait Denoiser {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput>;
}

/// What a loop's caller can do around each step: the bindings release the GIL during passes,
/// draw progress, call the user's callback and check for Ctrl-C.
pub trait LoopHooks {
    /// Runs one pass over the data.
    fn run_pass(&mut self, pass: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        pass()
    }
    /// Whether `after_step` wants the predicted x0 (costs one more write per step).
    fn wants_pred_x0(&self) -> bool {
        false
    }
    /// Called after step `i` (at timestep `t`) with the new x and, if wanted, the predicted x0.
    fn after_step(&mut self, _i: usize, _t: i64, _x: &[f32], _pred_x0: &[f32]) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl LoopHooks for NoHooks {}

fn check_output(out: &ModelOutput, shape: &[usize]) -> Result<()> {
    model_output_layout(shape, &out.shape)?;
    if out.data.len() != out.shape.iter().product::<usize>() {
        shape_error!(
            "the denoiser returned {} values for shape {:?}",
            out.data.len(),
            out.shape
        );
    }
    Ok(())
}

/// Runs a sampler from x_T over its timesteps; noise from `seed` (stream = timestep).
pub fn sample_loop<S: Sampler + ?Sized>(
    sampler: &S,
    denoiser: &mut dyn Denoiser,
    x_t: Vec<f32>,
    shape: &[usize],
    seed: u64,
    check_finite: bool,
    hooks: &mut dyn LoopHooks,
) -> Result<Vec<f32>> {
    let n = x_t.len();
    if n != shape.iter().product::<usize>() {
        shape_error!("x_T has {n} elements but the shape is {shape:?}");
    }
    let batch = shape.first().copied().unwrap_or(0);
    let mut x = x_t;
    let mut next = vec![0f32; n];
    let mut pred_x0 = if hooks.wants_pred_x0() {
        vec![0f32; n]
    } else {
        Vec::new()
    };
    for (i, &t) in sampler.timesteps().iter().enumerate() {
        let tb = vec![t; batch];
        let out = denoiser.predict(&x, shape, &tb)?;
        check_output(&out, shape)?;
        {
            let args = StepArgs {
                model_output: &out.data,
                model_shape: &out.shape,
                t: &tb,
                x: Some(&x),
                x_shape: shape,
                noise: Noise::Seeded(seed),
                check_finite,
            };
            let (next_ref, px) = (&mut next, &mut pred_x0);
            hooks.run_pass(&mut || {
                let px = if px.is_empty() {
                    None
                } else {
                    Some(px.as_mut_slice())
                };
                step_into(sampler, &args, next_ref, px)
            })?;
        }
        std::mem::swap(&mut x, &mut next);
        hooks.after_step(i, t, &x, &pred_x0)?;
    }
    Ok(x)
}

/// DDIM inversion (η = 0 run forwards in t): maps clean data to the x at the sampler's first
/// timestep such that sampling returns (approximately) the data. Each step evaluates the model
/// at the current level (OpenAI's `ddim_reverse_sample`); the first at the smallest timestep.
pub fn invert_loop(
    sampler: &Ddim,
    denoiser: &mut dyn Denoiser,
    x0: Vec<f32>,
    shape: &[usize],
    check_finite: bool,
    hooks: &mut dyn LoopHooks,
) -> Result<Vec<f32>> {
    let n = x0.len();
    if n != shape.iter().product::<usize>() {
        shape_error!("x0 has {n} elements but the shape is {shape:?}");
    }
    let batch = shape.first().copied().unwrap_or(0);
    let row_len = n.checked_div(batch).unwrap_or(0);
    let ascending: Vec<i64> = sampler.timesteps().iter().rev().copied().collect();
    let mut x = x0;
    let mut next = vec![0f32; n];
    let mut alpha_bar_current = sampler.final_alpha_bar();
    for (i, &target) in ascending.iter().enumerate() {
        let eval = if i == 0 { target } else { ascending[i - 1] };
        let tb = vec![eval; batch];
        let out = denoiser.predict(&x, shape, &tb)?;
        check_output(&out, shape)?;
        let (_, stride) = model_output_layout(shape, &out.shape)?;
        let rows = sampler.inversion_rows(batch, alpha_bar_current, eval, target);
        let mut bad = None;
        {
            let (xr, nr, data, bad_ref) = (&x, &mut next, &out.data, &mut bad);
            hooks.run_pass(&mut || {
                *bad_ref = fused_step(
                    &rows,
                    row_len,
                    Some(xr),
                    data,
                    stride,
                    Noise::Seeded(0),
                    nr,
                    None,
                );
                Ok(())
            })?;
        }
        if check_finite && bad.is_some() {
            return Err(crate::error::Error::NonFinite { timestep: target });
        }
        std::mem::swap(&mut x, &mut next);
        alpha_bar_current = sampler.schedule.alphas_cumprod[target as usize];
        hooks.after_step(i, target, &x, &[])?;
    }
    Ok(x)
}
