//! Solvers in σ space (Karras et al. 2022; Lu et al. 2022): x_σ = x0 + σ z is carried from
//! σ_0 down the grid by Euler, Euler ancestral, Heun and multistep DPM-Solver++ updates.
//!
//! Every solver is written as the scalar coefficients of one fused pass,
//!   D = a x + b F (clamped when clip_sample is set),
//!   x' = c_x x + c_D D + Σ_j c_j buf_j + s z,
//! over the model output F of one evaluation, optionally storing x and D into the solver's
//! state buffers (Heun's first stage, DPM-Solver's history). `evaluations()` lists the model
//! calls of a run in order, so a hand-written loop, [`SigmaSampler::step`] and
//! [`SigmaSampler::sample`] perform the same arithmetic.
//!
//! Noise: evaluation k draws from stream [`SIGMA_NOISE_STREAM`] + k of the counter-based
//! generator (the element index is the counter), so a run is a pure function of its seed and
//! identical for any thread count.

mod adaptive;
mod dpm_solver;
mod euler;
mod heun;
pub mod likelihood;

pub use adaptive::{sample_adaptive, AdaptiveConfig, AdaptiveInfo};
pub use dpm_solver::{DpmAlgorithm, DpmSolverConfig, SolverType};

use super::denoiser::{Edit, LoopHooks};
use super::engine;
use super::{model_output_layout, Denoiser};
use crate::diffusion::Prediction;
use crate::error::{Error, Result};
use crate::kernels::rng::fill_normal;
use crate::kernels::{for_each_chunk, for_each_row_piece, Noise};
use crate::sample::sigma::{Parameterization, SigmaGrid};
use crate::{shape_error, value_error};

/// First stream of the σ solvers' noise: evaluation k uses stream `SIGMA_NOISE_STREAM + k`.
pub const SIGMA_NOISE_STREAM: u64 = 1 << 40;
/// Stream of the noise that takes an inpainting's known region to the level of evaluation k.
const SIGMA_INPAINT_STREAM: u64 = 1 << 41;

/// Karras et al. 2022, Algorithm 2: before a step at σ_i within [s_tmin, s_tmax], raise the
/// level to σ̂ = σ_i (1 + γ), γ = min(s_churn/N, √2 − 1), with fresh noise of std s_noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    pub s_churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
}

impl Churn {
    pub const NONE: Churn = Churn {
        s_churn: 0.0,
        s_tmin: 0.0,
        s_tmax: f64::INFINITY,
        s_noise: 1.0,
    };

    pub fn new(s_churn: f64, s_tmin: f64, s_tmax: f64, s_noise: f64) -> Result<Self> {
        if !(s_churn.is_finite() && s_churn >= 0.0) {
            value_error!("s_churn must be finite and >= 0, got {s_churn}");
        }
        if !(s_tmin >= 0.0 && s_tmax >= s_tmin) || s_tmin.is_nan() || s_tmax.is_nan() {
            value_error!(
                "s_tmin and s_tmax must satisfy 0 <= s_tmin <= s_tmax, got {s_tmin} and {s_tmax}"
            );
        }
        if !(s_noise.is_finite() && s_noise >= 0.0) {
            value_error!("s_noise must be finite and >= 0, got {s_noise}");
        }
        Ok(Churn {
            s_churn,
            s_tmin,
            s_tmax,
            s_noise,
        })
    }

    /// γ of a step at σ in a run of `steps` steps.
    fn gamma(&self, sigma: f64, steps: usize) -> f64 {
        if self.s_churn > 0.0 && self.s_tmin <= sigma && sigma <= self.s_tmax {
            (self.s_churn / steps as f64).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        }
    }
}

