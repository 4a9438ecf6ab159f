//! Sampler golden values (diffusers' fixtures, REFERENCE.md) and analytic checks.

use super::*;
use crate::oracles::{GaussianMixture, MixtureDenoiser};
use crate::schedule::Spacing;

fn linear() -> Schedule {
    Schedule::linear(1000, 1e-4, 0.02, false).unwrap()
}

/// diffusers' `dummy_sample_deter`: arange(768).reshape(3, 8, 8, 4) / 768, permuted to (4, 3, 8, 8).
fn dummy_sample() -> Vec<f32> {
    let mut out = vec![0f32; 768];
    for c in 0..3 {
        for h in 0..8 {
            for w in 0..8 {
                for b in 0..4 {
                    let src = ((c * 8 + h) * 8 + w) * 4 + b;
                    out[((b * 3 + c) * 8 + h) * 8 + w] = src as f32 / 768.0;
                }
            }
        }
    }
    out
}

/// diffusers' dummy model: x · t / (t + 1).
struct DummyModel;
impl Denoiser for DummyModel {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        let t = t[0] as f32;
        Ok(ModelOutput {
            data: x.iter().map(|v| v * t / (t + 1.0)).collect(),
            shape: shape.to_vec(),
        })
    }
}

fn ddim_full_loop(schedule: Schedule, config: DdimConfig) -> (f64, f64) {
    let d = Ddim::new(schedule, config).unwrap();
    let x = sample_loop(
        &d,
        &mut DummyModel,
        dummy_sample(),
        &[4, 3, 8, 8],
        0,
        true,
        &mut NoHooks,
    )
    .unwrap();
    let sum: f64 = x.iter().map(|v| v.abs() as f64).sum();
    (sum, sum / x.len() as f64)
}

fn diffusers_ddim(prediction: Prediction, set_alpha_to_one: bool) -> DdimConfig {
    DdimConfig {
        steps: 10,
        prediction,
        x0_processing: X0Processing::Clip(1.0),
        set_alpha_to_one,
        ..DdimConfig::default()
    }
}

#[test]
fn ddim_full_loop_matches_diffusers_fixture_epsilon() {
    let (sum, mean) = ddim_full_loop(linear(), diffusers_ddim(Prediction::Epsilon, true));
    assert!((sum - 172.0067).abs() < 1e-2, "{sum}");
    assert!((mean - 0.223967).abs() < 1e-3, "{mean}");
}

#[test]
fn ddim_full_loop_matches_diffusers_fixture_v_prediction() {
    let (sum, mean) = ddim_full_loop(linear(), diffusers_ddim(Prediction::V, true));
    assert!((sum - 52.5302).abs() < 1e-2, "{sum}");
    assert!((mean - 0.0684).abs() < 1e-3, "{mean}");
}

#[test]
fn ddim_full_loop_matches_diffusers_fixture_set_alpha_to_one() {
    let s = Schedule::linear(1000, 0.01, 0.02, false).unwrap();
    let (sum, mean) = ddim_full_loop(s.clone(), diffusers_ddim(Prediction::Epsilon, true));
    assert!((sum - 149.8295).abs() < 1e-2, "{sum}");
    assert!((mean - 0.1951).abs() < 1e-3, "{mean}");
    let (sum, mean) = ddim_full_loop(s, diffusers_ddim(Prediction::Epsilon, false));
    assert!((sum - 149.0784).abs() < 1e-2, "{sum}");
    assert!((mean - 0.1941).abs() < 1e-3, "{mean}");
}

#[test]
fn ddim_variance_matches_diffusers_fixture() {
    let d = Ddim::new(linear(), DdimConfig::default()).unwrap();
    let a = &d.schedule.alphas_cumprod;
    for ((t, p), v) in [
        ((420, 400), 0.14771),
        ((980, 960), 0.32460),
        ((487, 486), 0.00979),
        ((999, 998), 0.02),
    ] {
        let got = d.variance(a[t], a[p]);
        assert!((got - v).abs() < 1e-5, "({t}, {p}): {got} vs {v}");
    }
}

