//! Consistency models (Song et al. 2023; Song & Dhariwal 2023): a network f(x, σ) that maps any
//! point x = x0 + σ z of a probability-flow trajectory to its origin, with the boundary
//! condition f(x, σ_min) = x built in:
//!
//! f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)),
//! c_skip = σ_d² / ((σ − σ_min)² + σ_d²), c_out = (σ − σ_min) σ_d / √(σ² + σ_d²),
//! c_in = 1/√(σ² + σ_d²), c_noise = 250 ln σ (the reference code's 1000 · ln(σ)/4).
//!
//! Consistency distillation (CD) fits f(x + σ_{n+1} z, σ_{n+1}) to a target network's f at the
//! point one teacher ODE step (Euler or Heun) back on the Karras grid; consistency training
//! (CT) replaces the teacher step by x + σ_n z with the same z. The improved recipe (iCT) uses
//! the pseudo-Huber distance with c = 0.00054 √d, a lognormal distribution over the levels, a
//! doubling N schedule, the weight 1/(σ_{n+1} − σ_n) and the student itself as the target.

use std::collections::HashMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::distill::{load_teacher_state, teacher_state};
use super::objective::{Batch, Objective, ObjectiveState};
use super::teacher::Teacher;
use crate::error::Result;
use crate::loss::tensors::mean_flat;
use crate::loss::tensors::per_row;
use crate::nn::params::uniforms;
use crate::nn::{Cond, Ctx, Model};
use crate::value_error;

/// Generator stream of the levels drawn for each row.
const LEVEL_STREAM: u64 = (1 << 62) + (1 << 58);

/// Song et al. 2023, Table 3 (CIFAR-10): CD's grid N = 18 and target decay μ = 0.95; CT's
/// initial / final discretisation s0 = 2, s1 = 150 and μ0 = 0.9.
const CD_NUM_SCALES: usize = 18;
const CD_TARGET_DECAY: f64 = 0.95;
pub const CT_S0: usize = 2;
pub const CT_S1: usize = 150;
pub const CT_MU0: f64 = 0.9;
/// Song & Dhariwal 2023, section 3: s0 = 10, s1 = 1280, pseudo-Huber c = 0.00054 √d, the
/// lognormal over σ with P_mean = −1.1, P_std = 2.0.
pub const ICT_S0: usize = 10;
pub const ICT_S1: usize = 1280;
const ICT_HUBER_C_PER_SQRT_DIM: f64 = 0.00054;
const ICT_P_MEAN: f64 = -1.1;
const ICT_P_STD: f64 = 2.0;

pub use crate::sample::consistency::ConsistencyParams;

/// f(x, σ_r) for every row r: the consistency model built on `model`.
pub fn consistency_forward(
    model: &Model,
    p: &ConsistencyParams,
    x: &Tensor,
    sigmas: &[f64],
    cond: &Cond,
    ctx: &Ctx,
) -> Result<Tensor> {
    let c_in: Vec<f64> = sigmas.iter().map(|&s| p.c_in(s)).collect();
    let c_skip: Vec<f64> = sigmas.iter().map(|&s| p.c_skip(s)).collect();
    let c_out: Vec<f64> = sigmas.iter().map(|&s| p.c_out(s)).collect();
    let t: Vec<f32> = sigmas
        .iter()
        .map(|&s| ConsistencyParams::c_noise(s) as f32)
        .collect();
    let input = x.broadcast_mul(&per_row(&c_in, x)?)?;
    let f = model.forward_cond(&input, &t, cond, ctx)?;
    let f = f.narrow(1, 0, x.dims()[1])?;
    Ok((x.broadcast_mul(&per_row(&c_skip, x)?)? + f.broadcast_mul(&per_row(&c_out, &f)?)?)?)
}

/// The distance between student and target outputs, per sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distance {
    /// Mean squared error over the dimensions.
    L2,
    /// Mean absolute error over the dimensions.
    L1,
    /// √(‖a − b‖² + c²) − c over all dimensions (Song & Dhariwal 2023).
    PseudoHuber(f64),
}

