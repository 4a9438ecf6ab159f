use super::*;
use crate::oracles::{energy_distance, GaussianMixture, SigmaMixtureDenoiser};
use crate::sample::denoiser::NoHooks;
use crate::sample::ode::{sample_adaptive, AdaptiveConfig, AdaptiveInfo};
use crate::sample::sigma::{FinalSigma, GridConfig, SigmaSpacing, TimestepMode};
use crate::sample::{randn, INITIAL_NOISE_STREAM};

fn ring(k: usize, radius: f64, std: f64) -> GaussianMixture {
    let means: Vec<f64> = (0..k)
        .flat_map(|i| {
            let a = 2.0 * std::f64::consts::PI * i as f64 / k as f64;
            [radius * a.cos(), radius * a.sin()]
        })
        .collect();
    GaussianMixture::new(vec![1.0; k], means, vec![std; k], 2).unwrap()
}

fn karras_grid(steps: usize) -> SigmaGrid {
    let cfg = GridConfig {
        steps,
        sigmas: SigmaSpacing::Karras { rho: 7.0 },
        sigma_min: Some(0.002),
        sigma_max: Some(80.0),
        final_sigma: FinalSigma::Zero,
        ..Default::default()
    };
    SigmaGrid::continuous(&cfg, Parameterization::Denoised).unwrap()
}

fn run(
    method: Method,
    steps: usize,
    x_t: &[f32],
    mixture: &GaussianMixture,
    seed: u64,
) -> Vec<f32> {
    let sampler = SigmaSampler::new(karras_grid(steps), method, None).unwrap();
    let mut d = SigmaMixtureDenoiser { mixture };
    let n = x_t.len() / 2;
    sampler
        .sample(
            &mut d,
            x_t.to_vec(),
            &[n, 2],
            seed,
            true,
            &mut NoHooks,
            Edit::default(),
        )
        .unwrap()
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    (a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64)
        .sqrt()
}

fn dpm(order: u8, algorithm: DpmAlgorithm) -> Method {
    Method::DpmSolver(DpmSolverConfig {
        algorithm,
        order,
        ..Default::default()
    })
}

