//! Discrete noise schedules: the β_t of the forward process and every table derived from them.
//!
//! Timesteps are 0-based (`t in [0, T)`); `alphas_cumprod[t]` is the paper's ᾱ_{t+1}, as in
//! diffusers. Everything is computed in f64.

mod continuous;
mod diffusers_config;
mod spacing;

pub use continuous::{
    cosine_log_snr, cosine_log_snr_inverse, karras_sigmas, LOG_SNR_MAX, LOG_SNR_MIN,
};
pub use diffusers_config::DiffusersConfig;
pub use spacing::{respaced_betas, select_timesteps, space_timesteps, Spacing};

use crate::error::Result;
use crate::value_error;

/// Floor on a posterior variance before taking its log (diffusers and OpenAI use the same).
pub const VARIANCE_FLOOR: f64 = 1e-20;

/// Default cosine offset s of Nichol & Dhariwal (2021), eq. 17.
pub const COSINE_OFFSET: f64 = 0.008;
/// Cap on cosine betas near t = T (Nichol & Dhariwal 2021).
pub const COSINE_MAX_BETA: f64 = 0.999;
/// Stable Diffusion's scaled-linear endpoints.
pub const SCALED_LINEAR_BETA_START: f64 = 0.00085;
pub const SCALED_LINEAR_BETA_END: f64 = 0.012;
/// DDPM's linear endpoints (Ho et al. 2020) at T = 1000.
pub const LINEAR_BETA_START: f64 = 1e-4;
pub const LINEAR_BETA_END: f64 = 0.02;

/// A discrete variance schedule: β_t for t in [0, T) and the derived tables.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// How the schedule was made, for display and configs (`"linear"`, `"cosine"`, ...).
    pub name: String,
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    /// β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), the variance of q(x_{t-1} | x_t, x_0).
    pub posterior_variance: Vec<f64>,
    /// log β̃_t with index 0 replaced by index 1 (β̃_0 = 0), as OpenAI's code does.
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Posterior mean μ̃_t = coef1 · x_0 + coef2 · x_t (DDPM eq. 7).
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    // numpy's definition: start + i * step, with the last value exactly `end`.
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = end;
    v
}

fn check_steps(num_train_timesteps: usize) -> Result<()> {
    if num_train_timesteps == 0 {
        value_error!("num_train_timesteps must be at least 1, got 0");
    }
    if num_train_timesteps > (1 << 31) {
        value_error!("num_train_timesteps must be at most 2^31, got {num_train_timesteps}");
    }
    Ok(())
}

fn check_beta_range(beta_start: f64, beta_end: f64) -> Result<()> {
    for (name, b) in [("beta_start", beta_start), ("beta_end", beta_end)] {
        if !(b.is_finite() && b > 0.0 && b < 1.0) {
            value_error!("{name} must be in (0, 1), got {b}");
        }
    }
    if beta_start > beta_end {
        value_error!(
            "beta_start ({beta_start}) is larger than beta_end ({beta_end}); noise must grow with t (were they swapped?)"
        );
    }
    Ok(())
}

impl Schedule {
    /// diffusers' `linear`: `linspace(beta_start, beta_end, T)`. With `scale_with_t`, OpenAI's
    /// form: both endpoints are multiplied by 1000/T so any T matches the T = 1000 process.
    pub fn linear(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        scale_with_t: bool,
    ) -> Result<Self> {
        check_steps(num_train_timesteps)?;
        check_beta_range(beta_start, beta_end)?;
        let scale = if scale_with_t {
            1000.0 / num_train_timesteps as f64
        } else {
            1.0
        };
        let (b0, b1) = (scale * beta_start, scale * beta_end);
        if b1 >= 1.0 {
            value_error!(
                "scale_with_T=True multiplies beta_end by 1000/T = {scale}, giving {b1} >= 1; use more timesteps or a smaller beta_end"
            );
        }
        Self::build("linear", linspace(b0, b1, num_train_timesteps))
    }

