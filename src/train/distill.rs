//! Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student that takes N DDIM
//! steps learns to match two DDIM steps of its teacher, so each round halves the steps.
//!
//! Time runs on the teacher's discrete schedule. Level i of an N-step student (i = 1..N) sits
//! at the real timestep t_i = i (t_top + 1)/N − 1 (the "trailing" DDIM grid), level 0 is clean
//! data; σ at a fractional timestep is linear in log σ between trained timesteps, so the σ
//! samplers' `timestep_mode="interpolate"` call the model at exactly t_i. The top level t_top is
//! where σ reaches `sigma_max` (80 by default, as the σ samplers cap it; the last timestep of
//! the cosine schedule has σ ≈ 2·10⁴, where an ε-prediction teacher's x̂ carries its error
//! times σ and a DDIM step from there ruins the sample). The teacher steps
//! t_i → t_{i−1/2} → t_{i−1} (its own 2N-step grid), the target is
//! x̃ = (z'' − (σ''/σ) z_t) / (α'' − (σ''/σ) α_t), and the student's x̂(z_t) is fitted to x̃ with
//! the truncated-SNR weight max(SNR, 1) on the x0 error.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::objective::{Batch, Objective, ObjectiveState};
use super::teacher::Teacher;
use crate::diffusion::{x0_coefficients, Prediction};
use crate::error::Result;
use crate::loss::tensors::mean_flat;
use crate::loss::tensors::per_row;
use crate::nn::params::uniforms;
use crate::nn::{Ctx, Model};
use crate::sample::sigma::schedule_sigmas;
use crate::schedule::Schedule;
use crate::value_error;

/// Generator streams of the levels and guidance scales drawn for each row.
const LEVEL_STREAM: u64 = (1 << 62) + (1 << 59);
const GUIDANCE_STREAM: u64 = (1 << 62) + (1 << 59) + (1 << 57);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProgressiveConfig {
    /// N: the steps the student learns to take (the teacher takes 2N).
    pub student_steps: usize,
    /// What the teacher predicts: "epsilon", "x0" or "v".
    pub teacher_prediction: String,
    /// Classifier-free guidance of the teacher distilled into the student (None: none).
    pub guidance: Option<f64>,
    /// The σ of the top level (capped at the schedule's; None: the schedule's last timestep).
    pub sigma_max: Option<f64>,
    /// Guidance scales w drawn uniformly per row from [lo, hi], the teacher guided by w and the
    /// student (built with `guidance_embed`) given w as an input (Meng et al. 2023).
    pub guidance_range: Option<(f64, f64)>,
}

impl Default for ProgressiveConfig {
    fn default() -> Self {
        ProgressiveConfig {
            student_steps: 32,
            teacher_prediction: "epsilon".into(),
            guidance: None,
            sigma_max: Some(crate::sample::sigma::EDM_SIGMA_MAX),
            guidance_range: None,
        }
    }
}

impl ProgressiveConfig {
    pub fn validate(&self, schedule: &Schedule) -> Result<()> {
        check_steps(schedule, self.student_steps, self.sigma_max)?;
        Prediction::parse(&self.teacher_prediction)?;
        if let Some((lo, hi)) = self.guidance_range {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                value_error!("guidance_range must be finite with lo <= hi, got ({lo}, {hi})");
            }
            if self.guidance.is_some() {
                value_error!(
                    "give guidance (one scale) or guidance_range (a range of scales), not both"
                );
            }
        }
        Ok(())
    }
}

/// The real timestep of the top level: where σ reaches `sigma_max` (the last timestep when
/// None or when the schedule ends below it).
pub fn top_timestep(schedule: &Schedule, sigma_max: Option<f64>) -> Result<f64> {
    let ls: Vec<f64> = schedule_sigmas(schedule).iter().map(|s| s.ln()).collect();
    let last = (ls.len() - 1) as f64;
    match sigma_max {
        None => Ok(last),
        Some(s) if s.is_finite() && s > 0.0 => {
            Ok(crate::sample::sigma::sigma_to_t(s, &ls).min(last))
        }
        Some(s) => value_error!("sigma_max must be positive (or None), got {s}"),
    }
}

