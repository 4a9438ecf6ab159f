//! Continuous-time helpers: the cosine log-SNR schedule (t in [0, 1]) and the Karras σ grid.

use crate::error::Result;
use crate::value_error;

/// Log-SNR bounds of the continuous cosine schedule (Salimans & Ho 2022, progressive distillation).
pub const LOG_SNR_MIN: f64 = -20.0;
pub const LOG_SNR_MAX: f64 = 20.0;

fn cosine_log_snr_ab(log_snr_min: f64, log_snr_max: f64) -> (f64, f64) {
    let b = (-0.5 * log_snr_max).exp().atan();
    let a = (-0.5 * log_snr_min).exp().atan() - b;
    (a, b)
}

/// λ(u) = -2 ln tan(a u + b) for continuous time u in [0, 1], λ(0) = log_snr_max,
/// λ(1) = log_snr_min. α² = sigmoid(λ), σ² = sigmoid(-λ).
pub fn cosine_log_snr(u: f64, log_snr_min: f64, log_snr_max: f64) -> f64 {
    let (a, b) = cosine_log_snr_ab(log_snr_min, log_snr_max);
    -2.0 * (a * u + b).tan().ln()
}

/// The continuous time u at which `cosine_log_snr` equals λ.
pub fn cosine_log_snr_inverse(log_snr: f64, log_snr_min: f64, log_snr_max: f64) -> f64 {
    let (a, b) = cosine_log_snr_ab(log_snr_min, log_snr_max);
    ((-0.5 * log_snr).exp().atan() - b) / a
}

/// Karras et al. (2022), eq. 5: σ_i = (σmax^(1/ρ) + i/(n-1) (σmin^(1/ρ) - σmax^(1/ρ)))^ρ for
/// i in [0, n), then 0 appended (n + 1 values, descending).
pub fn karras_sigmas(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Vec<f64>> {
    if n == 0 {
        value_error!("karras_sigmas needs n >= 1, got 0");
    }
    if !(sigma_min > 0.0 && sigma_min.is_finite() && sigma_max.is_finite() && sigma_min < sigma_max)
    {
        value_error!("karras_sigmas needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}");
    }
    if !(rho.is_finite() && rho > 0.0) {
        value_error!("rho must be finite and > 0, got {rho}");
    }
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    let mut out: Vec<f64> = (0..n)
        .map(|i| {
            let ramp = if n > 1 {
                i as f64 / (n - 1) as f64
            } else {
                0.0
            };
            (hi + ramp * (lo - hi)).powf(rho)
        })
        .collect();
    out.push(0.0);
    Ok(out)
}
