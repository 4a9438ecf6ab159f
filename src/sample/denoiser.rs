//! The denoiser boundary and the sampling loops written once against it.

use super::{model_output_layout, Ddim, Sampler};
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

    /// The output at real-valued timesteps (σ-space samplers interpolate t between trained
    /// timesteps). The default serves integral t through [`Denoiser::predict`] and refuses
    /// fractional ones.
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        let ti = integral_timesteps(t)?;
        self.predict(x, shape, &ti)
    }
}

/// `t` as integers, or an error naming the first fractional one.
pub fn integral_timesteps(t: &[f64]) -> Result<Vec<i64>> {
    t.iter()
        .map(|&v| {
            if v.fract() == 0.0 && v.is_finite() {
                Ok(v as i64)
            } else {
                crate::value_error!(
                    "this denoiser takes integer timesteps but the sampler asks for t = {v}: use timestep_mode='nearest'"
                )
            }
        })
        .collect()
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
    /// Called after grid step `i` of a σ-space sampler, which brought x to level `sigma`.
    fn after_sigma_step(
        &mut self,
        _i: usize,
        _sigma: f64,
        _x: &[f32],
        _pred_x0: &[f32],
    ) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl LoopHooks for NoHooks {}

/// Editing a given image: SDEdit / img2img starts part-way (`start`), inpainting keeps a known
/// region (`known`, `mask` with 1 = keep, same layout as x) at the current noise level.
#[derive(Clone, Copy, Default)]
pub struct Edit<'a> {
    /// Position in the sampler's timesteps of the first step (x holds the image noised to it).
    pub start: usize,
    pub inpaint: Option<(&'a [f32], &'a [f32])>,
}

/// The first step of an SDEdit run with `strength` in (0, 1] (diffusers' img2img rule: the last
/// ⌊strength · S⌋ of the S steps run).
pub fn edit_start(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        crate::value_error!("strength must be in (0, 1], got {strength}");
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        crate::value_error!(
            "strength {strength} leaves no step of the {steps} to run: raise strength or steps"
        );
    }
    Ok(steps - run)
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
    sample_loop_edit(
        sampler,
        denoiser,
        x_t,
        shape,
        seed,
        check_finite,
        hooks,
        Edit::default(),
    )
}

/// [`sample_loop`] starting at step `edit.start` and keeping an inpainting's known region:
/// the one loop of [`super::engine::run`].
#[allow(clippy::too_many_arguments)]
pub fn sample_loop_edit<S: Sampler + ?Sized>(
    sampler: &S,
    denoiser: &mut dyn Denoiser,
    x_t: Vec<f32>,
    shape: &[usize],
    seed: u64,
    check_finite: bool,
    hooks: &mut dyn LoopHooks,
    edit: Edit<'_>,
) -> Result<Vec<f32>> {
    super::engine::run(
        sampler,
        denoiser,
        x_t,
        shape,
        seed,
        check_finite,
        hooks,
        edit,
    )
}

/// The starting x of an SDEdit run: `image` forward-noised to the sampler's timestep at
/// position `start` with the initial-noise stream of `seed` (as `randn(shape, seed)`).
pub fn noised_start<S: Sampler + ?Sized>(
    sampler: &S,
    image: &[f32],
    start: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    super::engine::noised_start(sampler, image, start, seed)
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
        super::engine::check_output(&out, shape)?;
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
