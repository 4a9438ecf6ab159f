//! The candle twins compute the slice functions' numbers, and candle's autograd reproduces the
//! slice functions' analytic gradients.

use candle_core::{Device, Tensor, Var};

use super::*;
use crate::loss::{hybrid_loss as slice_hybrid, likelihood, simple};

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 40) as f32 / (1u64 << 24) as f32
}

fn grid(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| (lcg(&mut s) * 256.0).floor().min(255.0) / 127.5 - 1.0)
        .collect()
}

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n).map(|_| (lcg(&mut s) - 0.5) * 3.0).collect()
}

fn close(a: &[f32], b: &[f64], rel: f64, abs: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x as f64 - y).abs() <= abs + rel * y.abs(),
            "element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn simple_loss_value_and_gradient_match_the_slice_version() {
    let dev = Device::Cpu;
    let (o, y) = (normal(24, 1), normal(24, 2));
    let w = [1.0f64, 0.5, 2.0];
    let ov = Var::from_vec(o.clone(), (3, 2, 4), &dev).unwrap();
    let yt = Tensor::from_vec(y.clone(), (3, 2, 4), &dev).unwrap();
    let wt = Tensor::from_vec(w.iter().map(|&x| x as f32).collect::<Vec<_>>(), 3, &dev).unwrap();
    let l = simple_loss(ov.as_tensor(), &yt, Some(&wt)).unwrap();
    let grads = l.sum_all().unwrap().backward().unwrap();
    let g = to_vec_f32(
        grads
            .get(ov.as_tensor())
            .expect("model output gets a gradient"),
    )
    .unwrap();
    let mut g_ref = vec![0f32; 24];
    let l_ref = simple::simple_loss(&o, &y, 8, Some(&w), Some(&mut g_ref)).unwrap();
    close(&to_vec_f32(&l).unwrap(), &l_ref, 1e-5, 1e-7);
    close(
        &g,
        &g_ref.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        1e-5,
        1e-7,
    );
}

#[test]
fn discretized_likelihood_matches_the_slice_version_and_golden_values() {
    let dev = Device::Cpu;
    let x = [0.0f32, 1.0, -1.0, 0.5, 127.0 / 127.5 - 1.0];
    let m = [0.0f32, 0.9, -1.0, 0.0, 0.1];
    let s = [
        0.01f64.ln() as f32,
        0.1f64.ln() as f32,
        0.05f64.ln() as f32,
        0.0,
        -3.0,
    ];
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &dev).unwrap();
    let got =
        to_vec_f32(&discretized_gaussian_log_likelihood(&t(&x), &t(&m), &t(&s), 256).unwrap())
            .unwrap();
    let want: Vec<f64> = (0..5)
        .map(|i| {
            likelihood::discretized_gaussian_log_likelihood(
                x[i] as f64,
                m[i] as f64,
                s[i] as f64,
                256,
            )
            .unwrap()
        })
        .collect();
    close(&got, &want, 1e-4, 1e-5);
    close(
        &got[..4],
        &[-1.187371, -1.780969, -0.632509, -5.892573],
        1e-5,
        1e-5,
    );
}

fn setup(t: &[i64], seed: u64) -> (Schedule, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = Schedule::linear(1000, 1e-4, 0.02, false).unwrap();
    let (b, c, hw) = (t.len(), 2usize, 4usize);
    let x0 = grid(b * c * hw, seed);
    let z = normal(b * c * hw, seed + 1);
    let mut xt = vec![0f32; x0.len()];
    crate::diffusion::q_sample(&s, &[b, c, hw], &x0, t, &z, &mut xt).unwrap();
    // Model output [B, 2C, HW]: a noisy ε guess, then variance values in (-1, 1).
    let mut out = Vec::with_capacity(2 * x0.len());
    let noise2 = normal(x0.len(), seed + 2);
    let v = normal(x0.len(), seed + 3);
    for r in 0..b {
        let row = r * c * hw..(r + 1) * c * hw;
        out.extend(row.clone().map(|i| z[i] + 0.2 * noise2[i]));
        out.extend(row.map(|i| (v[i] / 2.0).clamp(-0.95, 0.95)));
    }
    (s, x0, xt, z, out)
}

#[test]
fn vb_terms_match_the_slice_version_for_every_variance_type() {
    let dev = Device::Cpu;
    let t = [0i64, 1, 300, 999];
    let (s, x0, xt, _z, out) = setup(&t, 10);
    let shape = [4usize, 2, 4];
    let tx = |v: &[f32], sh: &[usize]| Tensor::from_vec(v.to_vec(), sh.to_vec(), &dev).unwrap();
    for variance in [
        VarianceType::FixedSmall,
        VarianceType::FixedLarge,
        VarianceType::LearnedRange,
    ] {
        let got = vb_terms_bpd(
            &s,
            &tx(&x0, &shape),
            &tx(&xt, &shape),
            &t,
            &tx(&out, &[4, 4, 4]),
            Prediction::Epsilon,
            variance,
            256,
            true,
            false,
        )
        .unwrap();
        let config = crate::loss::BpdConfig {
            prediction: Prediction::Epsilon,
            variance,
            bins: 256,
            seed: 0,
            clip_denoised: true,
        };
        let n = x0.len();
        let (mut mean, mut lv, mut eps) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        crate::loss::p_mean_log_variance(
            &s, &xt, &t, &out, 8, 16, &config, &mut mean, &mut lv, &mut eps,
        )
        .unwrap();
        let rows: Vec<likelihood::VbRow> = t
            .iter()
            .map(|&ti| likelihood::VbRow {
                t: ti as usize,
                posterior_mean_coef1: s.posterior_mean_coef1[ti as usize],
                posterior_mean_coef2: s.posterior_mean_coef2[ti as usize],
                posterior_log_variance_clipped: s.posterior_log_variance_clipped[ti as usize],
            })
            .collect();
        let want = likelihood::vb_terms_bpd(&x0, &xt, 8, &rows, &mean, &lv, 256).unwrap();
        close(&to_vec_f32(&got).unwrap(), &want, 2e-3, 1e-5);
    }
}