#[test]
fn ddim_eta_one_variance_equals_posterior_variance() {
    let s = linear();
    let d = Ddim::new(
        s.clone(),
        DdimConfig {
            steps: 1000,
            eta: 1.0,
            ..DdimConfig::default()
        },
    )
    .unwrap();
    let rows = d.row_steps(&[500]).unwrap();
    let sigma2 = (rows[0].noise_std as f64).powi(2);
    assert!((sigma2 - 1.0051335779e-2).abs() < 1e-8, "{sigma2}");
    assert!((sigma2 - s.posterior_variance[500]).abs() < 1e-8);
}

#[test]
fn ddpm_full_schedule_variances_match_diffusers_fixture() {
    let d = Ddpm::new(linear(), DdpmConfig::default()).unwrap();
    let p = |t: i64| d.timesteps().iter().position(|&x| x == t).unwrap();
    assert_eq!(d.step_variances(p(0)).1, 1e-20);
    assert!((d.step_variances(p(487)).1 - 0.00979).abs() < 1e-5);
    assert!((d.step_variances(p(999)).1 - 0.02).abs() < 1e-5);
}

#[test]
fn strided_ddpm_uses_respaced_betas() {
    let s = linear();
    let cfg = DdpmConfig {
        steps: None,
        spacing: Spacing::OpenAi("ddim50".into()),
        ..DdpmConfig::default()
    };
    let d = Ddpm::new(s.clone(), cfg).unwrap();
    assert_eq!(d.timesteps()[0], 980);
    let r = s
        .respaced(&crate::schedule::space_timesteps(1000, "ddim50").unwrap())
        .unwrap();
    // Position 0 is t = 980 = respaced index 49.
    let (beta, post) = d.step_variances(0);
    assert!((beta - r.betas[49]).abs() < 1e-12);
    assert!((post - r.posterior_variance[49]).abs() < 1e-12);
    let rows = d.row_steps(&[980]).unwrap();
    assert!((rows[0].prev_from_x0 as f64 - r.posterior_mean_coef1[49]).abs() < 1e-6);
    assert!((rows[0].prev_from_x as f64 - r.posterior_mean_coef2[49]).abs() < 1e-6);
}

#[test]
fn ddim_previous_timestep_follows_its_list_for_linspace() {
    let cfg = DdimConfig {
        steps: 10,
        spacing: Spacing::Linspace,
        ..DdimConfig::default()
    };
    let d = Ddim::new(linear(), cfg).unwrap();
    assert_eq!(d.timesteps()[1], 888);
    let rows = d.row_steps(&[999]).unwrap();
    // x0 coefficient of the step to 888 is sqrt(ᾱ_888).
    let expect = d.schedule.alphas_cumprod[888].sqrt();
    assert!((rows[0].prev_from_x0 as f64 - expect).abs() < 1e-7);
}

#[test]
fn timestep_not_in_list_is_an_error_naming_the_list() {
    let d = Ddim::new(
        linear(),
        DdimConfig {
            steps: 10,
            ..DdimConfig::default()
        },
    )
    .unwrap();
    let e = d.row_steps(&[901]).unwrap_err().to_string();
    assert!(e.contains("901") && e.contains("900"), "{e}");
}

#[test]
fn seeded_step_noise_is_independent_of_chunking() {
    // A large step uses rayon chunks; compare with element-wise reference noise.
    let s = linear();
    let d = Ddpm::new(s, DdpmConfig::default()).unwrap();
    let n = 70_001;
    let x = vec![0f32; n];
    let m = vec![0f32; n];
    let mut out = vec![0f32; n];
    let args = StepArgs {
        model_output: &m,
        model_shape: &[1, n],
        t: &[500],
        x: Some(&x),
        x_shape: &[1, n],
        noise: crate::kernels::Noise::Seeded(7),
        check_finite: true,
    };
    step_into(&d, &args, &mut out, None).unwrap();
    let sigma = d
        .step_variances(d.timesteps().iter().position(|&t| t == 500).unwrap())
        .1
        .sqrt() as f32;
    let mut z = vec![0f32; n];
    crate::kernels::rng::fill_normal(7, 500, 0, &mut z);
    for i in (0..n).step_by(997) {
        assert_eq!(out[i], sigma * z[i]);
    }
}

