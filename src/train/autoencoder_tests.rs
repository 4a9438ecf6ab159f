//! The adversarial part of the autoencoder objective: the patch discriminator's logit grid and
//! gradients, the adaptive weight against full back-propagation, the hinge losses recomputed
//! by hand, and the disc_start switch.

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::nn::autoencoder::{AutoencoderConfig, AutoencoderKind};
use crate::nn::discriminator::PatchDiscriminator;
use crate::nn::Ctx;

fn filled(shape: &[usize], seed: usize, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1009) as f64 / 504.5) - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn the_patch_grid_has_side_floor_s_over_2_to_the_n_minus_2_and_small_images_are_refused() {
    for layers in 1..=3 {
        let d = PatchDiscriminator::new(2, 4, layers, 0, &Device::Cpu, DType::F32).unwrap();
        for side in [8usize, 13, 28, 32] {
            let x = filled(&[2, 2, side, side], side, DType::F32);
            let want = (side >> layers) as i64 - 2;
            match d.forward(&x) {
                Ok(y) => {
                    assert!(want >= 1, "{layers} layers, side {side}");
                    assert_eq!(y.dims(), &[2, 1, want as usize, want as usize]);
                }
                Err(e) => {
                    assert!(want < 1, "{layers} layers, side {side}: {e}");
                    assert!(e.to_string().contains("too small"), "{e}");
                }
            }
        }
    }
    let d = PatchDiscriminator::new(2, 4, 1, 0, &Device::Cpu, DType::F32).unwrap();
    let wrong = filled(&[1, 3, 8, 8], 0, DType::F32);
    assert!(d
        .forward(&wrong)
        .unwrap_err()
        .to_string()
        .contains("[B, 2, H, W]"));
}

/// Central differences of Σ D(x) · probe in f64 against autograd, for the input and a few
/// entries of every parameter (BatchNorm's batch statistics included).
#[test]
fn discriminator_gradients_match_finite_differences() {
    let d = PatchDiscriminator::new(2, 4, 2, 3, &Device::Cpu, DType::F64).unwrap();
    let x = Var::from_tensor(&filled(&[3, 2, 16, 16], 1, DType::F64)).unwrap();
    let probe = filled(&[3, 1, 2, 2], 2, DType::F64);
    let loss = |d: &PatchDiscriminator, x: &Tensor| -> f64 {
        scalar(&(d.forward(x).unwrap() * &probe).unwrap().sum_all().unwrap())
    };
    let grads = (d.forward(x.as_tensor()).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut vars = d.params().named_vars();
    vars.push(("input".into(), x.clone()));
    let eps = 1e-5;
    let mut bad = Vec::new();
    for (name, v) in &vars {
        let g: Vec<f64> = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0, base.len() / 3, base.len() - 1] {
            let at = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&d, x.as_tensor())
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            if (fd - g[i]).abs() > 1e-5 * fd.abs().max(g[i].abs()) + 1e-8 {
                bad.push(format!("{name}[{i}]: autograd {} vs {fd}", g[i]));
            }
        }
    }
    assert!(bad.is_empty(), "gradient mismatches: {bad:#?}");
}

fn autoencoder(kind: AutoencoderKind) -> Model {
    let c = ModelConfig::Autoencoder(AutoencoderConfig {
        kind,
        in_channels: 1,
        out_channels: 1,
        image_size: 16,
        block_out_channels: vec![4, 8],
        layers_per_block: 1,
        latent_channels: 2,
        norm_num_groups: 2,
        mid_block_add_attention: false,
        num_vq_embeddings: 8,
        vq_embed_dim: 0,
        scaling_factor: 1.0,
    });
    Model::new(c, 5, &Device::Cpu).unwrap()
}

fn adversarial_config(reconstruction: &str, disc_start: u64) -> AutoencoderLossConfig {
    AutoencoderLossConfig {
        reconstruction: reconstruction.into(),
        sample_posterior: false,
        disc_weight: 0.5,
        disc_start,
        disc_layers: 2,
        disc_channels: 4,
        ..AutoencoderLossConfig::default()
    }
}

/// The norm of ∂loss/∂(decoder.conv_out.weight) by back-propagating through the whole
/// autoencoder (and discriminator).
fn full_gradient_norm(model: &Model, loss: &Tensor) -> f64 {
    let grads = loss.backward().unwrap();
    let w = model
        .params()
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "decoder.conv_out.weight")
        .unwrap()
        .1;
    let g = grads.get(w.as_tensor()).unwrap();
    scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt()
}

#[test]
fn the_adaptive_weight_equals_the_ratio_of_fully_backpropagated_gradient_norms() {
    for (kind, rec) in [(AutoencoderKind::Kl, "l1"), (AutoencoderKind::Vq, "l2")] {
        let model = autoencoder(kind);
        let objective =
            AutoencoderObjective::new(&adversarial_config(rec, 0), &model, 1, 1e-3).unwrap();
        let disc = &objective.adversary.as_ref().unwrap().net;
        let ae = model.autoencoder().unwrap();
        let x = filled(&[3, 1, 16, 16], 4, DType::F32);
        let out = ae.forward_train(&x, None, &Ctx::eval()).unwrap();
        let y = &out.reconstruction;
        let weight = objective
            .adversarial_weight(ae, &x, y, &out.last_hidden, disc)
            .unwrap();
        let diff = (y - &x).unwrap();
        let rec_loss = if rec == "l1" {
            diff.abs().unwrap()
        } else {
            diff.sqr().unwrap()
        }
        .mean_all()
        .unwrap();
        let adv_loss = disc.forward(y).unwrap().mean_all().unwrap().neg().unwrap();
        let want = 0.5 * full_gradient_norm(&model, &rec_loss)
            / (full_gradient_norm(&model, &adv_loss) + 1e-4);
        assert!(
            (weight - want).abs() <= 1e-4 * want,
            "{kind:?}: adaptive weight {weight} vs {want} by full back-propagation"
        );
        assert!(weight > 0.0);
    }
}

