//! Golden values from shared/REFERENCE.md (diffusers, OpenAI, lucidrains, Karras et al.).

use super::*;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

#[test]
fn linear_schedule_matches_ddpm_endpoints_and_terminal_alpha_bar() {
    let s = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
    assert_eq!(s.betas[0], 1e-4);
    assert_eq!(s.betas[999], 0.02);
    assert!(
        close(s.alphas_cumprod[999], 4.03583e-5, 1e-5),
        "{}",
        s.alphas_cumprod[999]
    );
}

#[test]
fn linear_scale_with_t_is_openai_form() {
    let s = Schedule::linear(100, 1e-4, 0.02, true).unwrap();
    assert!(close(s.betas[0], 1e-3, 1e-12));
    assert!(close(s.betas[99], 0.2, 1e-12));
}

#[test]
fn scaled_linear_is_square_of_linspace_of_roots() {
    let s = Schedule::scaled_linear(1000, 0.00085, 0.012).unwrap();
    assert!(close(s.betas[0], 0.00085, 1e-12));
    assert!(close(s.betas[999], 0.012, 1e-12));
    let mid = (0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) * 500.0 / 999.0).powi(2);
    assert!(close(s.betas[500], mid, 1e-12));
}

#[test]
fn cosine_schedule_golden_values() {
    let s = Schedule::cosine(1000, 0.008, 0.999).unwrap();
    assert!(close(s.betas[0], 4.128422e-5, 1e-6), "{}", s.betas[0]);
    assert!(close(s.betas[500], 3.155691e-3, 1e-6), "{}", s.betas[500]);
    assert_eq!(s.betas[999], 0.999);
    assert!(
        close(s.alphas_cumprod[999], 2.428767e-9, 1e-5),
        "{}",
        s.alphas_cumprod[999]
    );
}

#[test]
fn sigmoid_alpha_bar_golden_value() {
    let s = Schedule::sigmoid_alpha_bar(1000, -3.0, 3.0, 1.0).unwrap();
    assert!(close(s.betas[0], 3.002792e-4, 1e-5), "{}", s.betas[0]);
}

#[test]
fn sigmoid_diffusers_form_is_symmetric_around_the_midpoint() {
    let s = Schedule::sigmoid(1000, 1e-4, 0.02).unwrap();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!(close(s.betas[0], sig(-6.0) * (0.02 - 1e-4) + 1e-4, 1e-12));
    assert!(close(s.betas[0] + s.betas[999], 0.02 + 1e-4, 1e-12));
}

#[test]
fn derived_tables_follow_ddpm_equation_7() {
    let s = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
    assert_eq!(s.alphas_cumprod_prev[0], 1.0);
    assert_eq!(s.alphas_cumprod_prev[10], s.alphas_cumprod[9]);
    assert_eq!(s.posterior_variance[0], 0.0);
    // OpenAI clips the log variance at t = 0 by the value at t = 1.
    assert_eq!(
        s.posterior_log_variance_clipped[0],
        s.posterior_variance[1].ln()
    );
    for t in [1usize, 487, 999] {
        let (a, ap, b) = (s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]);
        assert!(close(
            s.posterior_variance[t],
            b * (1.0 - ap) / (1.0 - a),
            1e-12
        ));
        assert!(close(
            s.posterior_mean_coef1[t],
            b * ap.sqrt() / (1.0 - a),
            1e-12
        ));
        assert!(close(
            s.posterior_mean_coef2[t],
            (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a),
            1e-12
        ));
    }
    // diffusers' DDPM fixed_small variance fixture: t = 487 -> 0.00979, t = 999 -> 0.02.
    assert!((s.posterior_variance[487] - 0.00979).abs() < 1e-5);
    assert!((s.posterior_variance[999] - 0.02).abs() < 1e-5);
    let snr = s.snr();
    assert!(close(
        snr[10],
        s.alphas_cumprod[10] / (1.0 - s.alphas_cumprod[10]),
        1e-12
    ));
    assert!(close(s.sigmas()[10], (1.0 / snr[10]).sqrt(), 1e-12));
}

#[test]
fn zero_terminal_snr_rescale_keeps_first_and_zeroes_last() {
    let s = Schedule::scaled_linear(1000, 0.00085, 0.012).unwrap();
    let z = s.rescale_zero_terminal_snr().unwrap();
    assert_eq!(z.alphas_cumprod[999], 0.0);
    assert_eq!(z.betas[999], 1.0);
    assert!(close(z.alphas_cumprod[0], s.alphas_cumprod[0], 1e-12));
    assert_eq!(z.snr()[999], 0.0);
    // sqrt(ᾱ) is an affine map of the original: check at a middle point.
    let (f, l) = (s.alphas_cumprod[0].sqrt(), s.alphas_cumprod[999].sqrt());
    let expect = ((s.alphas_cumprod[500].sqrt() - l) * f / (f - l)).powi(2);
    assert!(close(z.alphas_cumprod[500], expect, 1e-9));
}

#[test]
fn from_alphas_cumprod_round_trips_betas() {
    let s = Schedule::cosine(50, 0.008, 0.999).unwrap();
    let r = Schedule::from_alphas_cumprod(s.alphas_cumprod.clone()).unwrap();
    assert_eq!(r.alphas_cumprod, s.alphas_cumprod);
    for (a, b) in r.betas.iter().zip(&s.betas) {
        assert!(close(*a, *b, 1e-9));
    }
}