fn check_steps(schedule: &Schedule, steps: usize, sigma_max: Option<f64>) -> Result<f64> {
    let top = top_timestep(schedule, sigma_max)?;
    let most = ((top + 1.0) / 2.0).floor() as usize;
    if steps == 0 || steps > most {
        value_error!(
            "steps must be in [1, {most}] (the teacher's half steps must fall on the schedule below \
             the top level t = {top:.2}), got {steps}"
        );
    }
    Ok(top)
}

/// The real timestep of level `i` (i in (0, N]) of an N-step grid whose top level is `top`.
pub fn level_timestep(top: f64, steps: usize, i: f64) -> f64 {
    i * (top + 1.0) / steps as f64 - 1.0
}

/// σ at a real timestep t in [0, T−1], linear in log σ between trained timesteps (the inverse
/// of `sample::sigma::sigma_to_t`).
pub fn sigma_at_timestep(log_sigmas: &[f64], t: f64) -> f64 {
    let last = log_sigmas.len() - 1;
    let t = t.clamp(0.0, last as f64);
    let i = (t.floor() as usize).min(last.saturating_sub(1));
    let w = t - i as f64;
    let hi = log_sigmas[(i + 1).min(last)];
    (log_sigmas[i] + w * (hi - log_sigmas[i])).exp()
}

/// The N + 1 σ levels of an N-step distilled student, from σ(t_N) down to 0: pass them to a σ
/// sampler (`Euler(schedule, sigmas=...)`, which is DDIM in σ space) to sample the student.
pub fn student_sigmas(
    schedule: &Schedule,
    steps: usize,
    sigma_max: Option<f64>,
) -> Result<Vec<f64>> {
    let top = check_steps(schedule, steps, sigma_max)?;
    let ls: Vec<f64> = schedule_sigmas(schedule).iter().map(|s| s.ln()).collect();
    let mut s: Vec<f64> = (1..=steps)
        .rev()
        .map(|i| sigma_at_timestep(&ls, level_timestep(top, steps, i as f64)))
        .collect();
    s.push(0.0);
    Ok(s)
}

/// (α, σ) of the variance-preserving process at the σ-space level σ (α = 1/√(1+σ²)).
fn vp(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (1.0 + sigma * sigma).sqrt();
    (a, sigma * a)
}

/// The distillation target x̃ of one row (Salimans & Ho 2022, Algorithm 2):
/// x̃ = (z'' − (σ''/σ) z_t) / (α'' − (σ''/σ) α_t), all at the variance-preserving scale.
pub fn distillation_target(
    z_t: &[f32],
    (alpha, sigma): (f64, f64),
    z_pp: &[f32],
    (alpha_pp, sigma_pp): (f64, f64),
) -> Vec<f32> {
    let r = sigma_pp / sigma;
    let den = alpha_pp - r * alpha;
    z_t.iter()
        .zip(z_pp)
        .map(|(&z, &zpp)| ((zpp as f64 - r * z as f64) / den) as f32)
        .collect()
}

/// One DDIM step (η = 0) of row data z at (α, σ) to (α', σ') given the prediction x̂:
/// z' = α' x̂ + (σ'/σ)(z − α x̂).
pub fn ddim_step(z: &[f32], x0: &[f32], (a, s): (f64, f64), (a2, s2): (f64, f64)) -> Vec<f32> {
    let r = s2 / s;
    z.iter()
        .zip(x0)
        .map(|(&zv, &xv)| (a2 * xv as f64 + r * (zv as f64 - a * xv as f64)) as f32)
        .collect()
}

pub struct ProgressiveObjective {
    config: ProgressiveConfig,
    teacher: Teacher,
    student_prediction: Prediction,
    /// Whether the student takes w as an input.
    student_guidance: bool,
    top: f64,
    log_sigmas: Vec<f64>,
}