#[test]
fn hybrid_loss_autograd_equals_the_analytic_gradient_and_freezes_the_mean() {
    let dev = Device::Cpu;
    let t = [0i64, 2, 250, 999];
    let (s, x0, xt, z, out) = setup(&t, 20);
    let shape = [4usize, 2, 4];
    let tx = |v: &[f32]| Tensor::from_vec(v.to_vec(), shape.to_vec(), &dev).unwrap();
    let ov = Var::from_vec(out.clone(), (4, 4, 4), &dev).unwrap();
    let loss = hybrid_loss(
        &s,
        &tx(&x0),
        &tx(&xt),
        &tx(&z),
        &t,
        ov.as_tensor(),
        Prediction::Epsilon,
        256,
    )
    .unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    let g = to_vec_f32(
        grads
            .get(ov.as_tensor())
            .expect("model output gets a gradient"),
    )
    .unwrap();
    let mut g_ref = vec![0f32; out.len()];
    let r = slice_hybrid(
        &s,
        &shape,
        &x0,
        &xt,
        &z,
        &t,
        &out,
        &[4, 4, 4],
        Prediction::Epsilon,
        256,
        Some(&mut g_ref),
    )
    .unwrap();
    close(&to_vec_f32(&loss).unwrap(), &r.loss, 2e-3, 1e-5);
    close(
        &g,
        &g_ref.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        2e-2,
        2e-5,
    );
    // The mean half's gradient is the mse's alone: 2 (o - ε)/D.
    for b in 0..4 {
        for j in 0..8 {
            let o = out[b * 16 + j];
            let want = 2.0 * (o - z[b * 8 + j]) / 8.0;
            assert!((g[b * 16 + j] - want).abs() < 1e-5, "row {b} element {j}");
            assert!(
                g[b * 16 + 8 + j] != 0.0,
                "variance channel {b},{j} gets no gradient"
            );
        }
    }
}

#[test]
fn loss_weights_and_targets_match_the_slice_versions() {
    let dev = Device::Cpu;
    let s = Schedule::cosine(1000, 0.008, 0.999).unwrap();
    let t = [0i64, 10, 500, 999];
    let like = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    let w = to_vec_f32(
        &loss_weights(&s, &t, &Weighting::MinSnr { gamma: 5.0 }, Target::V, &like).unwrap(),
    )
    .unwrap();
    for (k, &ti) in t.iter().enumerate() {
        let snr = s.snr()[ti as usize];
        assert!((w[k] as f64 - snr.min(5.0) / (snr + 1.0)).abs() < 1e-6 * (1.0 + w[k] as f64));
    }
    let (x0, z) = (normal(12, 5), normal(12, 6));
    let v = to_vec_f32(
        &training_target(
            &s,
            &Tensor::from_vec(x0.clone(), (4, 3), &dev).unwrap(),
            &Tensor::from_vec(z.clone(), (4, 3), &dev).unwrap(),
            &t,
            Prediction::V,
        )
        .unwrap(),
    )
    .unwrap();
    let mut v_ref = vec![0f32; 12];
    crate::diffusion::velocity(&s, &[4, 3], &x0, &t, &z, &mut v_ref).unwrap();
    close(
        &v,
        &v_ref.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        1e-5,
        1e-6,
    );
}

#[test]
fn dsm_loss_value_and_gradient_match_the_slice_version() {
    let dev = Device::Cpu;
    let (score, x0, z) = (normal(24, 31), normal(24, 32), normal(24, 33));
    let sigmas = [1.0f64, 0.1, 0.01];
    let x_noisy: Vec<f32> = (0..24)
        .map(|i| x0[i] + sigmas[i / 8] as f32 * z[i])
        .collect();
    let sv = Var::from_vec(score.clone(), (3, 8), &dev).unwrap();
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), (3, 8), &dev).unwrap();
    let loss = dsm_loss(sv.as_tensor(), &t(&x_noisy), &t(&x0), &sigmas).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    let g = to_vec_f32(
        grads
            .get(sv.as_tensor())
            .expect("score output gets a gradient"),
    )
    .unwrap();
    let mut g_ref = vec![0f32; 24];
    let want = crate::sample::langevin::dsm_loss(&score, &x_noisy, &x0, &sigmas, Some(&mut g_ref))
        .unwrap();
    close(&to_vec_f32(&loss).unwrap(), &want, 1e-4, 1e-6);
    close(
        &g,
        &g_ref.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        1e-4,
        1e-6,
    );
}