    /// Stable Diffusion's `scaled_linear`: `linspace(sqrt(b0), sqrt(b1), T)²`.
    pub fn scaled_linear(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Result<Self> {
        check_steps(num_train_timesteps)?;
        check_beta_range(beta_start, beta_end)?;
        let betas = linspace(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
            .into_iter()
            .map(|b| b * b)
            .collect();
        Self::build("scaled_linear", betas)
    }

    /// Cosine schedule of Nichol & Dhariwal (2021), eq. 17: ᾱ(u) = f(u)/f(0) with
    /// f(u) = cos²((u + s)/(1 + s) · π/2), β_t = min(1 - f((t+1)/T)/f(t/T), max_beta).
    /// (diffusers' `squaredcos_cap_v2`.)
    pub fn cosine(num_train_timesteps: usize, s: f64, max_beta: f64) -> Result<Self> {
        check_steps(num_train_timesteps)?;
        if !(s.is_finite() && s >= 0.0) {
            value_error!("cosine offset s must be finite and >= 0, got {s}");
        }
        if !(max_beta > 0.0 && max_beta <= 1.0) {
            value_error!("max_beta must be in (0, 1], got {max_beta}");
        }
        let f = |u: f64| {
            ((u + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        let n = num_train_timesteps as f64;
        let betas = (0..num_train_timesteps)
            .map(|i| (1.0 - f((i + 1) as f64 / n) / f(i as f64 / n)).min(max_beta))
            .collect();
        Self::build("cosine", betas)
    }

    /// diffusers' `sigmoid`: `sigmoid(linspace(-6, 6, T)) · (b1 - b0) + b0`.
    pub fn sigmoid(num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        check_steps(num_train_timesteps)?;
        check_beta_range(beta_start, beta_end)?;
        let betas = linspace(-6.0, 6.0, num_train_timesteps)
            .into_iter()
            .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) + beta_start)
            .collect();
        Self::build("sigmoid", betas)
    }

    /// The sigmoid ᾱ schedule of Jabri et al. (2022) (lucidrains' `sigmoid_beta_schedule`):
    /// ᾱ(u) ∝ sigmoid(-(u (end - start) + start)/τ) shifted to reach 0 at u = 1 and normalised
    /// by ᾱ(0); betas clipped to [0, 0.999].
    pub fn sigmoid_alpha_bar(
        num_train_timesteps: usize,
        start: f64,
        end: f64,
        tau: f64,
    ) -> Result<Self> {
        check_steps(num_train_timesteps)?;
        if !(start.is_finite() && end.is_finite() && start < end) {
            value_error!(
                "sigmoid_alpha_bar needs finite start < end, got start={start}, end={end}"
            );
        }
        if !(tau.is_finite() && tau > 0.0) {
            value_error!("tau must be finite and > 0, got {tau}");
        }
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (v_start, v_end) = (sig(start / tau), sig(end / tau));
        let n = num_train_timesteps;
        let abar: Vec<f64> = (0..=n)
            .map(|i| {
                let u = i as f64 / n as f64;
                (-sig((u * (end - start) + start) / tau) + v_end) / (v_end - v_start)
            })
            .collect();
        let betas = (0..n)
            .map(|i| {
                (1.0 - (abar[i + 1] / abar[0]) / (abar[i] / abar[0])).clamp(0.0, COSINE_MAX_BETA)
            })
            .collect();
        Self::build("sigmoid_alpha_bar", betas)
    }

    /// A schedule from explicit betas, each in (0, 1].
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            value_error!("betas is empty: a schedule needs at least one beta");
        }
        Self::build("custom", betas)
    }

    /// A schedule from ᾱ_t: non-increasing, in [0, 1), with at most the last value 0.
    pub fn from_alphas_cumprod(alphas_cumprod: Vec<f64>) -> Result<Self> {
        if alphas_cumprod.is_empty() {
            value_error!("alphas_cumprod is empty: a schedule needs at least one timestep");
        }
        let mut prev = 1.0;
        let n = alphas_cumprod.len();
        for (i, &a) in alphas_cumprod.iter().enumerate() {
            if !(a.is_finite() && (0.0..1.0).contains(&a)) {
                value_error!("alphas_cumprod[{i}] = {a} is not in [0, 1)");
            }
            if a > prev {
                value_error!("alphas_cumprod must be non-increasing, but alphas_cumprod[{i}] = {a} > alphas_cumprod[{}] = {prev}", i - 1);
            }
            if a == 0.0 && i + 1 != n {
                value_error!("alphas_cumprod[{i}] = 0 before the last timestep: only the final value may be 0 (zero terminal SNR)");
            }
            prev = a;
        }
        let mut betas = Vec::with_capacity(n);
        let mut prev = 1.0;
        for &a in &alphas_cumprod {
            betas.push(1.0 - a / prev);
            prev = a;
        }
        let mut s = Self::build("custom", betas)?;
        // Keep the caller's values exactly rather than the cumprod of the derived betas.
        s.set_alphas_cumprod(alphas_cumprod);
        Ok(s)
    }

    /// Lin et al. (2023), Algorithm 1: shift sqrt(ᾱ) so its last value is 0, rescale so its
    /// first value is unchanged, and convert back to betas (the last beta becomes 1).
    /// ε-prediction is undefined where ᾱ = 0; samplers guard that step (see `diffusion`).
    pub fn rescale_zero_terminal_snr(&self) -> Result<Self> {
        let n = self.len();
        if n < 2 {
            value_error!("rescale_zero_terminal_snr needs at least 2 timesteps, got {n}");
        }
        let sqrt_abar: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sqrt_abar[0], sqrt_abar[n - 1]);
        if first <= last {
            value_error!("rescale_zero_terminal_snr needs a decreasing schedule");
        }
        let abar: Vec<f64> = sqrt_abar
            .iter()
            .map(|s| ((s - last) * first / (first - last)).powi(2))
            .collect();
        let mut betas = Vec::with_capacity(n);
        let mut prev = 1.0;
        for &a in &abar {
            betas.push(1.0 - a / prev);
            prev = a;
        }
        let mut s = Self::build(&self.name, betas)?;
        s.name = format!("{}+zero_terminal_snr", self.name);
        Ok(s)
    }

