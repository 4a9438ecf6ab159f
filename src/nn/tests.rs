use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::layers::{softmax_last, timestep_embedding, Ctx};
use super::*;

fn mlp_config() -> ModelConfig {
    ModelConfig::Mlp(MlpConfig {
        data_shape: vec![3],
        hidden: 16,
        blocks: 2,
        time_embed_dim: 8,
        num_classes: 3,
        dropout: 0.1,
        learn_sigma: false,
        skip_rescale: true,
    })
}

fn unet_config(resblock_updown: bool, scale_shift: bool) -> ModelConfig {
    ModelConfig::Unet(UNetConfig {
        in_channels: 2,
        image_size: 8,
        base_channels: 8,
        channel_mult: vec![1, 2],
        num_res_blocks: 1.into(),
        attention_resolutions: vec![4],
        num_heads: 2,
        dropout: 0.1,
        groups: 4,
        scale_shift,
        resblock_updown,
        skip_rescale: resblock_updown,
        num_classes: 3,
        learn_sigma: true,
        context_dim: 0,
        guidance_embed: false,
        cond_channels: 0,
        aug_embed: false,
        downsample_first: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        downsample_padding: 1,
        norm_eps: 1e-5,
    })
}

/// The original DDPM checkpoints' conventions: [sin, cos] time embedding with shifted
/// frequencies, bottom/right-padded strided convolutions, GroupNorm ε 1e-6.
fn ddpm_convention_unet_config() -> ModelConfig {
    match unet_config(false, false) {
        ModelConfig::Unet(c) => ModelConfig::Unet(UNetConfig {
            flip_sin_to_cos: false,
            freq_shift: 1.0,
            downsample_padding: 0,
            norm_eps: 1e-6,
            image_size: 6,
            ..c
        }),
        _ => unreachable!(),
    }
}

/// Imagen's Efficient U-Net options: two blocks at the low resolution, one at the high, and
/// every level downsampling before its blocks (attention at the 2x2 level of an 8x8 input).
fn efficient_unet_config() -> ModelConfig {
    match unet_config(false, true) {
        ModelConfig::Unet(c) => ModelConfig::Unet(UNetConfig {
            num_res_blocks: unet::ResBlocks::PerLevel(vec![1, 2]),
            downsample_first: true,
            attention_resolutions: vec![2],
            ..c
        }),
        _ => unreachable!(),
    }
}