impl ProgressiveObjective {
    pub fn new(
        config: ProgressiveConfig,
        teacher: Teacher,
        student_prediction: Prediction,
        student_guidance: bool,
        schedule: &Schedule,
    ) -> Result<Self> {
        config.validate(schedule)?;
        let guided = config.guidance.is_some() || config.guidance_range.is_some();
        if config.guidance_range.is_some() && !student_guidance {
            value_error!(
                "guidance_range distils guidance as an input: build the student with guidance_embed=True"
            );
        }
        if student_guidance && !guided {
            value_error!(
                "the student takes the guidance scale as an input (guidance_embed): give guidance or \
                 guidance_range"
            );
        }
        if config.guidance_range.is_some() && teacher.num_classes == 0 {
            value_error!(
                "guidance needs a class-conditional teacher and student (num_classes > 0)"
            );
        }
        let top = top_timestep(schedule, config.sigma_max)?;
        Ok(ProgressiveObjective {
            config,
            teacher,
            student_prediction,
            student_guidance,
            top,
            log_sigmas: schedule_sigmas(schedule).iter().map(|s| s.ln()).collect(),
        })
    }

    pub fn teacher(&self) -> &Teacher {
        &self.teacher
    }

    /// σ of level i (0: clean) of the grid with `steps` steps.
    fn sigma(&self, steps: usize, i: f64) -> f64 {
        if i <= 0.0 {
            0.0
        } else {
            sigma_at_timestep(&self.log_sigmas, level_timestep(self.top, steps, i))
        }
    }
}

impl Objective for ProgressiveObjective {
    fn per_sample_loss(&mut self, model: &Model, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let n = self.config.student_steps;
        let (b, row) = (batch.rows(), batch.per_sample());
        let u = uniforms(batch.seed, LEVEL_STREAM ^ batch.step, b);
        let levels: Vec<usize> = u
            .iter()
            .map(|&v| ((v as f64 * n as f64) as usize).min(n - 1) + 1)
            .collect();
        let eps = batch.noise();
        let mut z_t = Vec::with_capacity(b * row);
        let mut t_student = Vec::with_capacity(b);
        let (mut s_t, mut s_h, mut s_e) = (vec![], vec![], vec![]);
        for (r, &i) in levels.iter().enumerate() {
            let (st, sh, se) = (
                self.sigma(n, i as f64),
                self.sigma(n, i as f64 - 0.5),
                self.sigma(n, i as f64 - 1.0),
            );
            let (a, s) = vp(st);
            let (x, e) = (
                &batch.x0[r * row..(r + 1) * row],
                &eps[r * row..(r + 1) * row],
            );
            z_t.extend(
                x.iter()
                    .zip(e)
                    .map(|(&xv, &ev)| (a * xv as f64 + s * ev as f64) as f32),
            );
            t_student.push(level_timestep(self.top, n, i as f64) as f32);
            s_t.push(st);
            s_h.push(sh);
            s_e.push(se);
        }
        // The guidance scale of each row: fixed, or drawn from the range.
        let scales: Option<Vec<f64>> = match (self.config.guidance, self.config.guidance_range) {
            (Some(w), _) => Some(vec![w; b]),
            (None, Some((lo, hi))) => Some(
                uniforms(batch.seed, GUIDANCE_STREAM ^ batch.step, b)
                    .iter()
                    .map(|&u| lo + u as f64 * (hi - lo))
                    .collect(),
            ),
            (None, None) => None,
        };
        // Two teacher DDIM steps in σ space: D at (z/α, σ) is the teacher's x̂.
        let ve = |z: &[f32], sig: &[f64]| -> Vec<f32> {
            let mut out = Vec::with_capacity(z.len());
            for (r, &s) in sig.iter().enumerate() {
                let inv_a = (1.0 + s * s).sqrt() as f32;
                out.extend(z[r * row..(r + 1) * row].iter().map(|&v| v * inv_a));
            }
            out
        };
        let x1 = self.teacher.denoise_with(
            &ve(&z_t, &s_t),
            batch.shape,
            &s_t,
            batch.labels,
            scales.as_deref(),
        )?;
        let mut z_h = Vec::with_capacity(z_t.len());
        for r in 0..b {
            let sl = r * row..(r + 1) * row;
            z_h.extend(ddim_step(&z_t[sl.clone()], &x1[sl], vp(s_t[r]), vp(s_h[r])));
        }
        let x2 = self.teacher.denoise_with(
            &ve(&z_h, &s_h),
            batch.shape,
            &s_h,
            batch.labels,
            scales.as_deref(),
        )?;
        let mut target = Vec::with_capacity(z_t.len());
        let mut weights = Vec::with_capacity(b);
        for r in 0..b {
            let sl = r * row..(r + 1) * row;
            let z_e = ddim_step(&z_h[sl.clone()], &x2[sl.clone()], vp(s_h[r]), vp(s_e[r]));
            target.extend(distillation_target(&z_t[sl], vp(s_t[r]), &z_e, vp(s_e[r])));
            let (a, s) = vp(s_t[r]);
            weights.push(((a * a) / (s * s)).max(1.0));
        }
        // The student's x̂ from its own parameterisation at ᾱ = α².
        let dev = model.device();
        let zt = Tensor::from_vec(z_t, batch.shape, dev)?;
        let w: Option<Vec<f32>> = match (&scales, self.student_guidance) {
            (Some(s), true) => Some(s.iter().map(|&v| v as f32).collect()),
            _ => None,
        };
        let cond = crate::nn::Cond {
            guidance: w.as_deref(),
            ..batch.cond()
        };
        let out = model.forward_cond(&zt, &t_student, &cond, ctx)?;
        let out = out.narrow(1, 0, batch.shape[1])?;
        let (cx, co): (Vec<f64>, Vec<f64>) = s_t
            .iter()
            .map(|&s| x0_coefficients(self.student_prediction, vp(s).0.powi(2)))
            .unzip();
        let x_hat =
            (zt.broadcast_mul(&per_row(&cx, &zt)?)? + out.broadcast_mul(&per_row(&co, &out)?)?)?;
        let target = Tensor::from_vec(target, batch.shape, dev)?;
        let l = mean_flat(&(x_hat - target)?.sqr()?)?;
        let w: Vec<f32> = weights.iter().map(|&v| v as f32).collect();
        Ok((l * Tensor::from_vec(w, b, dev)?)?)
    }

