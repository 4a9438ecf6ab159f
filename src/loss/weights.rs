//! Per-timestep weights of the simple loss. Every weighting is defined on the error of x0 and
//! converted to the regression target the model is trained on, so that
//! `loss_weight(ᾱ, kind, target) · ‖target_pred - target‖²` is the same number whichever target
//! is used, for predictions that imply the same x0.
//!
//! With `x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε` fixed, a prediction x̂0 implies
//! `ε̂ = (x_t - sqrt(ᾱ) x̂0) / sqrt(1-ᾱ)` and `v̂ = sqrt(ᾱ) ε̂ - sqrt(1-ᾱ) x̂0`, so
//!
//! ```text
//! ε̂ - ε = -sqrt(ᾱ/(1-ᾱ)) (x̂0 - x0)           ‖ε̂ - ε‖² = SNR · ‖x̂0 - x0‖²
//! v̂ - v = -(ᾱ/sqrt(1-ᾱ) + sqrt(1-ᾱ)) (x̂0 - x0) = -(x̂0 - x0)/sqrt(1-ᾱ)
//!                                              ‖v̂ - v‖² = (SNR + 1) · ‖x̂0 - x0‖²
//! ```
//!
//! with SNR = ᾱ/(1-ᾱ). An x0 weight w therefore becomes `w / SNR` on the ε-MSE and
//! `w / (SNR + 1)` on the v-MSE. `Uniform` is the exception: it is 1 on whatever target is used
//! (plain MSE), so it weights x0 differently per target.
//!
//! At SNR = 0 (ᾱ = 0, a zero-terminal-SNR schedule's last step) the ε target says nothing about
//! x0 and `w / SNR` may diverge. Weights stay finite: where the closed form has a finite limit
//! it is used (`Snr` and `MinSnr` on ε are 1); where it diverges (`TruncatedSnr` on ε, `Vlb` on ε
//! at a step with α_t = 0) the SNR in the denominator is floored at [`SNR_FLOOR`].

/// γ of min-SNR-γ weighting, the value recommended by Hang et al. 2023 ("Efficient Diffusion
/// Training via Min-SNR Weighting Strategy").
pub const MIN_SNR_GAMMA: f64 = 5.0;

/// Lowest SNR used where an ε weight would otherwise divide by SNR → 0 (`TruncatedSnr` on ε at
/// any ᾱ with SNR below it, `Vlb` on ε where α_t = 0): those weights are at most `1/SNR_FLOOR`
/// times the x0 weight. The cosine schedule's last step (ᾱ = 2.4e-9, SNR = 2.4e-9) is below it.
pub const SNR_FLOOR: f64 = 1e-8;

/// How the per-timestep losses are weighted, as weights of the x0 error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weighting {
    /// Weight 1 on the MSE of whatever target the model predicts (Ho et al. 2020, eq. 14).
    Uniform,
    /// SNR · ‖x̂0 - x0‖², which is the plain ε-MSE.
    Snr,
    /// min(SNR, γ) · ‖x̂0 - x0‖² (Hang et al. 2023); γ = [`MIN_SNR_GAMMA`] by default.
    MinSnr { gamma: f64 },
    /// max(SNR, 1) · ‖x̂0 - x0‖² (Salimans & Ho 2022, "truncated SNR", section 4).
    TruncatedSnr,
    /// The weight that turns the ε-MSE into the KL term L_{t-1} of the bound with fixed
    /// variance σ_t² (Ho et al. 2020, eq. 12); needs [`VlbCoefs`].
    Vlb,
}

impl Weighting {
    /// Parses "uniform", "snr", "min_snr" (with `gamma`), "truncated_snr", "vlb".
    pub fn parse(kind: &str, gamma: f64) -> crate::Result<Self> {
        Ok(match kind {
            "uniform" => Weighting::Uniform,
            "snr" => Weighting::Snr,
            "min_snr" => {
                if !(gamma.is_finite() && gamma > 0.0) {
                    crate::value_error!("gamma must be positive and finite, got {gamma}");
                }
                Weighting::MinSnr { gamma }
            }
            "truncated_snr" => Weighting::TruncatedSnr,
            "vlb" => Weighting::Vlb,
            other => crate::value_error!(
                "unknown loss weighting {other:?}: expected one of 'uniform', 'snr', 'min_snr', 'truncated_snr', 'vlb'"
            ),
        })
    }