#[test]
fn nan_model_output_is_reported_with_its_timestep() {
    let d = Ddim::new(
        linear(),
        DdimConfig {
            steps: 10,
            x0_processing: X0Processing::Clip(1.0),
            ..DdimConfig::default()
        },
    )
    .unwrap();
    let x = vec![0.5f32; 8];
    let mut m = vec![0.1f32; 8];
    m[5] = f32::NAN;
    let mut out = vec![0f32; 8];
    let args = StepArgs {
        model_output: &m,
        model_shape: &[2, 4],
        t: &[300, 300],
        x: Some(&x),
        x_shape: &[2, 4],
        noise: crate::kernels::Noise::Seeded(0),
        check_finite: true,
    };
    match step_into(&d, &args, &mut out, None) {
        Err(crate::Error::NonFinite { timestep }) => assert_eq!(timestep, 300),
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn ddim_eta_zero_with_exact_denoiser_of_a_point_mass_recovers_it() {
    // Data = a single point μ (a mixture with one tiny-variance component): DDIM η = 0 must land on μ.
    let mix = GaussianMixture::new(vec![1.0], vec![0.7, -1.2], vec![1e-3], 2).unwrap();
    let s = linear();
    let d = Ddim::new(
        s.clone(),
        DdimConfig {
            steps: 50,
            ..DdimConfig::default()
        },
    )
    .unwrap();
    let mut den = MixtureDenoiser {
        mixture: &mix,
        schedule: &s,
        prediction: Prediction::Epsilon,
    };
    let x_t = randn(2 * 16, 3, INITIAL_NOISE_STREAM);
    let x = sample_loop(&d, &mut den, x_t, &[16, 2], 3, true, &mut NoHooks).unwrap();
    for row in x.chunks(2) {
        assert!(
            (row[0] - 0.7).abs() < 1e-2 && (row[1] + 1.2).abs() < 1e-2,
            "{row:?}"
        );
    }
}

#[test]
fn dynamic_threshold_scale_is_the_interpolated_quantile() {
    let rows = vec![base_row(Prediction::X0, 0.5, 10)];
    let x = vec![0f32; 5];
    let m = vec![0.5f32, -3.0, 2.0, 1.5, -4.0];
    // |x0| sorted: 0.5, 1.5, 2, 3, 4; quantile 0.9 -> pos 3.6 -> 3 + 0.6 * 1 = 3.6.
    let s = crate::kernels::threshold_scales(&rows, 5, &x, &m, 5, 0.9, None);
    assert!((s[0] - 3.6).abs() < 1e-6);
    let s = crate::kernels::threshold_scales(&rows, 5, &x, &m, 5, 0.9, Some(1.0));
    assert_eq!(s[0], 1.0);
}

#[test]
fn seeded_noise_of_tiny_rows_uses_global_indices_and_row_streams() {
    let d = Ddpm::new(linear(), DdpmConfig::default()).unwrap();
    let (b, l) = (300usize, 2usize);
    let x = vec![0f32; b * l];
    let m = vec![0f32; b * l];
    let sigma = |t: i64| {
        d.step_variances(d.timesteps().iter().position(|&x| x == t).unwrap())
            .1
            .sqrt() as f32
    };
    // Shared timestep: one stream; mixed timesteps: each row draws from its own stream.
    for ts in [
        vec![700i64; b],
        (0..b)
            .map(|i| if i % 3 == 0 { 700 } else { 400 })
            .collect::<Vec<_>>(),
    ] {
        let mut out = vec![0f32; b * l];
        let args = StepArgs {
            model_output: &m,
            model_shape: &[b, l],
            t: &ts,
            x: Some(&x),
            x_shape: &[b, l],
            noise: crate::kernels::Noise::Seeded(9),
            check_finite: true,
        };
        step_into(&d, &args, &mut out, None).unwrap();
        for (row, &t) in ts.iter().enumerate() {
            let mut z = [0f32; 2];
            crate::kernels::rng::fill_normal(9, t as u64, (row * l) as u64, &mut z);
            assert_eq!(
                &out[row * l..row * l + l],
                &[sigma(t) * z[0], sigma(t) * z[1]],
                "row {row}"
            );
        }
    }
}