    fn state(&self) -> Result<ObjectiveState> {
        teacher_state(&self.teacher)
    }

    fn load_state(&mut self, state: ObjectiveState, what: &str) -> Result<()> {
        load_teacher_state(&mut self.teacher, state, what)
    }
}

/// The teacher's weights (a model teacher) as objective state: `teacher.*` tensors and its
/// configuration, so a resumed run needs nothing but the checkpoint.
pub(crate) fn teacher_state(teacher: &Teacher) -> Result<ObjectiveState> {
    let mut state = ObjectiveState::default();
    if let Some(m) = teacher.model() {
        super::checkpoint::add_prefixed(&mut state.tensors, "teacher", m.params().tensors()?);
        state.json = serde_json::json!({ "teacher_model": m.config() });
    }
    Ok(state)
}

pub(crate) fn load_teacher_state(
    teacher: &mut Teacher,
    state: ObjectiveState,
    what: &str,
) -> Result<()> {
    if let Some(m) = teacher.model() {
        let w = super::checkpoint::with_prefix(&state.tensors, "teacher");
        if !w.is_empty() {
            m.params().load(&w, what)?;
        }
    }
    Ok(())
}

/// The teacher model a checkpoint holds, if it holds one.
pub(crate) fn teacher_from_state(state: &ObjectiveState, what: &str) -> Result<Option<Model>> {
    let Some(cfg) = state.json.get("teacher_model") else {
        return Ok(None);
    };
    let config: crate::nn::ModelConfig =
        serde_json::from_value(cfg.clone()).map_err(|e| crate::Error::BadFile {
            path: what.to_string(),
            message: format!("the teacher's configuration is unreadable: {e}"),
        })?;
    let device = state
        .tensors
        .values()
        .next()
        .map_or(candle_core::Device::Cpu, |t| t.device().clone());
    let m = Model::new(config, 0, &device)?;
    m.params().load(
        &super::checkpoint::with_prefix(&state.tensors, "teacher"),
        what,
    )?;
    Ok(Some(m))
}