#[test]
fn a_guidance_embedding_starts_as_the_plain_network_and_then_reads_w() {
    let plain = unet_config(false, true);
    let ModelConfig::Unet(mut c) = plain.clone() else {
        unreachable!()
    };
    c.guidance_embed = true;
    let base = Model::new(plain, 4, &Device::Cpu).unwrap();
    // Seeded everything: every parameter (the zero-initialised ones too) moved by small noise.
    let seeded = |shape: &[usize], seed: u64, std: f32| {
        let n = shape.iter().product();
        let v: Vec<f32> = crate::sample::randn(n, seed, 1)
            .iter()
            .map(|z| z * std)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    for (i, (_, var)) in base.params().named_vars().iter().enumerate() {
        let moved = (var.as_tensor() + seeded(var.dims(), 100 + i as u64, 0.05)).unwrap();
        var.set(&moved).unwrap();
    }
    let x = seeded(&[2, 2, 8, 8], 7, 1.0);
    let embedded = Model::new(ModelConfig::Unet(c), 9, &Device::Cpu).unwrap();
    let (missing, unexpected) = embedded
        .params()
        .load_matching(&base.params().tensors().unwrap(), "base")
        .unwrap();
    assert!(unexpected.is_empty());
    assert!(!missing.is_empty() && missing.iter().all(|m| m.starts_with("guidance_embedding.")));
    let run = |m: &Model, w: Option<&[f32]>| -> Vec<f32> {
        let cond = Cond {
            labels: Some(&[0, 1]),
            guidance: w,
            ..Cond::default()
        };
        m.forward_cond(&x, &[5.0, 500.0], &cond, &Ctx::eval())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // Zero-initialised last layer: the same function as the weights without the embedding.
    assert_eq!(run(&base, None), run(&embedded, Some(&[3.0, 0.5])));
    // Once that layer moves, w changes the output; the default input is w = 1.
    for (name, var) in embedded.params().named_vars() {
        if name == "guidance_embedding.linear_2.weight" {
            var.set(&seeded(var.dims(), 8, 0.1)).unwrap();
        }
    }
    assert_ne!(
        run(&embedded, Some(&[3.0, 3.0])),
        run(&embedded, Some(&[1.0, 1.0]))
    );
    assert_eq!(run(&embedded, None), run(&embedded, Some(&[1.0, 1.0])));
    assert_eq!(
        run(&embedded.with_guidance_input(3.0), None),
        run(&embedded, Some(&[3.0, 3.0]))
    );
    assert!(base
        .forward_cond(
            &x,
            &[1.0, 1.0],
            &Cond {
                guidance: Some(&[2.0, 2.0]),
                ..Cond::default()
            },
            &Ctx::eval()
        )
        .is_err());
}

/// The U-Net with cross-attention to a 5-wide context as well as class labels.
fn unet_context_config() -> ModelConfig {
    match unet_config(false, true) {
        ModelConfig::Unet(c) => ModelConfig::Unet(UNetConfig {
            context_dim: 5,
            learn_sigma: false,
            ..c
        }),
        _ => unreachable!(),
    }
}

/// A deterministic context [batch, 3, context_dim] in the model's dtype.
pub(super) fn context(model: &Model, batch: usize) -> Tensor {
    let d = model.config().context_dim();
    let n = batch * 3 * d;
    let v: Vec<f32> = (0..n).map(|i| ((i * 29 % 17) as f32 / 8.5) - 1.0).collect();
    Tensor::from_vec(v, (batch, 3, d), &Device::Cpu)
        .unwrap()
        .to_dtype(model.params().dtype())
        .unwrap()
}

pub(super) fn input(model: &Model, batch: usize) -> Tensor {
    let mut shape = vec![batch];
    shape.extend(model.config().data_shape());
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 23) as f32 / 11.5) - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(model.params().dtype())
        .unwrap()
}

/// A scalar loss whose gradient reaches every output element differently.
pub(super) fn probe_loss(model: &Model, x: &Tensor, ctx: &Ctx) -> Tensor {
    // With a context, row 0 attends to its own and row 1 to the learned null context.
    let c = (model.config().context_dim() > 0).then(|| context(model, 2));
    // A ControlNet reads a control image of the input's size (one embedding width).
    let control = model.config().controlnet().map(|cn| {
        let mut shape = x.dims().to_vec();
        shape[1] = cn.conditioning_channels;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 17 % 11) as f32 / 5.5) - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap()
    });
    let cond = Cond {
        labels: Some(&[0, 3]),
        context: c.as_ref(),
        null_context: Some(&[false, true]),
        guidance: None,
        low_res: None,
        aug_level: None,
        control: control.as_ref(),
        control_scale: None,
    };
    let out = model.forward_cond(x, &[3.0, 250.0], &cond, ctx).unwrap();
    let n = out.elem_count();
    let w: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0).collect();
    let w = Tensor::from_vec(w, out.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    (out * w).unwrap().sum_all().unwrap()
}

/// A few SGD steps on the probe loss: zero-initialised output layers (OpenAI's
/// `zero_module`) pass no gradient upstream until they have moved, one nesting level per step.
fn move_zero_layers(model: &Model, x: &Tensor) {
    for _ in 0..4 {
        let grads = probe_loss(model, x, &Ctx::eval()).backward().unwrap();
        for (_, v) in model.params().named_vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
                    .unwrap();
            }
        }
    }
}

/// Every trainable variable receives a finite, non-zero gradient once the zero-initialised
/// output layers have moved.
fn assert_all_gradients(config: ModelConfig) {
    let model = Model::new(config, 1, &Device::Cpu).unwrap();
    let x = input(&model, 2);
    let vars = model.params().named_vars();
    move_zero_layers(&model, &x);
    let grads = probe_loss(&model, &x, &Ctx::train(7, 0))
        .backward()
        .unwrap();
    let mut bad = Vec::new();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if !(norm.is_finite() && norm > 0.0) {
            bad.push(format!("{name}: {norm}"));
        }
    }
    assert!(bad.is_empty(), "parameters without a gradient: {bad:?}");
}