/// The update rule of a σ sampler.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without the
    /// correction), with optional churn.
    Euler { churn: Churn },
    /// Euler to σ_down plus fresh noise σ_up (k-diffusion's `sample_euler_ancestral`).
    EulerAncestral { eta: f64, s_noise: f64 },
    /// Heun's second-order method (Karras et al. 2022, Algorithm 2), Euler where σ_next = 0.
    Heun { churn: Churn },
    /// Multistep DPM-Solver++ (Lu et al. 2022), ODE or SDE.
    DpmSolver(DpmSolverConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Euler { .. } => "Euler",
            Method::EulerAncestral { .. } => "EulerAncestral",
            Method::Heun { .. } => "Heun",
            Method::DpmSolver(_) => "DPMSolver",
        }
    }
}

/// One model call of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// The level the model is evaluated at (before churn).
    pub sigma: f64,
    /// The timestep handed to the model there.
    pub timestep: f64,
    /// The grid step this call belongs to.
    pub step: usize,
    /// 0 for a step's first call, 1 for Heun's correction.
    pub stage: u8,
}

/// The coefficients of one fused update (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub from_x: f64,
    pub from_denoised: f64,
    pub from_buffers: [f64; 3],
    pub noise_std: f64,
    pub store_x: Option<usize>,
    pub store_denoised: Option<usize>,
    /// The level the result sits at.
    pub sigma_next: f64,
}

impl Plan {
    /// x' = c_x x + c_D D and nothing else.
    fn simple(from_x: f64, from_denoised: f64, sigma_next: f64) -> Self {
        Plan {
            from_x,
            from_denoised,
            from_buffers: [0.0; 3],
            noise_std: 0.0,
            store_x: None,
            store_denoised: None,
            sigma_next,
        }
    }
}

/// What a run carries between evaluations: Heun's first stage, DPM-Solver's history.
#[derive(Clone, Debug, Default)]
pub struct SolverState {
    /// The evaluation expected next.
    pub next: usize,
    /// Updates applied since the run began (DPM-Solver's `lower_order_nums`).
    pub done: usize,
    /// σ̂ of the last evaluation (Heun's correction needs its first stage's churned level).
    pub last_sigma_hat: f64,
    buffers: Vec<Vec<f32>>,
}

/// A σ-space sampler: a grid, an update rule and the optional clamp of D.
#[derive(Clone, Debug)]
pub struct SigmaSampler {
    pub grid: SigmaGrid,
    pub method: Method,
    /// Clamp D to [-r, r] (diffusers' `clip_sample` / `clip_sample_range`).
    pub clip_sample: Option<f64>,
    evaluations: Vec<Evaluation>,
}

impl SolverState {
    /// A fresh state for a run starting at evaluation `start`.
    pub fn at(start: usize) -> Self {
        SolverState {
            next: start,
            ..Default::default()
        }
    }
}

impl SigmaSampler {
    pub fn new(grid: SigmaGrid, method: Method, clip_sample: Option<f64>) -> Result<Self> {
        if let Some(r) = clip_sample {
            if !(r.is_finite() && r > 0.0) {
                value_error!("clip_sample must be a positive finite range, got {r}");
            }
        }
        match &method {
            Method::EulerAncestral { eta, s_noise } => {
                if !(eta.is_finite() && *eta >= 0.0) {
                    value_error!("eta must be finite and >= 0, got {eta}");
                }
                if !(s_noise.is_finite() && *s_noise >= 0.0) {
                    value_error!("s_noise must be finite and >= 0, got {s_noise}");
                }
            }
            Method::DpmSolver(c) => c.check()?,
            Method::Euler { .. } | Method::Heun { .. } => {}
        }
        let evaluations = match &method {
            Method::Heun { .. } => heun::evaluations(&grid),
            _ => (0..grid.steps())
                .map(|i| Evaluation {
                    sigma: grid.sigmas[i],
                    timestep: grid.timesteps[i],
                    step: i,
                    stage: 0,
                })
                .collect(),
        };
        Ok(SigmaSampler {
            grid,
            method,
            clip_sample,
            evaluations,
        })
    }

    /// The model calls of a run, in order.
    pub fn evaluations(&self) -> &[Evaluation] {
        &self.evaluations
    }

    pub fn steps(&self) -> usize {
        self.grid.steps()
    }

