//! Euler steps on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, eq. 3
//! with σ(t) = t), and the ancestral split of a step into a deterministic part and fresh noise.

use super::Plan;

/// Euler from σ̂ to σ': x' = x + (σ' − σ̂) (x − D)/σ̂ (Karras et al. 2022, Algorithm 2, line 7).
pub(super) fn euler(sigma_hat: f64, sigma_next: f64) -> Plan {
    let r = (sigma_next - sigma_hat) / sigma_hat;
    Plan::simple(1.0 + r, -r, sigma_next)
}

/// Euler to σ_down, then noise of std s_noise σ_up, with
/// σ_up = min(σ', η √(σ'² (σ² − σ'²)/σ²)) and σ_down = √(σ'² − σ_up²) (k-diffusion's
/// `get_ancestral_step`; η = 1 is diffusers' EulerAncestralDiscreteScheduler).
pub(super) fn ancestral(sigma: f64, sigma_next: f64, eta: f64, s_noise: f64) -> Plan {
    let up = (eta
        * (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
            .max(0.0)
            .sqrt())
    .min(sigma_next);
    let down = (sigma_next * sigma_next - up * up).max(0.0).sqrt();
    let mut plan = euler(sigma, down);
    plan.noise_std = s_noise * up;
    plan.sigma_next = sigma_next;
    plan
}