#[test]
fn every_mlp_parameter_receives_a_gradient() {
    assert_all_gradients(mlp_config());
}

#[test]
fn every_unet_parameter_receives_a_gradient_with_scale_shift_and_conv_resampling() {
    assert_all_gradients(unet_config(false, true));
}

#[test]
fn every_unet_parameter_receives_a_gradient_with_biggan_resampling_and_additive_conditioning() {
    assert_all_gradients(unet_config(true, false));
}

/// Central finite differences of the probe loss against autograd for a few coordinates of
/// every parameter tensor, in f64 so rounding does not hide errors (dropout off).
fn check_finite_differences(config: ModelConfig) {
    let model = Model::new_in(config, 2, &Device::Cpu, DType::F64).unwrap();
    let x = input(&model, 2);
    let vars: Vec<(String, Var)> = model.params().named_vars();
    move_zero_layers(&model, &x);
    let grads = probe_loss(&model, &x, &Ctx::eval()).backward().unwrap();
    let eps = 1e-4f64;
    let mut checked = 0;
    let mut bad = Vec::new();
    for (name, v) in &vars {
        let g: Vec<f64> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                probe_loss(&model, &x, &Ctx::eval())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            // The absolute floor is the differences' noise: the probe loss reproduces to about
            // 1e-11 under perturbation (long f64 sums), i.e. ~1e-7 after dividing by 2 eps.
            let tol = 1e-5 * fd.abs().max(g[i].abs()) + 2e-7;
            if (fd - g[i]).abs() > tol {
                bad.push(format!(
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                ));
            }
            checked += 1;
        }
    }
    assert!(bad.is_empty(), "gradient mismatches: {bad:#?}");
    assert!(checked >= 3 * vars.len());
}

#[test]
fn every_cross_attention_parameter_and_the_null_context_receive_a_gradient() {
    assert_all_gradients(unet_context_config());
}

#[test]
fn every_efficient_unet_parameter_receives_a_gradient() {
    assert_all_gradients(efficient_unet_config());
}

#[test]
fn ddpm_convention_unet_gradients_match_finite_differences() {
    check_finite_differences(ddpm_convention_unet_config());
}

#[test]
fn the_time_embedding_options_follow_diffusers_get_timestep_embedding() {
    // half = 4, freq_shift = 1: frequencies exp(−ln(1e4) i / 3), i = 0..3; [sin, cos] halves.
    let e = layers::timestep_embedding_with(&[2.5], 8, false, 1.0, &Device::Cpu).unwrap();
    let e: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..4 {
        let arg = 2.5 * (-(10_000f64.ln()) * i as f64 / 3.0).exp();
        assert!((e[i] as f64 - arg.sin()).abs() < 1e-6, "sin {i}");
        assert!((e[4 + i] as f64 - arg.cos()).abs() < 1e-6, "cos {i}");
    }
}

#[test]
fn efficient_unet_gradients_match_finite_differences() {
    check_finite_differences(efficient_unet_config());
}

/// The number of residual blocks under `prefix` (names `prefix.resnets.<j>.…`).
fn resnets_under(model: &Model, prefix: &str) -> usize {
    let names: std::collections::BTreeSet<String> = model
        .params()
        .named_vars()
        .into_iter()
        .filter_map(|(n, _)| {
            let rest = n.strip_prefix(&format!("{prefix}.resnets."))?;
            Some(rest.split('.').next()?.to_string())
        })
        .collect();
    names.len()
}

fn shapes_of(model: &Model) -> HashMap<String, Vec<usize>> {
    model
        .params()
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect()
}