#[test]
fn bad_schedule_parameters_are_errors() {
    assert!(Schedule::linear(0, 1e-4, 0.02, false).is_err());
    assert!(Schedule::linear(1000, 0.0, 0.02, false).is_err());
    assert!(Schedule::linear(1000, 0.02, 1e-4, false).is_err());
    assert!(Schedule::linear(10, 1e-4, 0.02, true).is_err());
    assert!(Schedule::from_betas(vec![0.1, f64::NAN]).is_err());
    assert!(Schedule::from_betas(vec![0.1, 1.5]).is_err());
    assert!(Schedule::from_alphas_cumprod(vec![0.9, 0.95]).is_err());
    assert!(Schedule::from_alphas_cumprod(vec![0.9, 0.0, 0.0]).is_err());
}

#[test]
fn spacings_match_diffusers_formulas() {
    let lead = select_timesteps(1000, Some(10), &Spacing::Leading, 0).unwrap();
    assert_eq!(lead, vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
    let lead1 = select_timesteps(1000, Some(10), &Spacing::Leading, 1).unwrap();
    assert_eq!(lead1[0], 901);
    assert_eq!(lead1[9], 1);
    let trail = select_timesteps(1000, Some(10), &Spacing::Trailing, 0).unwrap();
    assert_eq!(trail, vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    let lin = select_timesteps(1000, Some(10), &Spacing::Linspace, 0).unwrap();
    assert_eq!(lin, vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
}

#[test]
fn trailing_spacing_rounds_half_to_even() {
    // 1000 - 3 * 62.5 = 812.5 rounds to 812 (numpy), minus 1: 811, not 812.
    let trail = select_timesteps(1000, Some(16), &Spacing::Trailing, 0).unwrap();
    assert_eq!(trail[3], 811);
    assert_eq!(trail.len(), 16);
}

#[test]
fn leading_with_offset_at_full_steps_is_an_error_not_t_equals_t() {
    // diffusers issue #10003.
    assert!(select_timesteps(1000, Some(1000), &Spacing::Leading, 1).is_err());
    assert_eq!(
        select_timesteps(1000, None, &Spacing::Leading, 1)
            .unwrap()
            .len(),
        1000
    );
}

#[test]
fn openai_space_timesteps_golden_values() {
    let d = space_timesteps(1000, "ddim50").unwrap();
    assert_eq!(d.len(), 50);
    assert_eq!((d[0], d[1], d[49]), (0, 20, 980));
    let ten = space_timesteps(1000, "10").unwrap();
    assert_eq!(ten, vec![0, 111, 222, 333, 444, 555, 666, 777, 888, 999]);
    assert_eq!(
        space_timesteps(10, "1,2,3").unwrap(),
        vec![0, 4, 6, 7, 8, 9]
    );
    assert_eq!(space_timesteps(6, "3").unwrap(), vec![0, 2, 5]);
    assert!(space_timesteps(10, "20").is_err());
    // ddim7: the smallest stride with ceil(1000 / i) == 7 is 143.
    assert_eq!(
        space_timesteps(1000, "ddim7").unwrap(),
        vec![0, 143, 286, 429, 572, 715, 858]
    );
    assert!(space_timesteps(1000, "ddim999").is_err());
}

#[test]
fn respaced_betas_preserve_alphas_cumprod_on_the_subset() {
    let s = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
    let sub = space_timesteps(1000, "ddim50").unwrap();
    let r = s.respaced(&sub).unwrap();
    assert_eq!(r.len(), 50);
    assert!(close(r.betas[0], 1.0 - s.alphas_cumprod[0], 1e-12));
    assert!(close(
        r.betas[1],
        1.0 - s.alphas_cumprod[20] / s.alphas_cumprod[0],
        1e-12
    ));
    let mut acc = 1.0;
    for (i, &t) in sub.iter().enumerate() {
        acc *= 1.0 - r.betas[i];
        assert!(close(acc, s.alphas_cumprod[t as usize], 1e-9));
    }
}

#[test]
fn karras_grid_golden_values() {
    let k = karras_sigmas(5, 0.002, 80.0, 7.0).unwrap();
    let expect = [80.0, 17.5278, 2.51522, 0.169753, 0.002, 0.0];
    for (a, b) in k.iter().zip(expect) {
        assert!((a - b).abs() <= 1e-4 * b.max(1e-3), "{a} vs {b}");
    }
}

#[test]
fn cosine_log_snr_endpoints_and_inverse() {
    assert!((cosine_log_snr(0.0, -20.0, 20.0) - 20.0).abs() < 1e-9);
    assert!(cosine_log_snr(0.5, -20.0, 20.0).abs() < 1e-9);
    assert!((cosine_log_snr(1.0, -20.0, 20.0) + 20.0).abs() < 1e-9);
    for u in [0.1, 0.37, 0.9] {
        let l = cosine_log_snr(u, -20.0, 20.0);
        assert!((cosine_log_snr_inverse(l, -20.0, 20.0) - u).abs() < 1e-12);
    }
}

#[test]
fn diffusers_config_is_read_with_defaults() {
    let c = DiffusersConfig::from_json(
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "steps_offset": 1, "clip_sample": false, "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": true, "timestep_spacing": "trailing"}"#,
    )
    .unwrap();
    assert_eq!(c.num_train_timesteps, 1000);
    assert_eq!(c.steps_offset, 1);
    assert!(!c.clip_sample);
    let s = c.schedule().unwrap();
    assert_eq!(s.alphas_cumprod[999], 0.0);
    assert_eq!(c.spacing().unwrap(), Spacing::Trailing);
    assert!(
        DiffusersConfig::from_json(r#"{"beta_schedule": "quadratic"}"#)
            .unwrap()
            .schedule()
            .is_err()
    );
    assert!(DiffusersConfig::from_json("[1, 2]").is_err());
}
