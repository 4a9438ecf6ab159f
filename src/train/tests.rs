use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use super::*;
use crate::nn::{MlpConfig, ModelConfig, UNetConfig};

fn ring_data(n: usize) -> Vec<f32> {
    (0..n)
        .flat_map(|i| {
            let a = i as f32 * 2.399_963;
            [a.cos(), a.sin() * 0.5]
        })
        .collect()
}

fn mlp(num_classes: usize, learn_sigma: bool) -> Model {
    let c = ModelConfig::Mlp(MlpConfig {
        data_shape: vec![2],
        hidden: 32,
        blocks: 2,
        time_embed_dim: 16,
        num_classes,
        dropout: 0.1,
        learn_sigma,
        skip_rescale: false,
    });
    Model::new(c, 3, &Device::Cpu).unwrap()
}

fn schedule() -> Schedule {
    Schedule::linear(100, 1e-4, 0.02, true).unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        batch_size: 16,
        lr: 2e-3,
        lr_schedule: LrDecay::Cosine,
        warmup_steps: 3,
        total_steps: 40,
        seed: 11,
        class_dropout: 0.2,
        ..TrainConfig::default()
    }
}

fn labels(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| i % 3).collect()
}

fn flat(m: &HashMap<String, Tensor>) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferrodiff-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn adamw_matches_a_scalar_reference_over_three_steps() {
    let v = Var::from_vec(vec![0.5f32, -1.0, 2.0], 3, &Device::Cpu).unwrap();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vec![("w".into(), v.clone())], cfg).unwrap();
    let (mut theta, mut m, mut s) = (vec![0.5f64, -1.0, 2.0], [0f64; 3], [0f64; 3]);
    for step in 1..=3 {
        // loss = Σ θ³ / 3 + θ → gradient θ² + 1
        let loss = ((v.as_tensor().powf(3.0).unwrap() / 3.0).unwrap() + v.as_tensor()).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        opt.step(&grads, 0.01, 1.0).unwrap();
        for i in 0..3 {
            let g = theta[i] * theta[i] + 1.0;
            m[i] = 0.9 * m[i] + 0.1 * g;
            s[i] = 0.999 * s[i] + 0.001 * g * g;
            let mh = m[i] / (1.0 - 0.9f64.powi(step));
            let sh = s[i] / (1.0 - 0.999f64.powi(step));
            theta[i] = theta[i] * (1.0 - 0.01 * 0.1) - 0.01 * mh / (sh.sqrt() + 1e-8);
        }
    }
    let got = v.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..3 {
        assert!(
            (got[i] as f64 - theta[i]).abs() < 1e-5,
            "{got:?} vs {theta:?}"
        );
    }
}

#[test]
fn ema_decay_follows_diffusers_warmup_formula() {
    let c = EmaConfig::default();
    assert_eq!(c.decay(1), 0.0);
    assert!((c.decay(2) - (1.0 - 2f64.powf(-0.75))).abs() < 1e-15);
    assert!((c.decay(101) - (1.0 - 101f64.powf(-0.75))).abs() < 1e-15);
    assert_eq!(c.decay(10_000_000_000), 0.9999);
    let plain = EmaConfig {
        use_warmup: false,
        ..c
    };
    assert!((plain.decay(11) - 11.0 / 20.0).abs() < 1e-15);
    let late = EmaConfig {
        update_after_step: 5,
        ..c
    };
    assert_eq!(late.decay(6), 0.0);
    assert!(late.decay(7) > 0.0);
}

#[test]
fn lr_schedules_warm_up_then_decay() {
    assert_eq!(lr_factor(LrDecay::Constant, 4, 0, 0), 0.25);
    assert_eq!(lr_factor(LrDecay::Constant, 4, 0, 3), 1.0);
    assert_eq!(lr_factor(LrDecay::Constant, 4, 0, 1000), 1.0);
    assert_eq!(lr_factor(LrDecay::Linear, 0, 10, 5), 0.5);
    assert!((lr_factor(LrDecay::Cosine, 2, 12, 7) - 0.5).abs() < 1e-12);
    assert_eq!(lr_factor(LrDecay::Cosine, 2, 12, 12), 0.0);
    assert_eq!(lr_factor(LrDecay::Linear, 2, 12, 50), 0.0);
}