#[test]
fn per_level_block_counts_and_the_efficient_order_build_the_stated_layout() {
    let ModelConfig::Unet(efficient) = efficient_unet_config() else {
        unreachable!()
    };
    let standard = UNetConfig {
        downsample_first: false,
        attention_resolutions: vec![4],
        ..efficient.clone()
    };
    let m = Model::new(ModelConfig::Unet(standard), 0, &Device::Cpu).unwrap();
    // Down levels have their own counts; each up level one more (the downsampler's skip).
    assert_eq!(resnets_under(&m, "down_blocks.0"), 1);
    assert_eq!(resnets_under(&m, "down_blocks.1"), 2);
    assert_eq!(resnets_under(&m, "up_blocks.0"), 3);
    assert_eq!(resnets_under(&m, "up_blocks.1"), 2);
    let shapes = shapes_of(&m);
    assert!(shapes.contains_key("down_blocks.0.downsamplers.0.conv.weight"));
    assert!(!shapes.contains_key("down_blocks.1.downsamplers.0.conv.weight"));
    assert!(!shapes.contains_key("up_blocks.1.upsamplers.0.conv.weight"));
    assert_eq!(shapes["conv_out.weight"], vec![4, 8, 3, 3]);

    let m = Model::new(ModelConfig::Unet(efficient), 0, &Device::Cpu).unwrap();
    assert_eq!(resnets_under(&m, "up_blocks.0"), 2);
    assert_eq!(resnets_under(&m, "up_blocks.1"), 1);
    let shapes = shapes_of(&m);
    // Every level resamples, and conv_in's 8 channels join the last up level's 8.
    for name in [
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.downsamplers.0.conv.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.upsamplers.0.conv.weight",
    ] {
        assert!(shapes.contains_key(name), "{name} missing");
    }
    assert_eq!(shapes["conv_norm_out.weight"], vec![16]);
    assert_eq!(shapes["conv_out.weight"], vec![4, 16, 3, 3]);
    // Attention at side 2 = the second level's blocks (8 → 4 → 2) and their mirror.
    assert!(shapes.contains_key("down_blocks.1.attentions.1.to_q.weight"));
    assert!(!shapes.contains_key("down_blocks.0.attentions.0.to_q.weight"));
    assert!(shapes.contains_key("up_blocks.0.attentions.0.to_q.weight"));
    let out = m
        .forward(&input(&m, 2), &[3.0, 600.0], Some(&[0, 1]), &Ctx::eval())
        .unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    // 4x4 inputs reach 1x1 at the second level; 6x6 cannot be halved twice.
    let small = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&small, &[1.0], None, &Ctx::eval()).is_ok());
    let odd = Tensor::zeros((1, 2, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let e = m.forward(&odd, &[1.0], None, &Ctx::eval()).unwrap_err();
    assert!(e.to_string().contains("divisible by 4"), "{e}");
}

#[test]
fn bad_block_counts_and_sizes_for_the_efficient_order_are_clear_errors() {
    let ModelConfig::Unet(c) = efficient_unet_config() else {
        unreachable!()
    };
    for (bad, needle) in [
        (
            UNetConfig {
                num_res_blocks: unet::ResBlocks::PerLevel(vec![1, 2, 3]),
                ..c.clone()
            },
            "one positive count per level",
        ),
        (
            UNetConfig {
                num_res_blocks: unet::ResBlocks::PerLevel(vec![1, 0]),
                downsample_first: false,
                ..c.clone()
            },
            "one positive count per level",
        ),
        (
            UNetConfig {
                num_res_blocks: 0.into(),
                ..c.clone()
            },
            "at least one residual block per level",
        ),
        (
            UNetConfig {
                image_size: 6,
                ..c.clone()
            },
            "each downsampling with downsample_first",
        ),
    ] {
        let e = Model::new(ModelConfig::Unet(bad), 0, &Device::Cpu)
            .err()
            .expect("a bad configuration must be refused");
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn cross_attention_gradients_match_finite_differences() {
    check_finite_differences(unet_context_config());
}

#[test]
fn null_rows_attend_to_the_learned_null_context_and_given_rows_to_theirs() {
    let model = Model::new(unet_context_config(), 3, &Device::Cpu).unwrap();
    let x = input(&model, 2);
    move_zero_layers(&model, &x);
    let c = context(&model, 2);
    let run = |context: Option<&Tensor>, null: Option<&[bool]>| -> Vec<Vec<f32>> {
        let cond = Cond {
            labels: Some(&[1, 1]),
            context,
            null_context: null,
            guidance: None,
            low_res: None,
            aug_level: None,
            control: None,
            control_scale: None,
        };
        model
            .forward_cond(&x, &[10.0, 10.0], &cond, &Ctx::eval())
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let given = run(Some(&c), None);
    let mixed = run(Some(&c), Some(&[false, true]));
    let none = run(None, None);
    assert_eq!(mixed[0], given[0]);
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
    assert!(
        close(&mixed[1], &none[1]),
        "a null row must equal the no-context output"
    );
    assert!(
        !close(&given[1], &none[1]),
        "the context must change the output once the blocks have moved"
    );
    // The null context is one token: repeating it M times changes nothing.
    let null = model
        .params()
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "null_context")
        .expect("a null_context parameter")
        .1;
    let repeated = null
        .as_tensor()
        .reshape((1, 1, 5))
        .unwrap()
        .broadcast_as((2, 4, 5))
        .unwrap()
        .contiguous()
        .unwrap();
    let rep = run(Some(&repeated), None);
    assert!(close(&rep[0], &none[0]) && close(&rep[1], &none[1]));
}

#[test]
fn bad_contexts_are_clear_errors() {
    let model = Model::new(unet_context_config(), 0, &Device::Cpu).unwrap();
    let x = input(&model, 2);
    let wide = Tensor::zeros((2, 3, 7), DType::F32, &Device::Cpu).unwrap();
    let cond = Cond {
        context: Some(&wide),
        ..Cond::default()
    };
    let e = model
        .forward_cond(&x, &[0.0, 0.0], &cond, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("context_dim = 5"), "{e}");
    let plain = Model::new(unet_config(false, true), 0, &Device::Cpu).unwrap();
    let c = context(&model, 2);
    let cond = Cond {
        context: Some(&c),
        ..Cond::default()
    };
    let e = plain
        .forward_cond(&x, &[0.0, 0.0], &cond, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no cross-attention"), "{e}");
    let e = model
        .check_context(HostContext {
            data: &[0.0; 12],
            len: 2,
            dim: 4,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("width 4"), "{e}");
}

#[test]
fn mlp_gradients_match_finite_differences() {
    check_finite_differences(mlp_config());
}

#[test]
fn unet_gradients_match_finite_differences() {
    check_finite_differences(unet_config(false, true));
}

#[test]
fn unet_learned_variance_output_has_twice_the_channels() {
    let model = Model::new(unet_config(true, true), 0, &Device::Cpu).unwrap();
    let out = model
        .forward(&input(&model, 2), &[0.0, 999.0], None, &Ctx::eval())
        .unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
}

#[test]
fn same_seed_same_weights_and_different_seed_different_weights() {
    let a = Model::new(mlp_config(), 5, &Device::Cpu)
        .unwrap()
        .params()
        .tensors()
        .unwrap();
    let b = Model::new(mlp_config(), 5, &Device::Cpu)
        .unwrap()
        .params()
        .tensors()
        .unwrap();
    let c = Model::new(mlp_config(), 6, &Device::Cpu)
        .unwrap()
        .params()
        .tensors()
        .unwrap();
    let flat = |m: &HashMap<String, Tensor>, k: &str| {
        m[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for k in a.keys() {
        assert_eq!(flat(&a, k), flat(&b, k), "{k}");
    }
    assert_ne!(flat(&a, "proj_in.weight"), flat(&c, "proj_in.weight"));
}

#[test]
fn dropout_masks_depend_on_the_step_and_are_off_at_inference() {
    let model = Model::new(mlp_config(), 0, &Device::Cpu).unwrap();
    let x = input(&model, 2);
    let run = |ctx: &Ctx| -> Vec<f32> {
        model
            .forward(&x, &[1.0, 2.0], None, ctx)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(run(&Ctx::eval()), run(&Ctx::eval()));
    assert_eq!(run(&Ctx::train(1, 4)), run(&Ctx::train(1, 4)));
    assert_ne!(run(&Ctx::train(1, 4)), run(&Ctx::train(1, 5)));
    assert_ne!(run(&Ctx::train(1, 4)), run(&Ctx::eval()));
}

#[test]
fn timestep_embedding_is_cos_then_sin_of_geometric_frequencies() {
    let e = timestep_embedding(&[0.0, 10.0], 8, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(&e[0][..4], &[1.0; 4]);
    assert_eq!(&e[0][4..], &[0.0; 4]);
    for i in 0..4 {
        let f = (-(10_000f64.ln()) * i as f64 / 4.0).exp();
        assert!((e[1][i] as f64 - (10.0 * f).cos()).abs() < 1e-6);
        assert!((e[1][4 + i] as f64 - (10.0 * f).sin()).abs() < 1e-6);
    }
}

#[test]
fn softmax_from_primitives_matches_candle_and_has_gradients() {
    let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
    let x = Var::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap();
    let ours = softmax_last(x.as_tensor()).unwrap();
    let reference = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    let d = (&ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6, "{d}");
    let w = Tensor::arange(0f32, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let g = (ours * w).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
}

#[test]
fn wrong_input_shapes_and_labels_are_clear_errors() {
    let model = Model::new(unet_config(false, true), 0, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = model
        .forward(&bad, &[0.0, 0.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[2, 3, 8, 8]") && e.contains("[B, 2, H, W]"),
        "{e}"
    );
    let x = input(&model, 2);
    let e = model
        .forward(&x, &[0.0, 0.0], Some(&[0, 9]), &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 9"), "{e}");
    let e = model
        .forward(&x, &[0.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("t has 1 entries"), "{e}");
    let mlp = Model::new(mlp_config(), 0, &Device::Cpu).unwrap();
    let e = mlp
        .forward(&x, &[0.0, 0.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, 3]"), "{e}");
    let bad_cfg = ModelConfig::Unet(UNetConfig {
        groups: 5,
        ..UNetConfig::default()
    });
    assert!(Model::new(bad_cfg, 0, &Device::Cpu).is_err());
}

#[test]
fn model_configs_round_trip_through_json() {
    for c in [
        mlp_config(),
        unet_config(true, false),
        unet_context_config(),
        efficient_unet_config(),
        ddpm_convention_unet_config(),
        controlnet_config(),
    ] {
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
    }
    // Block counts read as one number or one per level.
    let text = serde_json::to_string(&efficient_unet_config()).unwrap();
    assert!(text.contains(r#""num_res_blocks":[1,2]"#), "{text}");
    let text = serde_json::to_string(&unet_config(false, true)).unwrap();
    assert!(text.contains(r#""num_res_blocks":1"#), "{text}");
    let e = serde_json::from_str::<ModelConfig>(r#"{"type":"mlp","hiden":3}"#);
    assert!(e.is_err());
}

#[test]
fn classifier_cross_entropy_gradients_match_finite_differences() {
    let c = Classifier::new_in(5, &[7, 6], 3, 8, 4, DType::F64).unwrap();
    let t = [3.0f32, 50.0, 0.0, 99.0];
    let x: Vec<f64> = (0..20).map(|i| ((i * 7 % 11) as f64 / 5.0) - 1.0).collect();
    let x = Tensor::from_vec(x, (4, 5), &Device::Cpu).unwrap();
    let labels = [0u32, 2, 1, 2];
    let grads = c
        .cross_entropy(&x, Some(&t), &labels)
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in c.params().named_vars() {
        let g: Vec<f64> = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                c.cross_entropy(&x, Some(&t), &labels)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(1e-5) - eval(-1e-5)) / 2e-5;
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (fd - g[i]).abs() <= 1e-6 * fd.abs().max(1.0),
                "{name}[{i}]: {} vs {fd}",
                g[i]
            );
        }
    }
    // The probabilities sum to one.
    let p = c
        .log_probs(&x, Some(&t))
        .unwrap()
        .exp()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(p.iter().all(|s| (s - 1.0).abs() < 1e-12));
    // The input gradient of log f(y | x, t) against finite differences.
    let g: Vec<f64> = c
        .grad_log_prob(&x, Some(&t), &labels)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let logp = |v: &[f64]| -> f64 {
        let xt = Tensor::from_vec(v.to_vec(), (4, 5), &Device::Cpu).unwrap();
        let lp: Vec<Vec<f64>> = c.log_probs(&xt, Some(&t)).unwrap().to_vec2().unwrap();
        (0..4).map(|r| lp[r][labels[r] as usize]).sum()
    };
    for i in [0, 7, 19] {
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += 1e-5;
        down[i] -= 1e-5;
        let fd = (logp(&up) - logp(&down)) / 2e-5;
        assert!(
            (fd - g[i]).abs() <= 1e-6 * fd.abs().max(1.0),
            "x[{i}]: {} vs {fd}",
            g[i]
        );
    }
}

#[test]
fn upsampling_by_broadcast_matches_candle_in_values_and_gradients() {
    let x = Var::from_tensor(&input(
        &Model::new(unet_config(false, true), 0, &Device::Cpu).unwrap(),
        3,
    ))
    .unwrap();
    let ours = super::upsample::upsample_nearest_2x(x.as_tensor()).unwrap();
    let theirs = x.as_tensor().upsample_nearest2d(16, 16).unwrap();
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(diff(&ours, &theirs), 0.0);
    let n = ours.elem_count();
    let w: Vec<f32> = (0..n).map(|i| (i % 11) as f32 - 5.0).collect();
    let w = Tensor::from_vec(w, ours.dims(), &Device::Cpu).unwrap();
    let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (a, b) = (
        g1.get(x.as_tensor()).unwrap(),
        g2.get(x.as_tensor()).unwrap(),
    );
    assert!(diff(a, b) < 1e-5);
}

#[test]
fn inference_in_chunks_equals_row_by_row_results() {
    let model = Model::new(mlp_config(), 5, &Device::Cpu).unwrap();
    let n = INFERENCE_CHUNK + 37;
    let x: Vec<f32> = (0..n * 3)
        .map(|i| ((i * 13 % 29) as f32 / 14.5) - 1.0)
        .collect();
    let t: Vec<i64> = (0..n as i64).map(|i| (i * 7) % 1000).collect();
    let y: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
    let all = model.predict_host(&x, &[n, 3], &t, Some(&y)).unwrap();
    assert_eq!(all.shape, vec![n, 3]);
    for i in [0, INFERENCE_CHUNK - 1, INFERENCE_CHUNK, n - 1] {
        let one = model
            .predict_host(&x[i * 3..i * 3 + 3], &[1, 3], &t[i..=i], Some(&y[i..=i]))
            .unwrap();
        for (a, b) in one.data.iter().zip(&all.data[i * 3..i * 3 + 3]) {
            assert!((a - b).abs() < 1e-5, "row {i}: {a} vs {b}");
        }
    }
}

fn controlnet_config() -> ModelConfig {
    ModelConfig::ControlNet(controlnet::ControlNetConfig {
        base: Box::new(unet_config(false, true)),
        conditioning_channels: 1,
        conditioning_embedding_channels: vec![4],
        conditioning_scale: 0.7,
    })
}

#[test]
fn every_controlnet_parameter_receives_a_gradient() {
    assert_all_gradients(controlnet_config());
}

#[test]
fn controlnet_gradients_match_finite_differences() {
    check_finite_differences(controlnet_config());
}

#[test]
fn a_controlnet_made_from_a_unet_computes_exactly_what_the_unet_computes() {
    let base = Model::new(unet_config(false, true), 3, &Device::Cpu).unwrap();
    let x = input(&base, 2);
    // Move the zero-initialised layers so that the base's output is not trivially 0.
    move_zero_layers(&base, &x);
    let cn = Model::controlnet_from(&base, 1, vec![4, 8], 1.0, 9).unwrap();
    assert!(cn
        .trainable_vars()
        .iter()
        .all(|(n, _)| !n.starts_with(controlnet::BASE_PREFIX)));
    let control = Tensor::ones((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let run = |m: &Model, control: Option<&Tensor>| -> Vec<f32> {
        let cond = Cond {
            labels: Some(&[1, 2]),
            control,
            ..Cond::default()
        };
        m.forward_cond(&x, &[7.0, 700.0], &cond, &Ctx::eval())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let want = run(&base, None);
    assert!(want.iter().any(|v| v.abs() > 1e-3));
    assert_eq!(run(&cn, Some(&control)), want);
    let e = cn
        .forward_cond(&x, &[1.0, 1.0], &Cond::default(), &Ctx::eval())
        .unwrap_err();
    assert!(e.to_string().contains("needs a control image"), "{e}");
}