impl Distance {
    /// `name` is "l2", "l1" or "pseudo_huber" (c: `huber_c`, default 0.00054 √d).
    pub fn parse(name: &str, huber_c: Option<f64>, dims: usize) -> Result<Self> {
        Ok(match name {
            "l2" | "mse" => Distance::L2,
            "l1" => Distance::L1,
            "pseudo_huber" | "pseudo-huber" => {
                let c = huber_c.unwrap_or(ICT_HUBER_C_PER_SQRT_DIM * (dims as f64).sqrt());
                if !(c.is_finite() && c > 0.0) {
                    value_error!("huber_c must be positive, got {c}");
                }
                Distance::PseudoHuber(c)
            }
            other => value_error!("distance must be 'l2', 'l1' or 'pseudo_huber', got {other:?}"),
        })
    }

    pub fn per_sample(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let diff = (a - b)?;
        Ok(match *self {
            Distance::L2 => mean_flat(&diff.sqr()?)?,
            Distance::L1 => mean_flat(&diff.abs()?)?,
            Distance::PseudoHuber(c) => {
                let sq = diff.sqr()?.flatten_from(1)?.sum(1)?;
                ((sq + c * c)?.sqrt()? - c)?
            }
        })
    }
}

/// N(k) of consistency training (Song et al. 2023, Appendix C):
/// ⌈√(k/K ((s1 + 1)² − s0²) + s0²) − 1⌉ + 1.
pub fn ct_num_scales(k: u64, total: u64, s0: usize, s1: usize) -> usize {
    let frac = if total == 0 {
        1.0
    } else {
        (k as f64 / total as f64).min(1.0)
    };
    let (s0, s1) = (s0 as f64, s1 as f64);
    let v = (frac * ((s1 + 1.0).powi(2) - s0 * s0) + s0 * s0).sqrt() - 1.0;
    // Guard the ceiling against rounding just above an integer.
    (v - 1e-9).ceil().max(1.0) as usize + 1
}

/// μ(k) = exp(s0 ln μ0 / (N(k) − 1)), the target network's EMA decay in consistency training.
pub fn ct_ema_decay(num_scales: usize, s0: usize, mu0: f64) -> f64 {
    (s0 as f64 * mu0.ln() / (num_scales.max(2) - 1) as f64).exp()
}

/// N(k) of improved consistency training (Song & Dhariwal 2023, eq. 10):
/// min(s0 · 2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋.
pub fn ict_num_scales(k: u64, total: u64, s0: usize, s1: usize) -> usize {
    let doublings = ((s1 / s0.max(1)).max(1) as f64).log2().floor() as u64 + 1;
    let stage = (total / doublings).max(1);
    let e = (k / stage).min(62) as u32;
    (s0.saturating_mul(1usize << e.min(40))).min(s1) + 1
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf(x: f64) -> f64 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    sign * y
}