/// Final-sample errors against a 2000-step Heun reference for N = `ns`.
fn errors(method: Method, ns: &[usize]) -> Vec<f64> {
    let mixture = ring(4, 1.0, 0.3);
    let n = 256;
    let x_t: Vec<f32> = randn(2 * n, 7, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    let reference = run(Method::Heun { churn: Churn::NONE }, 2000, &x_t, &mixture, 0);
    ns.iter()
        .map(|&s| rms(&run(method.clone(), s, &x_t, &mixture, 0), &reference))
        .collect()
}

fn ratios(e: &[f64]) -> Vec<f64> {
    e.windows(2).map(|w| w[0] / w[1]).collect()
}

#[test]
fn euler_error_halves_per_doubling_of_steps() {
    let e = errors(Method::Euler { churn: Churn::NONE }, &[50, 100, 200]);
    for r in ratios(&e) {
        assert!((1.7..2.4).contains(&r), "errors {e:?}");
    }
}

#[test]
fn heun_error_quarters_per_doubling_of_steps() {
    let e = errors(Method::Heun { churn: Churn::NONE }, &[25, 50, 100]);
    for r in ratios(&e) {
        assert!((3.0..5.5).contains(&r), "errors {e:?}");
    }
}

#[test]
fn dpm_solver_2m_error_quarters_per_doubling_of_steps() {
    let e = errors(dpm(2, DpmAlgorithm::DpmSolverPlusPlus), &[25, 50, 100]);
    for r in ratios(&e) {
        assert!((3.0..5.5).contains(&r), "errors {e:?}");
    }
}

#[test]
fn dpm_solver_3m_beats_2m_at_equal_steps() {
    let two = errors(dpm(2, DpmAlgorithm::DpmSolverPlusPlus), &[20]);
    let three = errors(dpm(3, DpmAlgorithm::DpmSolverPlusPlus), &[20]);
    assert!(three[0] < two[0], "3M {three:?} vs 2M {two:?}");
}

/// Energy distances between independent true samples: what sampling error cannot beat.
fn floor(mixture: &GaussianMixture, n: usize) -> f64 {
    let truth = mixture.sample(n, 100);
    (1..5)
        .map(|i| {
            energy_distance(&truth, n, &mixture.sample(n, 100 + i), n, 2)
                .unwrap()
                .abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn stochastic_samplers_reproduce_the_mixture_within_twice_the_noise_floor() {
    let mixture = ring(8, 2.0, 0.15);
    let n = 1500;
    let fl = floor(&mixture, n);
    let truth = mixture.sample(n, 99);
    let x_t: Vec<f32> = randn(2 * n, 3, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    let churn = Churn::new(40.0, 0.05, 50.0, 1.003).unwrap();
    for (name, method, steps) in [
        (
            "euler_ancestral",
            Method::EulerAncestral {
                eta: 1.0,
                s_noise: 1.0,
            },
            100,
        ),
        ("sde_dpm_2m", dpm(2, DpmAlgorithm::SdeDpmSolverPlusPlus), 50),
        ("sde_dpm_3m", dpm(3, DpmAlgorithm::SdeDpmSolverPlusPlus), 50),
        ("euler_churn", Method::Euler { churn }, 100),
        ("heun_churn", Method::Heun { churn }, 50),
    ] {
        let x = run(method, steps, &x_t, &mixture, 11);
        let d = energy_distance(&x, n, &truth, n, 2).unwrap();
        assert!(d < 2.0 * fl + 1e-3, "{name}: {d} vs floor {fl}");
    }
    // The same check catches a sampler that is off: too few Euler steps.
    let x = run(Method::Euler { churn: Churn::NONE }, 3, &x_t, &mixture, 11);
    let d = energy_distance(&x, n, &truth, n, 2).unwrap();
    assert!(d > 2.0 * fl + 1e-3, "3 Euler steps: {d} vs floor {fl}");
}

#[test]
fn step_by_step_equals_the_sample_loop() {
    // A hand loop over evaluations() with step() performs the loop's arithmetic exactly.
    let mixture = ring(4, 1.0, 0.3);
    let n = 64;
    let x_t: Vec<f32> = randn(2 * n, 5, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    for method in [
        Method::Heun { churn: Churn::NONE },
        dpm(3, DpmAlgorithm::SdeDpmSolverPlusPlus),
        Method::EulerAncestral {
            eta: 0.7,
            s_noise: 1.0,
        },
    ] {
        let sampler = SigmaSampler::new(karras_grid(6), method, None).unwrap();
        let looped = run(sampler.method.clone(), 6, &x_t, &mixture, 3);
        let mut d = SigmaMixtureDenoiser { mixture: &mixture };
        let mut state = sampler.new_state(0);
        let mut x = x_t.clone();
        for (k, e) in sampler.evaluations().iter().enumerate() {
            let out = d
                .predict_continuous(&x, &[n, 2], &vec![e.sigma; n])
                .unwrap();
            let mut next = vec![0f32; x.len()];
            sampler
                .step(
                    k,
                    &x,
                    &[n, 2],
                    &out.data,
                    &out.shape,
                    &mut state,
                    Noise::Seeded(3),
                    true,
                    &mut next,
                    None,
                )
                .unwrap();
            x = next;
        }
        assert_eq!(x, looped, "{}", sampler.method.name());
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let mixture = ring(4, 1.0, 0.3);
    let n = 40_000; // over the parallel threshold
    let x_t: Vec<f32> = randn(2 * n, 5, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    let method = dpm(2, DpmAlgorithm::SdeDpmSolverPlusPlus);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let a = one.install(|| run(method.clone(), 4, &x_t, &mixture, 9));
    let b = three.install(|| run(method.clone(), 4, &x_t, &mixture, 9));
    assert_eq!(a, b);
}

#[test]
fn heun_ends_with_an_euler_step_and_interleaves_like_diffusers() {
    let g = karras_grid(4);
    let s = SigmaSampler::new(g.clone(), Method::Heun { churn: Churn::NONE }, None).unwrap();
    let sig: Vec<f64> = s.evaluations().iter().map(|e| e.sigma).collect();
    assert_eq!(
        sig,
        vec![
            g.sigmas[0],
            g.sigmas[1],
            g.sigmas[1],
            g.sigmas[2],
            g.sigmas[2],
            g.sigmas[3],
            g.sigmas[3]
        ]
    );
}

#[test]
fn multistep_state_out_of_order_is_an_error() {
    let s = SigmaSampler::new(
        karras_grid(4),
        dpm(2, DpmAlgorithm::DpmSolverPlusPlus),
        None,
    )
    .unwrap();
    let mut st = s.new_state(0);
    let x = vec![0.5f32; 4];
    let mut out = vec![0f32; 4];
    let err = s.step(
        1,
        &x,
        &[2, 2],
        &x,
        &[2, 2],
        &mut st,
        Noise::Seeded(0),
        true,
        &mut out,
        None,
    );
    assert!(err.is_err());
    let nan = vec![f32::NAN; 4];
    let err = s.step(
        0,
        &x,
        &[2, 2],
        &nan,
        &[2, 2],
        &mut st,
        Noise::Seeded(0),
        true,
        &mut out,
        None,
    );
    assert!(matches!(err, Err(Error::NonFiniteSigma { step: 0, .. })));
}

#[test]
fn grid_with_timestep_mode_nearest_gives_integral_timesteps() {
    let sched = crate::schedule::Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
    let cfg = GridConfig {
        steps: 7,
        timestep_mode: TimestepMode::Nearest,
        ..Default::default()
    };
    let g = SigmaGrid::for_schedule(
        &sched,
        crate::sample::sigma::TimestepRule::Euler,
        &cfg,
        Prediction::Epsilon,
    )
    .unwrap();
    assert!(g.timesteps.iter().all(|t| t.fract() == 0.0));
}

fn adaptive(
    config: AdaptiveConfig,
    x_t: &[f32],
    mixture: &GaussianMixture,
) -> (Vec<f32>, AdaptiveInfo) {
    let grid = SigmaGrid::explicit(
        vec![config.sigma_max, config.sigma_min],
        None,
        TimestepMode::Interpolate,
        Parameterization::Denoised,
    )
    .unwrap();
    let mut d = SigmaMixtureDenoiser { mixture };
    let n = x_t.len() / 2;
    sample_adaptive(
        &config,
        &grid,
        &mut d,
        x_t.to_vec(),
        &[n, 2],
        0,
        true,
        &mut NoHooks,
    )
    .unwrap()
}

#[test]
fn adaptive_solver_meets_tighter_tolerances_with_more_evaluations() {
    let mixture = ring(4, 1.0, 0.3);
    let n = 256;
    let x_t: Vec<f32> = randn(2 * n, 7, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    let reference = run(Method::Heun { churn: Churn::NONE }, 2000, &x_t, &mixture, 0);
    let mut last = (f64::INFINITY, 0usize);
    for (order, rtol, atol) in [
        (3u8, 0.05, 0.0078),
        (3, 0.005, 0.00078),
        (3, 0.0005, 0.000078),
        (2, 0.005, 0.00078),
    ] {
        let config = AdaptiveConfig {
            order,
            rtol,
            atol,
            ..Default::default()
        };
        let (x, info) = adaptive(config, &x_t, &mixture);
        let err = rms(&x, &reference);
        assert_eq!(
            info.nfe,
            info.accepted * order as usize + info.rejected * order as usize + 1,
            "{info:?}"
        );
        if order == 3 {
            assert!(
                err < last.0 && info.nfe > last.1,
                "rtol {rtol}: error {err}, {info:?}, before {last:?}"
            );
            last = (err, info.nfe);
        }
        // every setting tracks the ODE's solution closely
        assert!(err < 0.05, "order {order} rtol {rtol}: {err}");
    }
    assert!(last.0 < 2e-3, "{last:?}");
}

#[test]
fn adaptive_solver_with_eta_samples_the_mixture() {
    let mixture = ring(8, 2.0, 0.15);
    let n = 1500;
    let fl = floor(&mixture, n);
    let x_t: Vec<f32> = randn(2 * n, 3, INITIAL_NOISE_STREAM)
        .iter()
        .map(|v| v * 80.0)
        .collect();
    let config = AdaptiveConfig {
        eta: 1.0,
        rtol: 0.02,
        atol: 0.003,
        ..Default::default()
    };
    let (x, info) = adaptive(config, &x_t, &mixture);
    let d = energy_distance(&x, n, &mixture.sample(n, 99), n, 2).unwrap();
    assert!(d < 2.0 * fl + 1e-3, "{d} vs {fl}, {info:?}");
}

#[test]
fn adaptive_settings_are_checked() {
    for bad in [
        AdaptiveConfig {
            order: 1,
            ..Default::default()
        },
        AdaptiveConfig {
            rtol: 0.0,
            atol: 0.0,
            ..Default::default()
        },
        AdaptiveConfig {
            sigma_min: 0.0,
            ..Default::default()
        },
        AdaptiveConfig {
            h_init: -1.0,
            ..Default::default()
        },
    ] {
        assert!(bad.check().is_err(), "{bad:?}");
    }
}

#[test]
fn ode_likelihood_of_the_mixture_equals_its_true_log_density() {
    use crate::sample::ode::likelihood::{ode_log_likelihood, MixtureFlow, OdeLikelihoodConfig};
    let mixture = ring(8, 2.0, 0.15);
    let pts = mixture.sample(64, 3);
    let x: Vec<f64> = pts.iter().map(|&v| v as f64).collect();
    let config = OdeLikelihoodConfig {
        sigma_min: 0.002,
        sigma_max: 80.0,
        data_variance: 4.0, // the ring's radius², the spread of its means
        rtol: 1e-5,
        atol: 1e-5,
    };
    let (ll, info) = ode_log_likelihood(
        &mut MixtureFlow { mixture: &mixture },
        &x,
        64,
        &config,
        |_| Ok(()),
    )
    .unwrap();
    let truth = mixture.log_density(&x, 0.002);
    let mean_truth = truth.iter().sum::<f64>() / 64.0;
    let mean_ll = ll.iter().sum::<f64>() / 64.0;
    assert!(
        (mean_ll - mean_truth).abs() < 0.01 * mean_truth.abs(),
        "{mean_ll} vs {mean_truth}, {info:?}"
    );
    for (a, b) in ll.iter().zip(&truth) {
        assert!((a - b).abs() < 0.02 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert!(info.nfe > 10 && info.rejected < info.accepted);
}

#[test]
fn hutchinson_by_differences_is_unbiased_for_the_mixture() {
    use crate::sample::ode::likelihood::{
        rademacher, FiniteDifferenceFlow, FlowField, MixtureFlow,
    };
    let mixture = ring(4, 1.0, 0.3);
    let x: Vec<f64> = mixture.sample(1, 4).iter().map(|&v| v as f64).collect();
    let (_, exact) = MixtureFlow { mixture: &mixture }.field(&x, 0.7).unwrap();
    let mut den = |xs: &[f32], sigma: f64| -> Result<Vec<f32>> {
        let mut out = vec![0f32; xs.len()];
        SigmaMixtureDenoiser { mixture: &mixture }.denoise(
            xs,
            &vec![sigma; xs.len() / 2],
            &mut out,
        );
        Ok(out)
    };
    let mut total = 0.0;
    let probes_n = 400;
    for seed in 0..probes_n {
        let mut flow = FiniteDifferenceFlow {
            denoise: &mut den,
            probes: rademacher(2, seed),
            delta: 1e-2,
            dim: 2,
        };
        total += flow.field(&x, 0.7).unwrap().1[0];
    }
    let mean = total / probes_n as f64;
    assert!(
        (mean - exact[0]).abs() < 0.05 * exact[0].abs().max(1.0),
        "{mean} vs {}",
        exact[0]
    );
}