    /// The initial noise scale: x_{σ_0} = σ_0 z (k-diffusion; diffusers' Euler uses
    /// √(σ_0² + 1) for some spacings, see docs/differences.md).
    pub fn init_noise_sigma(&self) -> f64 {
        self.grid.sigmas[0]
    }

    /// The index of the first evaluation of grid step `step`.
    pub fn first_evaluation_of(&self, step: usize) -> Result<usize> {
        self.evaluations
            .iter()
            .position(|e| e.step == step && e.stage == 0)
            .ok_or_else(|| {
                Error::Value(format!(
                    "step {step} is past the sampler's {} steps",
                    self.steps()
                ))
            })
    }

    /// A fresh state for a run starting at evaluation `start`.
    pub fn new_state(&self, start: usize) -> SolverState {
        SolverState::at(start)
    }

    /// c_in(σ): the factor applied to x before the model sees it.
    pub fn model_input_scale(&self, sigma: f64) -> f64 {
        self.grid.parameterization.c_in(sigma)
    }

    fn buffers_needed(&self) -> usize {
        match &self.method {
            Method::Heun { .. } => 2,
            Method::DpmSolver(c) if c.order > 1 => c.order as usize,
            _ => 0,
        }
    }

    /// The churned level σ̂ of evaluation k, and the std of the noise that raises x to it.
    pub fn churn(&self, k: usize) -> (f64, f64) {
        let e = self.evaluations[k];
        let churn = match &self.method {
            Method::Euler { churn } => churn,
            Method::Heun { churn } if e.stage == 0 => churn,
            _ => return (e.sigma, 0.0),
        };
        let gamma = churn.gamma(e.sigma, self.steps());
        if gamma == 0.0 {
            return (e.sigma, 0.0);
        }
        let hat = e.sigma * (1.0 + gamma);
        (hat, churn.s_noise * (hat * hat - e.sigma * e.sigma).sqrt())
    }

    /// The coefficients of evaluation k's update from level σ̂.
    fn plan(&self, k: usize, sigma_hat: f64, state: &SolverState) -> Result<Plan> {
        let e = self.evaluations[k];
        let s = &self.grid.sigmas;
        match &self.method {
            Method::Euler { .. } => Ok(euler::euler(sigma_hat, s[e.step + 1])),
            Method::EulerAncestral { eta, s_noise } => {
                Ok(euler::ancestral(sigma_hat, s[e.step + 1], *eta, *s_noise))
            }
            Method::Heun { .. } => Ok(heun::plan(e, sigma_hat, state, s)),
            Method::DpmSolver(c) => dpm_solver::plan(c, e.step, state, s, self.steps()),
        }
    }

    /// Prepares `state` for evaluation k: checks the order and sizes the buffers.
    fn enter(&self, k: usize, state: &mut SolverState, n: usize) -> Result<()> {
        if k >= self.evaluations.len() {
            value_error!(
                "evaluation {k} is past the sampler's {} evaluations (see .timesteps)",
                self.evaluations.len()
            );
        }
        let needs_history = self.buffers_needed() > 0;
        if needs_history && k != state.next {
            value_error!(
                "{} is a multistep / two-stage method: step {k} needs the state of step {} (pass the state= returned with it, or a new state at step 0)",
                self.method.name(),
                k.saturating_sub(1)
            );
        }
        if state.buffers.len() != self.buffers_needed()
            || state.buffers.iter().any(|b| b.len() != n)
        {
            if needs_history && state.done > 0 {
                shape_error!("the state was made for another x shape");
            }
            state.buffers = vec![vec![0f32; n]; self.buffers_needed()];
        }
        Ok(())
    }

