//! The one sampling loop. Every sampler is a [`Solver`]: a run is a sequence of model
//! evaluations, each followed by one fused update, and the loop around them is written once:
//! model calls (guidance and conditioning live in the denoiser wrappers of `guidance`), the
//! SDEdit start, the inpainting blend, progress / callback / Ctrl-C through [`LoopHooks`] and
//! the GIL release of every pass, `check_finite`.
//!
//! The discrete samplers (DDPM, DDIM) are solvers with one evaluation per timestep and x at the
//! variance-preserving scale; the σ-space ones (`ode`) hold x = x0 + σ z, may call the model
//! more than once per step (Heun) and carry state between steps (DPM-Solver's history).

use super::denoiser::{Edit, LoopHooks};
use super::ode::SolverState;
use super::{model_output_layout, Denoiser, ModelOutput};
use crate::error::Result;
use crate::kernels::for_each_chunk;
use crate::kernels::rng::fill_normal;
use crate::shape_error;

/// The timestep a model is called with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ModelTime {
    /// A trained timestep (discrete samplers).
    Discrete(i64),
    /// A real-valued timestep (σ samplers: interpolated t, EDM's c_noise, or σ itself).
    Continuous(f64),
}

/// What the loop reports after a completed step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepReport {
    /// Step i ended; the discrete samplers report the timestep it started from.
    Timestep(usize, i64),
    /// Step i of a σ sampler ended at level σ.
    Sigma(usize, f64),
}

/// A sampler as the loop sees it.
pub trait Solver: Sync {
    /// Grid steps of a full run (what progress counts and `strength` divides).
    fn num_steps(&self) -> usize;
    /// Model evaluations of a full run.
    fn num_evaluations(&self) -> usize;
    /// The first evaluation of a run that starts at grid step `step` (SDEdit).
    fn first_evaluation_of(&self, step: usize) -> Result<usize>;
    /// A fresh state for a run starting at evaluation `start`.
    fn new_state(&self, start: usize) -> SolverState;
    /// The std of a fresh x at the first step (1 for discrete samplers, σ_0 for σ samplers).
    fn init_noise_scale(&self) -> f64 {
        1.0
    }
    /// x at the level of grid step `step` as x = a · x0 + b · z.
    fn level_of_step(&self, step: usize) -> Result<(f64, f64)>;
    /// Whether evaluation k first moves x (Karras' churn).
    fn churns(&self, _k: usize) -> bool {
        false
    }
    /// The pass that moves x before evaluation k, with noise from `seed`.
    fn churn(&self, _k: usize, _x: &mut [f32], _seed: u64) {}
    /// The model's timestep at evaluation k and the scale c_in of its input.
    fn model_time(&self, k: usize) -> (ModelTime, f32);
    /// The update of evaluation k from the model output on x: x' into `out`, D into `pred_x0`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        k: usize,
        x: &[f32],
        shape: &[usize],
        model_output: &ModelOutput,
        state: &mut SolverState,
        seed: u64,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()>;
    /// After evaluation k: the level x now sits at (x = a · x0 + b · z, for the inpainting
    /// blend) and the noise stream of that blend.
    fn level_after(&self, k: usize) -> ((f64, f64), u64);
    /// Whether evaluation k completes a grid step, and what to report.
    fn report(&self, k: usize) -> Option<StepReport>;
}