    /// Min-SNR weighting with the paper's γ = 5.
    pub fn min_snr() -> Self {
        Weighting::MinSnr {
            gamma: MIN_SNR_GAMMA,
        }
    }
}

/// What the model regresses (ferrodiff's `Prediction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The noise ε.
    Epsilon,
    /// The clean sample x0.
    X0,
    /// The velocity v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 (Salimans & Ho 2022).
    V,
}

/// Schedule values at one timestep t for [`Weighting::Vlb`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VlbCoefs {
    /// β_t, in (0, 1].
    pub beta: f64,
    /// α_t = 1 - β_t.
    pub alpha: f64,
    /// ᾱ_t, in [0, 1).
    pub alpha_bar: f64,
    /// σ_t² = β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t), with index 0 replaced by index 1 (improved-diffusion).
    pub posterior_variance_clipped: f64,
}

impl VlbCoefs {
    /// The coefficients at timestep `t` of the schedule with these `betas` (ᾱ = cumprod(1 - β)).
    pub fn from_betas(betas: &[f64], t: usize) -> Result<Self, String> {
        if t >= betas.len() || betas.len() < 2 {
            return Err(format!(
                "t must index betas and betas needs at least 2 values; got t = {t} with {} betas",
                betas.len()
            ));
        }
        if let Some(i) = betas.iter().position(|b| !(*b > 0.0 && *b <= 1.0)) {
            return Err(format!(
                "betas must lie in (0, 1], got {} at index {i}",
                betas[i]
            ));
        }
        let alpha_bar = |i: usize| betas[..=i].iter().map(|b| 1.0 - b).product::<f64>();
        // Ho et al. 2020, eq. 7: β̃_t; improved-diffusion uses β̃_1 at t = 0, where β̃_0 = 0.
        let posterior_variance =
            |i: usize| betas[i] * (1.0 - alpha_bar(i - 1)) / (1.0 - alpha_bar(i));
        Ok(VlbCoefs {
            beta: betas[t],
            alpha: 1.0 - betas[t],
            alpha_bar: alpha_bar(t),
            posterior_variance_clipped: posterior_variance(t.max(1)),
        })
    }
}

