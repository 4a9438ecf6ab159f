//! Heun's method (Karras et al. 2022, Algorithm 2): an Euler predictor to σ', a second model
//! call there, and the average of the two slopes; plain Euler where σ' = 0.

use super::{Evaluation, Plan, SolverState};
use crate::sample::sigma::SigmaGrid;

/// Buffer slots of the first stage: its x̂ and its D.
const SAVED_X: usize = 0;
const SAVED_DENOISED: usize = 1;

/// The calls of a run: (σ_i, t_i) for every step, and (σ_{i+1}, t_{i+1}) for the correction
/// of every step that does not end at σ = 0 (diffusers' HeunDiscreteScheduler interleaving).
pub(super) fn evaluations(grid: &SigmaGrid) -> Vec<Evaluation> {
    let n = grid.steps();
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        out.push(Evaluation {
            sigma: grid.sigmas[i],
            timestep: grid.timesteps[i],
            step: i,
            stage: 0,
        });
        let next = grid.sigmas[i + 1];
        if next > 0.0 {
            out.push(Evaluation {
                sigma: next,
                timestep: grid
                    .timesteps
                    .get(i + 1)
                    .copied()
                    .unwrap_or_else(|| grid.timestep_of(next)),
                step: i,
                stage: 1,
            });
        }
    }
    out
}

pub(super) fn plan(e: Evaluation, sigma_hat: f64, state: &SolverState, sigmas: &[f64]) -> Plan {
    let next = sigmas[e.step + 1];
    if e.stage == 0 {
        let mut p = super::euler::euler(sigma_hat, next);
        if next > 0.0 {
            p.store_x = Some(SAVED_X);
            p.store_denoised = Some(SAVED_DENOISED);
        }
        return p;
    }
    // x' = x̂ + (σ' − σ̂)/2 · ((x̂ − D̂)/σ̂ + (x − D)/σ'), x̂ and D̂ from the first stage.
    let first = state.last_sigma_hat;
    let dt = next - first;
    let (a, b) = (dt / (2.0 * first), dt / (2.0 * next));
    let mut from_buffers = [0.0; 3];
    from_buffers[SAVED_X] = 1.0 + a;
    from_buffers[SAVED_DENOISED] = -a;
    Plan {
        from_x: b,
        from_denoised: -b,
        from_buffers,
        noise_std: 0.0,
        store_x: None,
        store_denoised: None,
        sigma_next: next,
    }
}