fn batch<'a>(x0: &'a [f32], shape: &'a [usize], step: u64) -> Batch<'a> {
    Batch {
        x0,
        shape,
        labels: None,
        context: None,
        null_context: None,
        control: None,
        step,
        seed: 9,
    }
}

#[test]
fn the_adversarial_term_and_the_hinge_step_start_at_disc_start() {
    let shape = [3usize, 1, 16, 16];
    let x = filled(&shape, 6, DType::F32);
    let x0: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let plain_config = AutoencoderLossConfig {
        disc_weight: 0.0,
        ..adversarial_config("l1", 2)
    };
    let model = autoencoder(AutoencoderKind::Kl);
    let mut plain = AutoencoderObjective::new(&plain_config, &model, 1, 1e-3).unwrap();
    let mut adv = AutoencoderObjective::new(&adversarial_config("l1", 2), &model, 1, 1e-3).unwrap();
    let disc_weights = |o: &AutoencoderObjective| {
        o.adversary
            .as_ref()
            .unwrap()
            .net
            .params()
            .tensors()
            .unwrap()
    };
    let ctx = Ctx::eval();

    // Before disc_start: the same losses, no discriminator step.
    let before = disc_weights(&adv);
    let a = adv
        .per_sample_loss(&model, &batch(&x0, &shape, 1), &ctx)
        .unwrap();
    let p = plain
        .per_sample_loss(&model, &batch(&x0, &shape, 1), &ctx)
        .unwrap();
    assert_eq!(a.to_vec1::<f32>().unwrap(), p.to_vec1::<f32>().unwrap());
    adv.after_step(&model).unwrap();
    assert!(adv.metrics().disc_loss.is_none() && adv.metrics().adversarial.is_none());
    for (name, t) in disc_weights(&adv) {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{name} moved before disc_start"
        );
    }

    // From disc_start: loss_i = plain_i + w · (−mean D(x̂_i)), recomputed here.
    let a = adv
        .per_sample_loss(&model, &batch(&x0, &shape, 2), &ctx)
        .unwrap();
    let p = plain
        .per_sample_loss(&model, &batch(&x0, &shape, 2), &ctx)
        .unwrap();
    let w = adv.metrics().adversarial_weight.unwrap();
    let y = model
        .autoencoder()
        .unwrap()
        .forward_train(&x, None, &ctx)
        .unwrap()
        .reconstruction;
    let net = &adv.adversary.as_ref().unwrap().net;
    let (real, fake) = (net.forward(&x).unwrap(), net.forward(&y).unwrap());
    let generator: Vec<f32> = fake
        .reshape((3, ()))
        .unwrap()
        .mean(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (a, p) = (a.to_vec1::<f32>().unwrap(), p.to_vec1::<f32>().unwrap());
    for i in 0..3 {
        let want = p[i] as f64 - w * generator[i] as f64;
        assert!(
            (a[i] as f64 - want).abs() < 1e-5,
            "row {i}: {} vs {want}",
            a[i]
        );
    }
    // The hinge loss of the discriminator on this pair, recomputed in f64 on the host.
    let hinge = |t: &Tensor, sign: f64| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter()
            .map(|&l| (1.0 + sign * l as f64).max(0.0))
            .sum::<f64>()
            / v.len() as f64
    };
    let want = 0.5 * (hinge(&real, -1.0) + hinge(&fake, 1.0));
    adv.after_step(&model).unwrap();
    let m = adv.metrics();
    assert!(
        (m.disc_loss.unwrap() - want).abs() < 1e-6,
        "{m:?} vs {want}"
    );
    assert!(m.logits_real.is_some() && m.logits_fake.is_some());
    // Every parameter takes the step except the output bias when all logits lie in (−1, 1):
    // its hinge gradient ½(−P(real < 1) + P(fake > −1)) is then exactly 0.
    let still: Vec<String> = disc_weights(&adv)
        .into_iter()
        .filter(|(name, t)| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == before[name]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
        })
        .map(|(name, _)| name)
        .collect();
    let inside = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().all(|l| l.abs() < 1.0)
    };
    if inside(&real) && inside(&fake) {
        assert_eq!(still, vec!["layers.3.bias".to_string()]);
    } else {
        assert!(still.is_empty(), "parameters that did not move: {still:?}");
    }
}

#[test]
fn bad_discriminator_settings_are_clear_errors() {
    let model = autoencoder(AutoencoderKind::Kl);
    for (config, needle) in [
        (
            AutoencoderLossConfig {
                disc_layers: 3,
                ..adversarial_config("l1", 0)
            },
            "at least 24 pixels",
        ),
        (
            AutoencoderLossConfig {
                disc_weight: -1.0,
                ..adversarial_config("l1", 0)
            },
            "disc_weight must be >= 0",
        ),
        (
            AutoencoderLossConfig {
                disc_lr: Some(0.0),
                ..adversarial_config("l1", 0)
            },
            "disc_lr must be positive",
        ),
    ] {
        let e = AutoencoderObjective::new(&config, &model, 0, 1e-3)
            .err()
            .expect("refused");
        assert!(e.to_string().contains(needle), "{e}");
    }
}