/// The weight that multiplies the MSE of `target` at a timestep with `alpha_bar` = ᾱ_t, for
/// the weighting `kind`; see the module documentation for the conversions between targets.
/// `vlb` is required for [`Weighting::Vlb`] (and ignored otherwise); its `alpha_bar` must equal
/// the `alpha_bar` argument.
///
/// | kind           | x0                | ε                    | v                       |
/// |----------------|-------------------|----------------------|-------------------------|
/// | `Uniform`      | 1                 | 1                    | 1                       |
/// | `Snr`          | SNR               | 1                    | SNR/(SNR+1) = ᾱ         |
/// | `MinSnr`       | min(SNR, γ)       | min(SNR, γ)/SNR      | min(SNR, γ)/(SNR+1)     |
/// | `TruncatedSnr` | max(SNR, 1)       | max(SNR, 1)/SNR      | max(SNR, 1)/(SNR+1)     |
/// | `Vlb`          | w_ε · SNR         | w_ε                  | w_ε · SNR/(SNR+1)       |
///
/// with w_ε = β_t² / (2 α_t (1-ᾱ_t) σ_t²) (Ho et al. 2020, eq. 12). Errors on ᾱ outside [0, 1),
/// γ not positive, or missing or inconsistent `vlb`.
pub fn loss_weight(
    alpha_bar: f64,
    kind: &Weighting,
    target: Target,
    vlb: Option<VlbCoefs>,
) -> Result<f64, String> {
    if !(0.0..1.0).contains(&alpha_bar) {
        return Err(format!("alpha_bar must lie in [0, 1), got {alpha_bar}"));
    }
    let snr = alpha_bar / (1.0 - alpha_bar);
    let weight = match *kind {
        Weighting::Uniform => 1.0,
        Weighting::Snr => match target {
            Target::X0 => snr,
            Target::Epsilon => 1.0,
            Target::V => snr / (snr + 1.0),
        },
        // Min-SNR-γ (Hang et al. 2023); min(SNR, γ)/SNR written as min(1, γ/SNR), whose limit
        // at SNR = 0 is 1.
        Weighting::MinSnr { gamma } => {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(format!(
                    "gamma of min_snr weighting must be positive and finite, got {gamma}"
                ));
            }
            match target {
                Target::X0 => snr.min(gamma),
                Target::Epsilon => (gamma / snr).min(1.0),
                Target::V => snr.min(gamma) / (snr + 1.0),
            }
        }
        // Salimans & Ho 2022, section 4.
        Weighting::TruncatedSnr => match target {
            Target::X0 => snr.max(1.0),
            Target::Epsilon => (1.0 / snr.max(SNR_FLOOR)).max(1.0),
            Target::V => snr.max(1.0) / (snr + 1.0),
        },
        Weighting::Vlb => {
            let coefs = vlb.ok_or_else(|| {
                "the vlb weighting needs vlb coefficients (beta, alpha, alpha_bar, posterior_variance_clipped), got None"
                    .to_string()
            })?;
            check_vlb_coefs(&coefs, alpha_bar)?;
            let VlbCoefs {
                beta,
                alpha,
                posterior_variance_clipped: variance,
                ..
            } = coefs;
            if alpha > 0.0 {
                // Ho et al. 2020, eq. 12.
                let epsilon_weight = beta * beta / (2.0 * alpha * (1.0 - alpha_bar) * variance);
                match target {
                    Target::Epsilon => epsilon_weight,
                    Target::X0 => epsilon_weight * snr,
                    Target::V => epsilon_weight * snr / (snr + 1.0),
                }
            } else {
                // α_t = 0 (β_t = 1, so ᾱ_t = 0): eq. 12 diverges. The x0 form of the same KL,
                // ‖μ̃ - μ_θ‖²/(2σ²) = coef1² ‖x̂0 - x0‖²/(2σ²) with coef1 = β sqrt(ᾱ_{t-1})/(1-ᾱ_t)
                // (Ho et al. 2020, eq. 7), stays finite; ᾱ_{t-1} = 1 - σ²(1-ᾱ_t)/β_t from the
                // posterior variance.
                let alpha_bar_prev = 1.0 - variance * (1.0 - alpha_bar) / beta;
                let x0_weight = beta * beta * alpha_bar_prev
                    / (2.0 * variance * (1.0 - alpha_bar) * (1.0 - alpha_bar));
                match target {
                    Target::Epsilon => x0_weight / snr.max(SNR_FLOOR),
                    Target::X0 => x0_weight,
                    Target::V => x0_weight / (snr + 1.0),
                }
            }
        }
    };
    Ok(weight)
}