    /// One update from the model output `model_output` of evaluation k (taken at level σ̂,
    /// where x already sits). Writes x' into `out` and, if given, D into `pred_x0`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        k: usize,
        sigma_hat: f64,
        x: &[f32],
        shape: &[usize],
        model_output: &[f32],
        model_shape: &[usize],
        state: &mut SolverState,
        noise: Noise<'_>,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()> {
        let (row_len, stride) = model_output_layout(shape, model_shape)?;
        if model_output.len() != model_shape.iter().product::<usize>() {
            shape_error!("model_output data does not match its shape {model_shape:?}");
        }
        self.enter(k, state, x.len())?;
        let plan = self.plan(k, sigma_hat, state)?;
        let d = self.grid.parameterization.denoised_coefficients(sigma_hat);
        let bad = fused_update(
            &plan,
            d,
            self.clip_sample,
            x,
            model_output,
            row_len,
            stride,
            &mut state.buffers,
            noise,
            SIGMA_NOISE_STREAM + k as u64,
            out,
            pred_x0,
        );
        state.next = k + 1;
        state.done += 1;
        state.last_sigma_hat = sigma_hat;
        if check_finite && bad.is_some() {
            return Err(Error::NonFiniteSigma {
                step: self.evaluations[k].step,
                sigma: sigma_hat,
            });
        }
        Ok(())
    }

    /// diffusers' `scheduler.step`: the update of evaluation k from a model output computed on
    /// x at the evaluation's level. With churn, x is raised to σ̂ first with `noise` and the
    /// model output is read at σ̂, as diffusers' Euler scheduler does.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        k: usize,
        x: &[f32],
        shape: &[usize],
        model_output: &[f32],
        model_shape: &[usize],
        state: &mut SolverState,
        noise: Noise<'_>,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()> {
        let n: usize = shape.iter().product();
        if x.len() != n || out.len() != n {
            shape_error!("x and out must have {n} elements for shape {shape:?}");
        }
        if let Noise::Given(z) = noise {
            if z.len() != n {
                shape_error!("noise has {} elements but x has shape {shape:?}", z.len());
            }
        }
        if k >= self.evaluations.len() {
            value_error!(
                "step index {k} is past the sampler's {} evaluations (see .timesteps)",
                self.evaluations.len()
            );
        }
        let (sigma_hat, churn_std) = self.churn(k);
        let raised;
        let x = if churn_std > 0.0 {
            let mut r = x.to_vec();
            add_noise(&mut r, churn_std, noise, SIGMA_NOISE_STREAM + k as u64);
            raised = r;
            &raised
        } else {
            x
        };
        self.update(
            k,
            sigma_hat,
            x,
            shape,
            model_output,
            model_shape,
            state,
            noise,
            check_finite,
            out,
            pred_x0,
        )
    }

    /// Runs the sampler from x at its first level (σ_0 z for a fresh run) with a denoiser;
    /// noise from `seed`. `edit.start` starts at that grid step (x holds the image noised to
    /// it); `edit.inpaint` keeps the known region at each level reached.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        denoiser: &mut dyn Denoiser,
        x: Vec<f32>,
        shape: &[usize],
        seed: u64,
        check_finite: bool,
        hooks: &mut dyn LoopHooks,
        edit: Edit<'_>,
    ) -> Result<Vec<f32>> {
        engine::run(self, denoiser, x, shape, seed, check_finite, hooks, edit)
    }

    /// The starting x of an SDEdit run at grid step `start`: image + σ_start z, z from the
    /// initial-noise stream of `seed` (as `randn(shape, seed)`).
    pub fn noised_start(&self, image: &[f32], start: usize, seed: u64) -> Result<Vec<f32>> {
        engine::noised_start(self, image, start, seed)
    }

    /// The prediction type of a discrete model (classifier guidance shifts ε).
    pub fn prediction(&self) -> Option<Prediction> {
        match self.grid.parameterization {
            Parameterization::Discrete(p) => Some(p),
            _ => None,
        }
    }
}