pub(crate) fn check_output(out: &ModelOutput, shape: &[usize]) -> Result<()> {
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

/// x ← m (a · known + b z) + (1 − m) x: the known region at the level (a, b) where the mask
/// is 1 (SDEdit's start with a full mask; inpainting's known region).
pub(crate) fn blend_known(
    x: &mut [f32],
    known: &[f32],
    mask: &[f32],
    (a, b): (f64, f64),
    seed: u64,
    stream: u64,
) {
    let (a, b) = (a as f32, b as f32);
    for_each_chunk(x, |start, chunk| {
        let mut z = vec![0f32; chunk.len()];
        fill_normal(seed, stream, start as u64, &mut z);
        for (j, v) in chunk.iter_mut().enumerate() {
            let m = mask[start + j];
            *v = m * (a * known[start + j] + b * z[j]) + (1.0 - m) * *v;
        }
    });
}

/// The starting x of an SDEdit run at grid step `start`: `image` noised to that level with
/// the initial-noise stream of `seed` (as `randn(shape, seed)`).
pub fn noised_start<S: Solver + ?Sized>(
    solver: &S,
    image: &[f32],
    start: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let level = solver.level_of_step(start)?;
    let mut x = vec![0f32; image.len()];
    let ones = vec![1f32; image.len()];
    blend_known(
        &mut x,
        image,
        &ones,
        level,
        seed,
        super::INITIAL_NOISE_STREAM,
    );
    Ok(x)
}

/// Runs a solver from x (at the level of grid step `edit.start`, x_T for a fresh run) with a
/// denoiser; noise from `seed`. `edit.inpaint` keeps the known region at each level reached.
#[allow(clippy::too_many_arguments)]
pub fn run<S: Solver + ?Sized>(
    solver: &S,
    denoiser: &mut dyn Denoiser,
    x: Vec<f32>,
    shape: &[usize],
    seed: u64,
    check_finite: bool,
    hooks: &mut dyn LoopHooks,
    edit: Edit<'_>,
) -> Result<Vec<f32>> {
    let n = x.len();
    if let Some((known, mask)) = edit.inpaint {
        if known.len() != n || mask.len() != n {
            shape_error!(
                "the known image and mask must have x's {n} elements, got {} and {}",
                known.len(),
                mask.len()
            );
        }
    }
    if n != shape.iter().product::<usize>() {
        shape_error!("x_T has {n} elements but the shape is {shape:?}");
    }
    let batch = shape.first().copied().unwrap_or(0);
    let start = solver.first_evaluation_of(edit.start)?;
    let mut state = solver.new_state(start);
    let mut x = x;
    let mut next = vec![0f32; n];
    let mut model_input = Vec::new();
    let mut pred_x0 = vec![0f32; if hooks.wants_pred_x0() { n } else { 0 }];
    for k in start..solver.num_evaluations() {
        if solver.churns(k) {
            let xr = &mut x;
            hooks.run_pass(&mut || {
                solver.churn(k, xr, seed);
                Ok(())
            })?;
        }
        let (time, c_in) = solver.model_time(k);
        let input: &[f32] = if c_in == 1.0 {
            &x
        } else {
            model_input.resize(n, 0.0);
            let (xr, mi) = (&x, &mut model_input);
            hooks.run_pass(&mut || {
                for_each_chunk(mi, |s, chunk| {
                    let len = chunk.len();
                    for (o, &v) in chunk.iter_mut().zip(&xr[s..s + len]) {
                        *o = c_in * v;
                    }
                });
                Ok(())
            })?;
            &model_input
        };
        let out = match time {
            ModelTime::Discrete(t) => denoiser.predict(input, shape, &vec![t; batch])?,
            ModelTime::Continuous(t) => {
                denoiser.predict_continuous(input, shape, &vec![t; batch])?
            }
        };
        check_output(&out, shape)?;
        {
            let (xr, nr, st, px) = (&x, &mut next, &mut state, &mut pred_x0);
            hooks.run_pass(&mut || {
                let px = if px.is_empty() {
                    None
                } else {
                    Some(px.as_mut_slice())
                };
                solver.update(k, xr, shape, &out, st, seed, check_finite, nr, px)
            })?;
        }
        std::mem::swap(&mut x, &mut next);
        if let Some((known, mask)) = edit.inpaint {
            let (level, stream) = solver.level_after(k);
            let xr = &mut x;
            hooks.run_pass(&mut || {
                blend_known(xr, known, mask, level, seed, stream);
                Ok(())
            })?;
        }
        match solver.report(k) {
            Some(StepReport::Timestep(i, t)) => hooks.after_step(i, t, &x, &pred_x0)?,
            Some(StepReport::Sigma(i, sigma)) => hooks.after_sigma_step(i, sigma, &x, &pred_x0)?,
            None => {}
        }
    }
    Ok(x)
}

/// Every discrete sampler (DDPM, DDIM) is a solver: one evaluation per timestep of its list,
/// x at the variance-preserving scale, noise from the stream of the row's timestep.
impl<S: super::Sampler + ?Sized> Solver for S {
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
    fn num_evaluations(&self) -> usize {
        self.timesteps().len()
    }
    fn first_evaluation_of(&self, step: usize) -> Result<usize> {
        if step >= self.timesteps().len() {
            crate::value_error!("start {step} is past the sampler's steps");
        }
        Ok(step)
    }
    fn new_state(&self, start: usize) -> SolverState {
        SolverState::at(start)
    }
    fn level_of_step(&self, step: usize) -> Result<(f64, f64)> {
        let t = *self.timesteps().get(step).ok_or_else(|| {
            crate::Error::Value(format!("start {step} is past the sampler's steps"))
        })?;
        Ok(vp_level(self.schedule().alphas_cumprod[t as usize]))
    }
    fn model_time(&self, k: usize) -> (ModelTime, f32) {
        (ModelTime::Discrete(self.timesteps()[k]), 1.0)
    }
    fn update(
        &self,
        k: usize,
        x: &[f32],
        shape: &[usize],
        model_output: &ModelOutput,
        _state: &mut SolverState,
        seed: u64,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()> {
        let t = vec![self.timesteps()[k]; shape.first().copied().unwrap_or(0)];
        let args = super::StepArgs {
            model_output: &model_output.data,
            model_shape: &model_output.shape,
            t: &t,
            x: Some(x),
            x_shape: shape,
            noise: crate::kernels::Noise::Seeded(seed),
            check_finite,
        };
        super::step_into(self, &args, out, pred_x0)
    }
    fn level_after(&self, k: usize) -> ((f64, f64), u64) {
        let alpha_bar = match self.timesteps().get(k + 1) {
            Some(&t) => self.schedule().alphas_cumprod[t as usize],
            None => 1.0,
        };
        (vp_level(alpha_bar), INPAINT_STREAM + k as u64)
    }
    fn report(&self, k: usize) -> Option<StepReport> {
        Some(StepReport::Timestep(k, self.timesteps()[k]))
    }
}

/// Stream of the noise that takes the known region of an inpainting to the level of step `i`.
const INPAINT_STREAM: u64 = 1 << 48;

/// x_t = √ᾱ x0 + √(1 − ᾱ) z.
fn vp_level(alpha_bar: f64) -> (f64, f64) {
    (alpha_bar.sqrt(), (1.0 - alpha_bar).max(0.0).sqrt())
}