#[test]
fn the_same_seed_gives_the_same_losses_and_weights() {
    let run = || {
        let mut t = Trainer::new(
            mlp(3, false),
            schedule(),
            config(),
            ring_data(50),
            vec![2],
            Some(labels(50)),
        )
        .unwrap();
        t.train(12, None, &mut NoTrainHooks).unwrap();
        (
            t.losses.clone(),
            flat(&t.model().params().tensors().unwrap()),
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn a_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one() {
    let dir = tmpdir("resume");
    let cfg = TrainConfig {
        timestep_sampling: "loss_second_moment".into(),
        ..config()
    };
    let mut full = Trainer::new(
        mlp(3, false),
        schedule(),
        cfg.clone(),
        ring_data(50),
        vec![2],
        Some(labels(50)),
    )
    .unwrap();
    full.train(30, None, &mut NoTrainHooks).unwrap();

    let mut first = Trainer::new(
        mlp(3, false),
        schedule(),
        cfg,
        ring_data(50),
        vec![2],
        Some(labels(50)),
    )
    .unwrap();
    first.train(13, Some((&dir, 5)), &mut NoTrainHooks).unwrap();
    drop(first);
    let mut resumed =
        Trainer::resume(&dir, ring_data(50), vec![2], Some(labels(50)), &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 13);
    resumed.train(17, None, &mut NoTrainHooks).unwrap();

    assert_eq!(resumed.losses, full.losses);
    assert_eq!(
        flat(&resumed.model().params().tensors().unwrap()),
        flat(&full.model().params().tensors().unwrap())
    );
    assert_eq!(
        flat(&resumed.ema.tensors().unwrap()),
        flat(&full.ema.tensors().unwrap())
    );
    assert!(dir.join(CONFIG_FILE).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn training_lowers_the_loss_and_the_ema_model_is_a_working_denoiser() {
    let cfg = TrainConfig {
        lr_schedule: LrDecay::Constant,
        batch_size: 64,
        ..config()
    };
    let mut t = Trainer::new(
        mlp(3, false),
        schedule(),
        cfg,
        ring_data(256),
        vec![2],
        Some(labels(256)),
    )
    .unwrap();
    t.train(200, None, &mut NoTrainHooks).unwrap();
    let first: f32 = t.losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = t.losses[180..].iter().sum::<f32>() / 20.0;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let ema = t.ema_model().unwrap();
    let out = ema
        .predict_host(
            &ring_data(4),
            &[4, 2],
            &[10, 10, 10, 10],
            Some(&[0, 1, 2, 3]),
        )
        .unwrap();
    assert_eq!(out.shape, vec![4, 2]);
    assert!(out.data.iter().all(|v| v.is_finite()));
}

#[test]
fn hybrid_loss_trains_a_learned_variance_model() {
    let cfg = TrainConfig {
        loss: "hybrid".into(),
        class_dropout: 0.0,
        ..config()
    };
    let mut t = Trainer::new(mlp(0, true), schedule(), cfg, ring_data(50), vec![2], None).unwrap();
    t.train(5, None, &mut NoTrainHooks).unwrap();
    assert!(t.losses.iter().all(|l| l.is_finite()));
}

#[test]
fn a_unet_trains_on_images() {
    let c = ModelConfig::Unet(UNetConfig {
        base_channels: 8,
        groups: 4,
        ..UNetConfig::default()
    });
    let model = Model::new(c, 0, &Device::Cpu).unwrap();
    let data: Vec<f32> = (0..4 * 64).map(|i| ((i % 9) as f32 / 4.0) - 1.0).collect();
    let cfg = TrainConfig {
        batch_size: 4,
        class_dropout: 0.0,
        ..config()
    };
    let mut t = Trainer::new(model, schedule(), cfg, data, vec![1, 8, 8], None).unwrap();
    t.train(3, None, &mut NoTrainHooks).unwrap();
    assert_eq!(t.losses.len(), 3);
}

#[test]
fn bad_settings_are_value_errors() {
    let make = |cfg: TrainConfig, model: Model, labels: Option<Vec<u32>>| {
        Trainer::new(model, schedule(), cfg, ring_data(8), vec![2], labels)
            .err()
            .map(|e| e.to_string())
    };
    let e = make(config(), mlp(3, false), None).unwrap();
    assert!(e.contains("no labels"), "{e}");
    let e = make(
        TrainConfig {
            class_dropout: 0.0,
            ..config()
        },
        mlp(0, false),
        Some(labels(8)),
    )
    .unwrap();
    assert!(e.contains("unconditional"), "{e}");
    let e = make(
        TrainConfig {
            loss: "hybrid".into(),
            ..config()
        },
        mlp(3, false),
        Some(labels(8)),
    )
    .unwrap();
    assert!(e.contains("learn_sigma"), "{e}");
    let e = make(
        TrainConfig {
            lr: -1.0,
            ..config()
        },
        mlp(3, false),
        Some(labels(8)),
    )
    .unwrap();
    assert!(e.contains("lr"), "{e}");
    let e = make(
        TrainConfig {
            weighting: "snrr".into(),
            ..config()
        },
        mlp(3, false),
        Some(labels(8)),
    )
    .unwrap();
    assert!(e.contains("snrr"), "{e}");
    let e = Trainer::new(
        mlp(0, false),
        schedule(),
        TrainConfig {
            class_dropout: 0.0,
            ..config()
        },
        ring_data(8),
        vec![1, 2],
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("[2]"), "{e}");
}

#[test]
fn a_checkpoint_of_another_configuration_is_refused() {
    let dir = tmpdir("other-config");
    let t = Trainer::new(
        mlp(3, false),
        schedule(),
        config(),
        ring_data(8),
        vec![2],
        Some(labels(8)),
    )
    .unwrap();
    t.save(&dir).unwrap();
    let other = mlp(0, false);
    let (tensors, _) = checkpoint::load(&dir.join(CHECKPOINT_FILE), &Device::Cpu).unwrap();
    let e = other
        .params()
        .load(&checkpoint::with_prefix(&tensors, "model"), "ckpt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("class_embedding"), "{e}");
    let e = Trainer::resume(&dir, ring_data(9), vec![2], Some(labels(9)), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("same data"), "{e}");
    let model = load_model(&dir, &Device::Cpu, true).unwrap();
    assert_eq!(model.config(), t.model().config());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_or_missing_checkpoint_names_the_file() {
    let dir = tmpdir("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.safetensors");
    std::fs::write(&f, b"not a checkpoint").unwrap();
    let e = load_model(&f, &Device::Cpu, true).err().unwrap();
    assert!(
        matches!(e, Error::BadFile { .. }) && e.to_string().contains("x.safetensors"),
        "{e}"
    );
    let e = load_model(&dir.join("missing.safetensors"), &Device::Cpu, true)
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::Io {
                not_found: true,
                ..
            }
        ),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
    let dir = tmpdir("atomic");
    let f = dir.join("a.bin");
    checkpoint::write_atomic(&f, b"one").unwrap();
    checkpoint::write_atomic(&f, b"two").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"two");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