/// x ← x + std · z.
fn add_noise(x: &mut [f32], std: f64, noise: Noise<'_>, stream: u64) {
    let s = std as f32;
    for_each_chunk(x, |start, chunk| match noise {
        Noise::Given(z) => {
            let len = chunk.len();
            for (v, &zj) in chunk.iter_mut().zip(&z[start..start + len]) {
                *v += s * zj;
            }
        }
        Noise::Seeded(seed) => {
            let mut z = [0f32; NOISE_BLOCK];
            for (b, piece) in chunk.chunks_mut(NOISE_BLOCK).enumerate() {
                let zb = &mut z[..piece.len()];
                fill_normal(seed, stream, (start + b * NOISE_BLOCK) as u64, zb);
                for (v, &zj) in piece.iter_mut().zip(zb.iter()) {
                    *v += s * zj;
                }
            }
        }
    });
}

const NOISE_BLOCK: usize = 1024;

/// A buffer written by disjoint chunks of a parallel pass.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);
// SAFETY: each chunk of the pass writes only its own index range of the buffer.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(s: &mut [f32]) -> Self {
        SharedOut(s.as_mut_ptr(), s.len())
    }
    /// # Safety
    /// Ranges handed out concurrently must not overlap.
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// The pass of a [`Plan`]; returns the index of the first non-finite result, if any.
#[allow(clippy::too_many_arguments)]
fn fused_update(
    plan: &Plan,
    (da, db): (f64, f64),
    clip: Option<f64>,
    x: &[f32],
    model: &[f32],
    row_len: usize,
    stride: usize,
    buffers: &mut [Vec<f32>],
    noise: Noise<'_>,
    stream: u64,
    out: &mut [f32],
    pred_x0: Option<&mut [f32]>,
) -> Option<usize> {
    let (da, db) = (da as f32, db as f32);
    let (lo, hi) = match clip {
        Some(r) => (-r as f32, r as f32),
        None => (f32::NEG_INFINITY, f32::INFINITY),
    };
    let (cx, cd, ns) = (
        plan.from_x as f32,
        plan.from_denoised as f32,
        plan.noise_std as f32,
    );
    // Reads and stores are distinct slots; a slot is read only when its coefficient is not 0.
    let mut reads: Vec<(f32, &[f32])> = Vec::new();
    let mut store_x = None;
    let mut store_d = None;
    for (slot, buf) in buffers.iter_mut().enumerate() {
        if plan.store_x == Some(slot) {
            store_x = Some(SharedOut::new(buf));
        } else if plan.store_denoised == Some(slot) {
            store_d = Some(SharedOut::new(buf));
        } else if plan.from_buffers[slot] != 0.0 {
            reads.push((plan.from_buffers[slot] as f32, buf));
        }
    }
    let pred = pred_x0.map(SharedOut::new);
    let results = for_each_chunk(out, |start, o| {
        let mut first_bad = None;
        let mut z = [0f32; NOISE_BLOCK];
        let mut dbuf = [0f32; NOISE_BLOCK];
        for (b, piece) in o.chunks_mut(NOISE_BLOCK).enumerate() {
            let s0 = start + b * NOISE_BLOCK;
            let len = piece.len();
            let zb = &mut z[..len];
            if ns != 0.0 {
                match noise {
                    Noise::Given(g) => zb.copy_from_slice(&g[s0..s0 + len]),
                    Noise::Seeded(seed) => fill_normal(seed, stream, s0 as u64, zb),
                }
            }
            // SAFETY: [s0, s0 + len) belongs to this chunk alone.
            let (sx, sd, px) = unsafe {
                (
                    store_x.map(|s| s.range(s0, len)),
                    store_d.map(|s| s.range(s0, len)),
                    pred.map(|s| s.range(s0, len)),
                )
            };
            // D over the block (model rows may be strided: a learned-variance output), then
            // x' term by term, each a plain loop over the block; the order of the additions is
            // the formula's, so results do not depend on how the work is split.
            let dblock = &mut dbuf[..len];
            for_each_row_piece(s0, len, row_len, |row, s, e| {
                let m_off = row * stride + (s - row * row_len);
                let m = &model[m_off..m_off + (e - s)];
                let dd = &mut dblock[s - s0..e - s0];
                for ((d, &xv), &mv) in dd.iter_mut().zip(&x[s..e]).zip(m) {
                    *d = (da * xv + db * mv).clamp(lo, hi);
                }
            });
            let xs = &x[s0..s0 + len];
            for ((o, &xv), &d) in piece.iter_mut().zip(xs).zip(dblock.iter()) {
                *o = cx * xv + cd * d;
            }
            for (c, r) in &reads {
                for (o, &rv) in piece.iter_mut().zip(&r[s0..s0 + len]) {
                    *o += c * rv;
                }
            }
            if ns != 0.0 {
                for (o, &zv) in piece.iter_mut().zip(zb.iter()) {
                    *o += ns * zv;
                }
            }
            if let Some(sx) = sx {
                sx.copy_from_slice(xs);
            }
            if let Some(sd) = sd {
                sd.copy_from_slice(dblock);
            }
            if let Some(px) = px {
                px.copy_from_slice(dblock);
            }
            if first_bad.is_none() && piece.iter().fold(false, |bad, v| bad | !v.is_finite()) {
                first_bad = piece.iter().position(|v| !v.is_finite()).map(|p| s0 + p);
            }
        }
        first_bad
    });
    results.into_iter().flatten().next()
}