fn check_vlb_coefs(coefs: &VlbCoefs, alpha_bar: f64) -> Result<(), String> {
    let VlbCoefs {
        beta,
        alpha,
        alpha_bar: coefs_alpha_bar,
        posterior_variance_clipped,
    } = *coefs;
    if !(beta > 0.0 && beta <= 1.0) {
        return Err(format!("vlb.beta must lie in (0, 1], got {beta}"));
    }
    let alpha_mismatch = (alpha - (1.0 - beta)).abs();
    if alpha_mismatch.is_nan() || alpha_mismatch > 1e-9 {
        return Err(format!(
            "vlb.alpha must equal 1 - vlb.beta = {}, got {alpha}",
            1.0 - beta
        ));
    }
    let alpha_bar_mismatch = (coefs_alpha_bar - alpha_bar).abs();
    if alpha_bar_mismatch.is_nan() || alpha_bar_mismatch > 1e-9 * alpha_bar.max(1e-3) {
        return Err(format!(
            "vlb.alpha_bar must equal alpha_bar = {alpha_bar}, got {coefs_alpha_bar}"
        ));
    }
    if !(posterior_variance_clipped > 0.0 && posterior_variance_clipped.is_finite()) {
        return Err(format!(
            "vlb.posterior_variance_clipped must be positive and finite, got {posterior_variance_clipped}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Weighting; 5] = [
        Weighting::Uniform,
        Weighting::Snr,
        Weighting::MinSnr {
            gamma: MIN_SNR_GAMMA,
        },
        Weighting::TruncatedSnr,
        Weighting::Vlb,
    ];
    const TARGETS: [Target; 3] = [Target::Epsilon, Target::X0, Target::V];

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-300),
            "got {got}, want {want} (relative tolerance {rel})"
        );
    }

    /// Plausible schedule values at a step with this ᾱ: β small unless ᾱ = 0, where the step is
    /// a zero-terminal-SNR schedule's last (β = 1, α = 0).
    fn coefs_at(alpha_bar: f64) -> VlbCoefs {
        let (beta, alpha_bar_prev) = if alpha_bar == 0.0 {
            (1.0, 0.0047)
        } else {
            let beta = (0.5 * (1.0 - alpha_bar)).min(0.02);
            (beta, alpha_bar / (1.0 - beta))
        };
        VlbCoefs {
            beta,
            alpha: 1.0 - beta,
            alpha_bar,
            posterior_variance_clipped: beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
        }
    }

    fn weight(alpha_bar: f64, kind: &Weighting, target: Target) -> f64 {
        loss_weight(alpha_bar, kind, target, Some(coefs_at(alpha_bar))).unwrap()
    }

    /// Linear betas with Lin et al. 2023, Algorithm 1 applied (ᾱ_{T-1} = 0).
    fn zero_terminal_snr_linear_betas(t_max: usize) -> Vec<f64> {
        let mut product = 1.0;
        let sqrt_alpha_bar: Vec<f64> = (0..t_max)
            .map(|i| {
                product *= 1.0 - (1e-4 + (0.02 - 1e-4) * i as f64 / (t_max - 1) as f64);
                f64::sqrt(product)
            })
            .collect();
        let (first, last) = (sqrt_alpha_bar[0], sqrt_alpha_bar[t_max - 1]);
        let alpha_bar: Vec<f64> = sqrt_alpha_bar
            .iter()
            .map(|s| ((s - last) * first / (first - last)).powi(2))
            .collect();
        (0..t_max)
            .map(|i| 1.0 - alpha_bar[i] / if i == 0 { 1.0 } else { alpha_bar[i - 1] })
            .collect()
    }

    /// SplitMix64 and Box-Muller: reproducible normals without dependencies.
    struct Normals(u64);
    impl Normals {
        fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u = 1.0 - self.uniform();
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
        }
        fn vec(&mut self, n: usize) -> Vec<f64> {
            (0..n).map(|_| self.normal()).collect()
        }
    }

    fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }

    #[test]
    fn test_every_kind_and_target_is_finite_and_non_negative_from_clean_to_pure_noise() {
        for &alpha_bar in &[0.9999, 0.5, 1e-4, 0.0] {
            for kind in &KINDS {
                for target in TARGETS {
                    let w = weight(alpha_bar, kind, target);
                    assert!(
                        w.is_finite() && w >= 0.0,
                        "{kind:?} {target:?} at ᾱ = {alpha_bar}: {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_weights_at_snr_one_and_at_high_snr() {
        // ᾱ = 0.5: SNR = 1.
        let expected = [
            (Weighting::Uniform, [1.0, 1.0, 1.0]),
            (Weighting::Snr, [1.0, 1.0, 0.5]),
            (Weighting::min_snr(), [1.0, 1.0, 0.5]),
            (Weighting::TruncatedSnr, [1.0, 1.0, 0.5]),
        ];
        for (kind, [epsilon, x0, v]) in expected {
            assert_close(weight(0.5, &kind, Target::Epsilon), epsilon, 1e-15);
            assert_close(weight(0.5, &kind, Target::X0), x0, 1e-15);
            assert_close(weight(0.5, &kind, Target::V), v, 1e-15);
        }
        // ᾱ = 0.9999: SNR = 9999; min-SNR clips at γ = 5, truncated SNR does not.
        let snr = 0.9999 / (1.0 - 0.9999);
        let kind = Weighting::min_snr();
        assert_close(weight(0.9999, &kind, Target::Epsilon), 5.0 / snr, 1e-12);
        assert_close(weight(0.9999, &kind, Target::X0), 5.0, 1e-15);
        assert_close(weight(0.9999, &kind, Target::V), 5.0 / (snr + 1.0), 1e-12);
        let kind = Weighting::TruncatedSnr;
        assert_close(weight(0.9999, &kind, Target::Epsilon), 1.0, 1e-12);
        assert_close(weight(0.9999, &kind, Target::X0), snr, 1e-12);
        assert_close(weight(0.9999, &kind, Target::V), snr / (snr + 1.0), 1e-12);
        // ᾱ = 1e-4: SNR ≈ 1e-4; truncation lifts the x0 weight to 1.
        let snr = 1e-4 / (1.0 - 1e-4);
        assert_close(weight(1e-4, &kind, Target::Epsilon), 1.0 / snr, 1e-12);
        assert_close(
            weight(1e-4, &Weighting::min_snr(), Target::Epsilon),
            1.0,
            1e-15,
        );
        assert_close(weight(1e-4, &Weighting::Snr, Target::V), 1e-4, 1e-12);
    }

    #[test]
    fn test_weights_at_zero_terminal_snr_take_documented_limits() {
        let at_zero = |kind: Weighting, target| weight(0.0, &kind, target);
        assert_eq!(at_zero(Weighting::Snr, Target::Epsilon), 1.0);
        assert_eq!(at_zero(Weighting::Snr, Target::X0), 0.0);
        assert_eq!(at_zero(Weighting::Snr, Target::V), 0.0);
        assert_eq!(at_zero(Weighting::min_snr(), Target::Epsilon), 1.0);
        assert_eq!(at_zero(Weighting::min_snr(), Target::X0), 0.0);
        assert_eq!(at_zero(Weighting::min_snr(), Target::V), 0.0);
        assert_eq!(
            at_zero(Weighting::TruncatedSnr, Target::Epsilon),
            1.0 / SNR_FLOOR
        );
        assert_eq!(at_zero(Weighting::TruncatedSnr, Target::X0), 1.0);
        assert_eq!(at_zero(Weighting::TruncatedSnr, Target::V), 1.0);
        // Vlb at α_t = 0: x0 weight coef1²/(2σ²) = SNR_{t-1}/2 with σ² = 1 - ᾱ_{t-1}.
        let snr_prev = 0.0047 / (1.0 - 0.0047);
        assert_close(at_zero(Weighting::Vlb, Target::X0), snr_prev / 2.0, 1e-12);
        assert_close(at_zero(Weighting::Vlb, Target::V), snr_prev / 2.0, 1e-12);
        assert_close(
            at_zero(Weighting::Vlb, Target::Epsilon),
            snr_prev / 2.0 / SNR_FLOOR,
            1e-12,
        );
    }

    #[test]
    fn test_vlb_weights_on_a_real_zero_terminal_snr_schedule_are_finite() {
        let betas = zero_terminal_snr_linear_betas(1000);
        for t in [0, 1, 500, 998, 999] {
            let coefs = VlbCoefs::from_betas(&betas, t).unwrap();
            for target in TARGETS {
                let w = loss_weight(coefs.alpha_bar, &Weighting::Vlb, target, Some(coefs)).unwrap();
                assert!(w.is_finite() && w > 0.0, "t = {t}, {target:?}: {w}");
            }
        }
        let last = VlbCoefs::from_betas(&betas, 999).unwrap();
        assert!(
            last.alpha.abs() < 1e-12 && last.alpha_bar.abs() < 1e-12,
            "{last:?}"
        );
    }

    #[test]
    fn test_vlb_epsilon_weight_is_ho_eq_12_and_x0_weight_is_coef1_squared_over_two_variance() {
        let betas: Vec<f64> = (0..1000)
            .map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0)
            .collect();
        for t in [1, 10, 250, 999] {
            let c = VlbCoefs::from_betas(&betas, t).unwrap();
            let epsilon =
                loss_weight(c.alpha_bar, &Weighting::Vlb, Target::Epsilon, Some(c)).unwrap();
            let ho = c.beta.powi(2)
                / (2.0 * c.alpha * (1.0 - c.alpha_bar) * c.posterior_variance_clipped);
            assert_close(epsilon, ho, 1e-14);
            let alpha_bar_prev = c.alpha_bar / c.alpha;
            let coef1 = c.beta * alpha_bar_prev.sqrt() / (1.0 - c.alpha_bar);
            let x0 = loss_weight(c.alpha_bar, &Weighting::Vlb, Target::X0, Some(c)).unwrap();
            assert_close(
                x0,
                coef1 * coef1 / (2.0 * c.posterior_variance_clipped),
                1e-10,
            );
        }
        // Index 0 uses index 1's posterior variance.
        let c0 = VlbCoefs::from_betas(&betas, 0).unwrap();
        let c1 = VlbCoefs::from_betas(&betas, 1).unwrap();
        assert_eq!(c0.posterior_variance_clipped, c1.posterior_variance_clipped);
    }

    #[test]
    fn test_vlb_weighted_epsilon_mse_equals_the_kl_term_with_fixed_variance() {
        use super::super::likelihood::normal_kl;
        let betas: Vec<f64> = (0..1000)
            .map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0)
            .collect();
        let mut rng = Normals(7);
        for t in [3, 400, 999] {
            let c = VlbCoefs::from_betas(&betas, t).unwrap();
            let (a, s) = (c.alpha_bar.sqrt(), (1.0 - c.alpha_bar).sqrt());
            let alpha_bar_prev = c.alpha_bar / c.alpha;
            let coef1 = c.beta * alpha_bar_prev.sqrt() / (1.0 - c.alpha_bar);
            let coef2 = (1.0 - alpha_bar_prev) * c.alpha.sqrt() / (1.0 - c.alpha_bar);
            let (x0, noise) = (rng.vec(64), rng.vec(64));
            let noise_pred: Vec<f64> = noise.iter().map(|e| e + 0.1 * rng.normal()).collect();
            let log_variance = c.posterior_variance_clipped.ln();
            let kl: f64 = (0..64)
                .map(|i| {
                    let x_t = a * x0[i] + s * noise[i];
                    let x0_pred = (x_t - s * noise_pred[i]) / a;
                    normal_kl(
                        coef1 * x0[i] + coef2 * x_t,
                        log_variance,
                        coef1 * x0_pred + coef2 * x_t,
                        log_variance,
                    )
                })
                .sum();
            let w = loss_weight(c.alpha_bar, &Weighting::Vlb, Target::Epsilon, Some(c)).unwrap();
            assert_close(w * squared_distance(&noise_pred, &noise), kl, 1e-8);
        }
    }

    #[test]
    fn test_target_errors_scale_as_snr_and_snr_plus_one_for_consistent_predictions() {
        let mut rng = Normals(1);
        for &alpha_bar in &[0.9999, 0.5, 1e-4] {
            let (a, s) = (f64::sqrt(alpha_bar), f64::sqrt(1.0 - alpha_bar));
            let snr = alpha_bar / (1.0 - alpha_bar);
            let (x0, noise) = (rng.vec(32), rng.vec(32));
            let x0_pred: Vec<f64> = x0.iter().map(|x| x + 0.3 * rng.normal()).collect();
            let x_t: Vec<f64> = (0..32).map(|i| a * x0[i] + s * noise[i]).collect();
            let noise_pred: Vec<f64> = (0..32).map(|i| (x_t[i] - a * x0_pred[i]) / s).collect();
            let v: Vec<f64> = (0..32).map(|i| a * noise[i] - s * x0[i]).collect();
            let v_pred: Vec<f64> = (0..32)
                .map(|i| a * noise_pred[i] - s * x0_pred[i])
                .collect();
            let x0_error = squared_distance(&x0_pred, &x0);
            assert_close(squared_distance(&noise_pred, &noise), snr * x0_error, 1e-9);
            assert_close(squared_distance(&v_pred, &v), (snr + 1.0) * x0_error, 1e-9);

            for kind in KINDS.iter().filter(|k| **k != Weighting::Uniform) {
                let coefs = Some(coefs_at(alpha_bar));
                let w = |target| loss_weight(alpha_bar, kind, target, coefs).unwrap();
                let reference = w(Target::X0) * x0_error;
                assert_close(
                    w(Target::Epsilon) * squared_distance(&noise_pred, &noise),
                    reference,
                    1e-9,
                );
                assert_close(
                    w(Target::V) * squared_distance(&v_pred, &v),
                    reference,
                    1e-9,
                );
            }
        }
    }

    #[test]
    fn test_uniform_is_one_for_every_target() {
        for &alpha_bar in &[0.9999, 0.5, 0.0] {
            for target in TARGETS {
                assert_eq!(
                    loss_weight(alpha_bar, &Weighting::Uniform, target, None).unwrap(),
                    1.0
                );
            }
        }
    }

    #[test]
    fn test_min_snr_is_continuous_across_gamma() {
        // SNR = γ exactly when ᾱ = γ/(1+γ).
        for gamma in [1.0, 5.0] {
            let kind = Weighting::MinSnr { gamma };
            let at = |alpha_bar: f64| loss_weight(alpha_bar, &kind, Target::Epsilon, None).unwrap();
            let alpha_bar = gamma / (1.0 + gamma);
            assert_close(at(alpha_bar - 1e-9), 1.0, 1e-12);
            assert_close(at(alpha_bar + 1e-9), 1.0, 1e-6);
        }
    }

    #[test]
    fn test_loss_weight_rejects_bad_arguments_by_name() {
        let err = loss_weight(1.0, &Weighting::Snr, Target::X0, None).unwrap_err();
        assert_eq!(err, "alpha_bar must lie in [0, 1), got 1");
        assert!(loss_weight(-0.1, &Weighting::Snr, Target::X0, None).is_err());
        assert!(loss_weight(f64::NAN, &Weighting::Uniform, Target::X0, None).is_err());
        let err =
            loss_weight(0.5, &Weighting::MinSnr { gamma: 0.0 }, Target::X0, None).unwrap_err();
        assert!(err.contains("gamma") && err.contains("got 0"), "{err}");
        let err = loss_weight(0.5, &Weighting::Vlb, Target::X0, None).unwrap_err();
        assert!(err.contains("vlb") && err.contains("got None"), "{err}");
        let mut c = coefs_at(0.5);
        c.alpha_bar = 0.4;
        let err = loss_weight(0.5, &Weighting::Vlb, Target::X0, Some(c)).unwrap_err();
        assert_eq!(err, "vlb.alpha_bar must equal alpha_bar = 0.5, got 0.4");
        let mut c = coefs_at(0.5);
        c.alpha = 0.5;
        assert!(loss_weight(0.5, &Weighting::Vlb, Target::X0, Some(c))
            .unwrap_err()
            .contains("vlb.alpha"));
        let mut c = coefs_at(0.5);
        c.posterior_variance_clipped = 0.0;
        let err = loss_weight(0.5, &Weighting::Vlb, Target::X0, Some(c)).unwrap_err();
        assert!(
            err.contains("posterior_variance_clipped") && err.contains("got 0"),
            "{err}"
        );
        assert!(VlbCoefs::from_betas(&[0.1, 0.2], 2).is_err());
        assert!(VlbCoefs::from_betas(&[0.1, 0.0], 1)
            .unwrap_err()
            .contains("index 1"));
    }
}