/// iCT's probabilities of the N − 1 level pairs (σ_i, σ_{i+1}) of an ascending grid: the mass
/// a lognormal N(p_mean, p_std²) over σ puts between them.
pub fn lognormal_level_probabilities(sigmas: &[f64], p_mean: f64, p_std: f64) -> Vec<f64> {
    let cdf = |s: f64| erf((s.ln() - p_mean) / (std::f64::consts::SQRT_2 * p_std));
    let mut p: Vec<f64> = sigmas.windows(2).map(|w| cdf(w[1]) - cdf(w[0])).collect();
    let total: f64 = p.iter().sum();
    if total > 0.0 {
        p.iter_mut().for_each(|v| *v /= total);
    }
    p
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyDistillationConfig {
    pub params: ConsistencyParams,
    /// Points of the Karras grid.
    pub num_scales: usize,
    /// The teacher's one-step ODE solver: "heun", "euler" or "ddim" (DDIM is Euler in σ space).
    pub solver: String,
    /// EMA decay of the target network.
    pub mu: f64,
    pub distance: String,
    pub huber_c: Option<f64>,
    pub teacher_prediction: String,
    pub guidance: Option<f64>,
}

impl Default for ConsistencyDistillationConfig {
    fn default() -> Self {
        ConsistencyDistillationConfig {
            params: ConsistencyParams::default(),
            num_scales: CD_NUM_SCALES,
            solver: "heun".into(),
            mu: CD_TARGET_DECAY,
            distance: "l2".into(),
            huber_c: None,
            teacher_prediction: "epsilon".into(),
            guidance: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyTrainingConfig {
    pub params: ConsistencyParams,
    /// "ct" (Song et al. 2023) or "ict" (Song & Dhariwal 2023).
    pub recipe: String,
    /// Initial and final discretisation (None: 2 / 150 for CT, 10 / 1280 for iCT).
    pub s0: Option<usize>,
    pub s1: Option<usize>,
    /// K, the step at which N(k) reaches s1 (0: the trainer's total_steps).
    pub total_steps: u64,
    /// μ0 of the CT target network (iCT has none).
    pub mu0: f64,
    /// None: "l2" for CT, "pseudo_huber" for iCT.
    pub distance: Option<String>,
    pub huber_c: Option<f64>,
    /// iCT's lognormal over σ.
    pub p_mean: f64,
    pub p_std: f64,
}

impl Default for ConsistencyTrainingConfig {
    fn default() -> Self {
        ConsistencyTrainingConfig {
            params: ConsistencyParams::default(),
            recipe: "ict".into(),
            s0: None,
            s1: None,
            total_steps: 0,
            mu0: CT_MU0,
            distance: None,
            huber_c: None,
            p_mean: ICT_P_MEAN,
            p_std: ICT_P_STD,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Solver {
    Euler,
    Heun,
}

/// What pairs the objective compares (one per trainer, so variant sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Kind {
    Distillation {
        teacher: Teacher,
        solver: Solver,
        num_scales: usize,
        mu: f64,
    },
    Training {
        improved: bool,
        s0: usize,
        s1: usize,
        total: u64,
        mu0: f64,
        p_mean: f64,
        p_std: f64,
    },
}

/// CD and CT as one objective.
pub struct ConsistencyObjective {
    params: ConsistencyParams,
    kind: Kind,
    distance: Distance,
    /// The EMA target network (None for iCT, whose target is the student without gradient).
    target: Option<Model>,
    /// The target's decay for the update after the current step.
    pending_mu: f64,
}

impl ConsistencyObjective {
    pub fn distillation(
        config: &ConsistencyDistillationConfig,
        teacher: Teacher,
        student: &Model,
        dims: usize,
    ) -> Result<Self> {
        config.params.validate()?;
        if config.num_scales < 2 {
            value_error!(
                "num_scales (N) must be at least 2, got {}",
                config.num_scales
            );
        }
        if !(0.0..1.0).contains(&config.mu) {
            value_error!("mu must be in [0, 1), got {}", config.mu);
        }
        let solver = match config.solver.as_str() {
            "heun" => Solver::Heun,
            "euler" | "ddim" => Solver::Euler,
            other => value_error!("solver must be 'heun', 'euler' or 'ddim', got {other:?}"),
        };
        Ok(ConsistencyObjective {
            params: config.params,
            distance: Distance::parse(&config.distance, config.huber_c, dims)?,
            target: Some(copy_model(student)?),
            kind: Kind::Distillation {
                teacher,
                solver,
                num_scales: config.num_scales,
                mu: config.mu,
            },
            pending_mu: config.mu,
        })
    }

    pub fn training(
        config: &ConsistencyTrainingConfig,
        student: &Model,
        dims: usize,
        trainer_total: u64,
    ) -> Result<Self> {
        config.params.validate()?;
        let improved = match config.recipe.as_str() {
            "ict" => true,
            "ct" => false,
            other => value_error!("recipe must be 'ct' or 'ict', got {other:?}"),
        };
        let (d0, d1) = if improved {
            (ICT_S0, ICT_S1)
        } else {
            (CT_S0, CT_S1)
        };
        let (s0, s1) = (config.s0.unwrap_or(d0), config.s1.unwrap_or(d1));
        if s0 < 2 || s1 < s0 {
            value_error!("the discretisation needs 2 <= s0 <= s1, got s0 = {s0}, s1 = {s1}");
        }
        let total = if config.total_steps > 0 {
            config.total_steps
        } else {
            trainer_total
        };
        if total == 0 {
            value_error!(
                "consistency training needs the length K of its N(k) schedule: set total_steps"
            );
        }
        if !(0.0..1.0).contains(&config.mu0) {
            value_error!("mu0 must be in [0, 1), got {}", config.mu0);
        }
        if !(config.p_std.is_finite() && config.p_std > 0.0 && config.p_mean.is_finite()) {
            value_error!("p_std must be positive and p_mean finite");
        }
        let default = if improved { "pseudo_huber" } else { "l2" };
        let name = config.distance.as_deref().unwrap_or(default);
        Ok(ConsistencyObjective {
            params: config.params,
            distance: Distance::parse(name, config.huber_c, dims)?,
            target: if improved {
                None
            } else {
                Some(copy_model(student)?)
            },
            kind: Kind::Training {
                improved,
                s0,
                s1,
                total,
                mu0: config.mu0,
                p_mean: config.p_mean,
                p_std: config.p_std,
            },
            pending_mu: 0.0,
        })
    }

    /// N at step k.
    pub fn num_scales(&self, k: u64) -> usize {
        match &self.kind {
            Kind::Distillation { num_scales, .. } => *num_scales,
            Kind::Training {
                improved,
                s0,
                s1,
                total,
                ..
            } => {
                if *improved {
                    ict_num_scales(k, *total, *s0, *s1)
                } else {
                    ct_num_scales(k, *total, *s0, *s1)
                }
            }
        }
    }

    /// The target network (EMA of the student), if the objective keeps one.
    pub fn target(&self) -> Option<&Model> {
        self.target.as_ref()
    }
}

fn copy_model(m: &Model) -> Result<Model> {
    m.with_weights(&m.params().tensors()?)
}

/// Rows of `x` (row length `row`) plus σ_r times rows of z.
fn add_scaled(x: &[f32], z: &[f32], sigmas: &[f64], row: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for (r, &s) in sigmas.iter().enumerate() {
        let s = s as f32;
        let sl = r * row..(r + 1) * row;
        out.extend(x[sl.clone()].iter().zip(&z[sl]).map(|(&a, &b)| a + s * b));
    }
    out
}

impl Objective for ConsistencyObjective {
    fn per_sample_loss(&mut self, model: &Model, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let k = batch.step;
        let n = self.num_scales(k);
        let grid = self.params.karras_ascending(n)?;
        let (b, row) = (batch.rows(), batch.per_sample());
        let u = uniforms(batch.seed, LEVEL_STREAM ^ k, b);
        let idx: Vec<usize> = match &self.kind {
            Kind::Training {
                improved: true,
                p_mean,
                p_std,
                ..
            } => {
                let p = lognormal_level_probabilities(&grid, *p_mean, *p_std);
                let mut cdf = Vec::with_capacity(p.len());
                let mut acc = 0.0;
                for v in &p {
                    acc += v;
                    cdf.push(acc);
                }
                u.iter()
                    .map(|&v| {
                        let v = v as f64 * acc;
                        cdf.iter().position(|&c| v < c).unwrap_or(p.len() - 1)
                    })
                    .collect()
            }
            _ => u
                .iter()
                .map(|&v| ((v as f64 * (n - 1) as f64) as usize).min(n - 2))
                .collect(),
        };
        let s_lo: Vec<f64> = idx.iter().map(|&i| grid[i]).collect();
        let s_hi: Vec<f64> = idx.iter().map(|&i| grid[i + 1]).collect();
        let z = batch.noise();
        let x_hi = add_scaled(batch.x0, &z, &s_hi, row);
        let x_lo = match &mut self.kind {
            Kind::Training { .. } => add_scaled(batch.x0, &z, &s_lo, row),
            Kind::Distillation {
                teacher, solver, ..
            } => {
                // One teacher ODE step in σ space from σ_{n+1} to σ_n.
                let d = teacher.denoise(&x_hi, batch.shape, &s_hi, batch.labels)?;
                let mut euler = Vec::with_capacity(x_hi.len());
                for r in 0..b {
                    let h = (s_lo[r] - s_hi[r]) as f32;
                    let sh = s_hi[r] as f32;
                    for j in r * row..(r + 1) * row {
                        euler.push(x_hi[j] + h * (x_hi[j] - d[j]) / sh);
                    }
                }
                match solver {
                    Solver::Euler => euler,
                    Solver::Heun => {
                        let d2 = teacher.denoise(&euler, batch.shape, &s_lo, batch.labels)?;
                        let mut out = Vec::with_capacity(x_hi.len());
                        for r in 0..b {
                            let h = (s_lo[r] - s_hi[r]) as f32;
                            let (sh, sl) = (s_hi[r] as f32, s_lo[r] as f32);
                            for j in r * row..(r + 1) * row {
                                let d_hi = (x_hi[j] - d[j]) / sh;
                                let d_lo = (euler[j] - d2[j]) / sl;
                                out.push(x_hi[j] + h * 0.5 * (d_hi + d_lo));
                            }
                        }
                        out
                    }
                }
            }
        };
        let dev = model.device();
        let x_hi = Tensor::from_vec(x_hi, batch.shape, dev)?;
        let x_lo = Tensor::from_vec(x_lo, batch.shape, dev)?;
        let cond = batch.cond();
        let student = consistency_forward(model, &self.params, &x_hi, &s_hi, &cond, ctx)?;
        // The target sees the same dropout masks as the student (a fresh context of the step).
        let target_ctx = Ctx::train(batch.seed, batch.step);
        let target_net = self.target.as_ref().unwrap_or(model);
        let target =
            consistency_forward(target_net, &self.params, &x_lo, &s_lo, &cond, &target_ctx)?
                .detach();
        let mut loss = self.distance.per_sample(&student, &target)?;
        if let Kind::Training { improved: true, .. } = self.kind {
            let w: Vec<f32> = s_lo
                .iter()
                .zip(&s_hi)
                .map(|(&lo, &hi)| (1.0 / (hi - lo)) as f32)
                .collect();
            loss = (loss * Tensor::from_vec(w, b, dev)?)?;
        }
        self.pending_mu = match &self.kind {
            Kind::Distillation { mu, .. } => *mu,
            Kind::Training {
                improved: false,
                s0,
                mu0,
                ..
            } => ct_ema_decay(n, *s0, *mu0),
            Kind::Training { .. } => 0.0,
        };
        Ok(loss)
    }

    fn after_step(&mut self, model: &Model) -> Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let mu = self.pending_mu;
        let student = model.params().named_vars();
        for ((_, tv), (_, sv)) in target.params().named_vars().iter().zip(&student) {
            let next = ((tv.as_tensor() * mu)? + (sv.as_tensor() * (1.0 - mu))?)?;
            tv.set(&next)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<ObjectiveState> {
        let mut state = match &self.kind {
            Kind::Distillation { teacher, .. } => teacher_state(teacher)?,
            Kind::Training { .. } => ObjectiveState::default(),
        };
        if let Some(t) = &self.target {
            super::checkpoint::add_prefixed(&mut state.tensors, "target", t.params().tensors()?);
        }
        Ok(state)
    }

    fn load_state(&mut self, state: ObjectiveState, what: &str) -> Result<()> {
        if let Some(t) = &self.target {
            let w: HashMap<String, Tensor> =
                super::checkpoint::with_prefix(&state.tensors, "target");
            if w.is_empty() {
                return Err(crate::Error::BadFile {
                    path: what.to_string(),
                    message: "the checkpoint holds no target network".into(),
                });
            }
            t.params().load(&w, what)?;
        }
        if let Kind::Distillation { teacher, .. } = &mut self.kind {
            load_teacher_state(teacher, state, what)?;
        }
        Ok(())
    }
}