impl engine::Solver for SigmaSampler {
    fn num_steps(&self) -> usize {
        self.steps()
    }
    fn num_evaluations(&self) -> usize {
        self.evaluations.len()
    }
    fn first_evaluation_of(&self, step: usize) -> Result<usize> {
        SigmaSampler::first_evaluation_of(self, step)
    }
    fn new_state(&self, start: usize) -> SolverState {
        SolverState::at(start)
    }
    fn init_noise_scale(&self) -> f64 {
        self.init_noise_sigma()
    }
    /// x = x0 + σ z.
    fn level_of_step(&self, step: usize) -> Result<(f64, f64)> {
        if step >= self.steps() {
            value_error!("start {step} is past the sampler's {} steps", self.steps());
        }
        Ok((1.0, self.grid.sigmas[step]))
    }
    fn churns(&self, k: usize) -> bool {
        self.churn(k).1 > 0.0
    }
    fn churn(&self, k: usize, x: &mut [f32], seed: u64) {
        let (_, std) = SigmaSampler::churn(self, k);
        add_noise(x, std, Noise::Seeded(seed), SIGMA_NOISE_STREAM + k as u64);
    }
    fn model_time(&self, k: usize) -> (engine::ModelTime, f32) {
        let e = self.evaluations[k];
        let (sigma_hat, _) = SigmaSampler::churn(self, k);
        let t = if sigma_hat == e.sigma {
            e.timestep
        } else {
            self.grid.timestep_of(sigma_hat)
        };
        (
            engine::ModelTime::Continuous(t),
            self.model_input_scale(sigma_hat) as f32,
        )
    }
    fn update(
        &self,
        k: usize,
        x: &[f32],
        shape: &[usize],
        model_output: &super::ModelOutput,
        state: &mut SolverState,
        seed: u64,
        check_finite: bool,
        out: &mut [f32],
        pred_x0: Option<&mut [f32]>,
    ) -> Result<()> {
        let (sigma_hat, _) = SigmaSampler::churn(self, k);
        SigmaSampler::update(
            self,
            k,
            sigma_hat,
            x,
            shape,
            &model_output.data,
            &model_output.shape,
            state,
            Noise::Seeded(seed),
            check_finite,
            out,
            pred_x0,
        )
    }
    fn level_after(&self, k: usize) -> ((f64, f64), u64) {
        let next = self.grid.sigmas[self.evaluations[k].step + 1];
        ((1.0, next), SIGMA_INPAINT_STREAM + k as u64)
    }
    fn report(&self, k: usize) -> Option<engine::StepReport> {
        let e = self.evaluations[k];
        let last_of_step = self
            .evaluations
            .get(k + 1)
            .is_none_or(|next| next.step != e.step);
        last_of_step.then(|| engine::StepReport::Sigma(e.step, self.grid.sigmas[e.step + 1]))
    }
}

#[cfg(test)]
mod tests;
