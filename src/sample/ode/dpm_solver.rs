//! Multistep DPM-Solver++ (Lu et al. 2022) in σ space, with λ = −ln σ and h = λ' − λ:
//!   ODE, 1st order: x' = (σ'/σ) x − expm1(−h) D0,
//!   SDE, 1st order: x' = (σ'/σ) e^{−h} x − expm1(−2h) D0 + σ' √(−expm1(−2h)) z,
//! and the 2nd / 3rd-order corrections from the previous steps' D (diffusers'
//! DPMSolverMultistepScheduler divided through by α', since its x is α x_σ).

use super::{Plan, SolverState};
use crate::error::Result;
use crate::value_error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// "dpmsolver++": the probability-flow ODE.
    DpmSolverPlusPlus,
    /// "sde-dpmsolver++": the reverse SDE (Lu et al. 2022, section 5; Karras et al.'s churn-free
    /// stochastic form).
    SdeDpmSolverPlusPlus,
}

impl DpmAlgorithm {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "dpmsolver++" => Ok(DpmAlgorithm::DpmSolverPlusPlus),
            "sde-dpmsolver++" => Ok(DpmAlgorithm::SdeDpmSolverPlusPlus),
            other => value_error!(
                "algorithm must be 'dpmsolver++' or 'sde-dpmsolver++', got {other:?} (the noise-prediction variants 'dpmsolver' / 'sde-dpmsolver' are not implemented)"
            ),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DpmAlgorithm::DpmSolverPlusPlus => "dpmsolver++",
            DpmAlgorithm::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
        }
    }
}

/// How the second-order term is formed (Lu et al. 2022, Appendix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

impl SolverType {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "midpoint" => Ok(SolverType::Midpoint),
            "heun" => Ok(SolverType::Heun),
            other => value_error!("solver_type must be 'midpoint' or 'heun', got {other:?}"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SolverType::Midpoint => "midpoint",
            SolverType::Heun => "heun",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpmSolverConfig {
    pub algorithm: DpmAlgorithm,
    /// 1, 2 or 3.
    pub order: u8,
    pub solver_type: SolverType,
    /// First order at the last step (and second at the one before) in runs under 15 steps.
    pub lower_order_final: bool,
    /// First order at the last step whatever the run's length.
    pub euler_at_final: bool,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        DpmSolverConfig {
            algorithm: DpmAlgorithm::DpmSolverPlusPlus,
            order: 2,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
        }
    }
}

/// diffusers' threshold below which `lower_order_final` applies.
const LOWER_ORDER_FINAL_STEPS: usize = 15;

impl DpmSolverConfig {
    pub(super) fn check(&self) -> Result<()> {
        if !(1..=3).contains(&self.order) {
            value_error!("order must be 1, 2 or 3, got {}", self.order);
        }
        Ok(())
    }
}

pub(super) fn plan(
    c: &DpmSolverConfig,
    i: usize,
    state: &SolverState,
    sigmas: &[f64],
    steps: usize,
) -> Result<Plan> {
    let (s, t) = (sigmas[i], sigmas[i + 1]);
    let slots = c.order as usize;
    let store_denoised = (slots > 1).then_some(state.done % slots);
    if t == s {
        // A step of length 0 (a Karras grid ending at σ_min followed by a final σ_min): the
        // identity, where the formulas divide 0 by 0 (diffusers returns NaN there).
        let mut p = Plan::simple(1.0, 0.0, t);
        p.store_denoised = store_denoised;
        return Ok(p);
    }
    let short = c.lower_order_final && steps < LOWER_ORDER_FINAL_STEPS;
    let final_first = i == steps - 1 && (c.euler_at_final || short || t == 0.0);
    let final_second = i + 2 == steps && short;
    let history = state.done;
    let order = if c.order == 1 || history < 1 || final_first {
        1
    } else if c.order == 2 || history < 2 || final_second {
        2
    } else {
        3
    };
    let h = (s / t).ln(); // +∞ when σ' = 0
    let sde = c.algorithm == DpmAlgorithm::SdeDpmSolverPlusPlus;
    // x' = c_x x + A D0 + B D1 + C D2 (+ noise), with D1, D2 the divided differences.
    let (cx, a, b_mid, b_heun, c2, noise) = if sde {
        let a = -(-2.0 * h).exp_m1();
        let noise = if t > 0.0 { t * a.sqrt() } else { 0.0 };
        (
            (t / s) * (-h).exp(),
            a,
            0.5 * a,
            a / (-2.0 * h) + 1.0,
            (a - 2.0 * h) / (4.0 * h * h) - 0.5,
            noise,
        )
    } else {
        let e = (-h).exp_m1();
        (
            t / s,
            -e,
            -0.5 * e,
            e / h + 1.0,
            -((e + h) / (h * h) - 0.5),
            0.0,
        )
    };
    let mut from_buffers = [0.0; 3];
    let mut from_denoised = a;
    if order >= 2 {
        let lambda = |sigma: f64| -sigma.ln();
        let h0 = lambda(s) - lambda(sigmas[i - 1]);
        let r0 = h0 / h;
        let prev = (history - 1) % slots;
        if order == 2 {
            let b = match c.solver_type {
                SolverType::Midpoint => b_mid,
                SolverType::Heun => b_heun,
            };
            // D1 = (D0 − D_{-1})/r0
            from_denoised += b / r0;
            from_buffers[prev] -= b / r0;
        } else {
            let h1 = lambda(sigmas[i - 1]) - lambda(sigmas[i - 2]);
            let r1 = h1 / h;
            let prev2 = (history - 2) % slots;
            // D1 = D1_0 + r0/(r0+r1) (D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1), with
            // D1_0 = (D0 − D_{-1})/r0 and D1_1 = (D_{-1} − D_{-2})/r1.
            let p = b_heun * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1);
            let q = -b_heun * r0 / (r0 + r1) - c2 / (r0 + r1);
            from_denoised += p / r0;
            from_buffers[prev] += -p / r0 + q / r1;
            from_buffers[prev2] -= q / r1;
        }
    }
    Ok(Plan {
        from_x: cx,
        from_denoised,
        from_buffers,
        noise_std: noise,
        store_x: None,
        store_denoised,
        sigma_next: t,
    })
}