    fn build(name: &str, betas: Vec<f64>) -> Result<Self> {
        check_steps(betas.len())?;
        for (i, &b) in betas.iter().enumerate() {
            if !(b.is_finite() && b > 0.0 && b <= 1.0) {
                value_error!("betas[{i}] = {b} is not in (0, 1]");
            }
            if b == 1.0 && i + 1 != betas.len() {
                value_error!("betas[{i}] = 1 before the last timestep destroys all signal; only the final beta may be 1");
            }
        }
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for a in &alphas {
            acc *= a;
            alphas_cumprod.push(acc);
        }
        let mut s = Schedule {
            name: name.to_string(),
            betas,
            alphas,
            alphas_cumprod: Vec::new(),
            alphas_cumprod_prev: Vec::new(),
            posterior_variance: Vec::new(),
            posterior_log_variance_clipped: Vec::new(),
            posterior_mean_coef1: Vec::new(),
            posterior_mean_coef2: Vec::new(),
        };
        s.set_alphas_cumprod(alphas_cumprod);
        Ok(s)
    }

    /// Rebuild a schedule from both tables exactly as stored (configs, pickles).
    pub fn from_parts(name: &str, betas: Vec<f64>, alphas_cumprod: Vec<f64>) -> Result<Self> {
        if betas.len() != alphas_cumprod.len() {
            value_error!(
                "betas has {} entries but alphas_cumprod has {}",
                betas.len(),
                alphas_cumprod.len()
            );
        }
        let mut s = Self::build(name, betas)?;
        for (i, &a) in alphas_cumprod.iter().enumerate() {
            if !(a.is_finite() && (0.0..1.0).contains(&a)) {
                value_error!("alphas_cumprod[{i}] = {a} is not in [0, 1)");
            }
        }
        s.set_alphas_cumprod(alphas_cumprod);
        Ok(s)
    }

    fn set_alphas_cumprod(&mut self, alphas_cumprod: Vec<f64>) {
        let n = alphas_cumprod.len();
        let mut prev = Vec::with_capacity(n);
        prev.push(1.0);
        prev.extend_from_slice(&alphas_cumprod[..n - 1]);
        let mut var = Vec::with_capacity(n);
        let mut coef1 = Vec::with_capacity(n);
        let mut coef2 = Vec::with_capacity(n);
        for t in 0..n {
            let (abar, abar_prev, beta) = (alphas_cumprod[t], prev[t], self.betas[t]);
            // DDPM eq. 7.
            var.push(beta * (1.0 - abar_prev) / (1.0 - abar));
            coef1.push(beta * abar_prev.sqrt() / (1.0 - abar));
            coef2.push((1.0 - abar_prev) * self.alphas[t].sqrt() / (1.0 - abar));
        }
        let clipped: Vec<f64> = (0..n)
            .map(|t| {
                let v = if t == 0 && n > 1 { var[1] } else { var[t] };
                v.max(VARIANCE_FLOOR).ln()
            })
            .collect();
        self.alphas_cumprod = alphas_cumprod;
        self.alphas_cumprod_prev = prev;
        self.posterior_variance = var;
        self.posterior_log_variance_clipped = clipped;
        self.posterior_mean_coef1 = coef1;
        self.posterior_mean_coef2 = coef2;
    }

    /// Number of training timesteps T.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// Signal-to-noise ratio ᾱ/(1-ᾱ).
    pub fn snr(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|a| a / (1.0 - a)).collect()
    }

    /// The equivalent variance-exploding noise levels σ_t = sqrt((1-ᾱ_t)/ᾱ_t) (inf where ᾱ = 0).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// Checks a timestep index and returns it as usize.
    pub fn check_timestep(&self, t: i64) -> Result<usize> {
        if t < 0 || t as u64 >= self.len() as u64 {
            value_error!("timestep {t} is out of range [0, {})", self.len());
        }
        Ok(t as usize)
    }

    /// The same process restricted to the ascending subset `use_timesteps` (strided sampling,
    /// Nichol & Dhariwal 2021, sec. 4): β'_i = 1 - ᾱ[τ_i]/ᾱ[τ_{i-1}].
    pub fn respaced(&self, use_timesteps: &[i64]) -> Result<Self> {
        let betas = respaced_betas(&self.alphas_cumprod, use_timesteps)?;
        let mut s = Self::build(&format!("{}[respaced]", self.name), betas)?;
        let abar = use_timesteps
            .iter()
            .map(|&t| self.alphas_cumprod[t as usize])
            .collect();
        s.set_alphas_cumprod(abar);
        Ok(s)
    }
}

#[cfg(test)]
mod tests;
