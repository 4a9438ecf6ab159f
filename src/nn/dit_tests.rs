//! Specification of the Diffusion Transformer: shapes, adaLN-Zero's identity at initialisation,
//! gradients against finite differences, the position embedding's closed form, the patch
//! embedding as a strided convolution, class and context nulls, and clear errors.

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::nn::tests::{context, input, probe_loss};
use crate::nn::{Cond, Ctx, Model, ModelConfig};

/// A tiny DiT on 2×4×4 images: patch 2 (4 tokens), width 8, two blocks of two heads, three
/// classes, learned variances.
fn tiny(context_dim: usize) -> DiTConfig {
    DiTConfig {
        in_channels: 2,
        image_size: 4,
        patch_size: 2,
        hidden_size: 8,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 1.5,
        num_classes: 3,
        learn_sigma: true,
        context_dim,
    }
}

fn model(c: DiTConfig, seed: u64, dtype: DType) -> Model {
    Model::new_in(ModelConfig::Dit(c), seed, &Device::Cpu, dtype).unwrap()
}

/// Adds seeded N(0, std²) noise to every parameter, so the zero-initialised layers (adaLN
/// modulations, the final layer, the cross-attention output) are no longer zero.
fn randomize(m: &Model, std: f32) {
    for (i, (_, var)) in m.params().named_vars().iter().enumerate() {
        let n = var.elem_count();
        let noise: Vec<f32> = crate::sample::randn(n, 11, 500 + i as u64)
            .iter()
            .map(|z| z * std)
            .collect();
        let noise = Tensor::from_vec(noise, var.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn run(m: &Model, x: &Tensor, cond: &Cond) -> Vec<Vec<f32>> {
    rows(
        &m.forward_cond(x, &[10.0, 700.0], cond, &Ctx::eval())
            .unwrap(),
    )
}

#[test]
fn output_has_the_input_shape_or_twice_the_channels_with_learned_variances() {
    let m = model(tiny(0), 0, DType::F32);
    let x = input(&m, 3);
    let y = m
        .forward(&x, &[0.0, 5.0, 999.0], None, &Ctx::eval())
        .unwrap();
    assert_eq!(y.dims(), &[3, 4, 4, 4]);
    let plain = model(
        DiTConfig {
            learn_sigma: false,
            ..tiny(0)
        },
        0,
        DType::F32,
    );
    let y = plain
        .forward(&x, &[1.0, 2.0, 3.0], None, &Ctx::eval())
        .unwrap();
    assert_eq!(y.dims(), &[3, 2, 4, 4]);
}

#[test]
fn a_fresh_dit_outputs_exactly_zero_and_every_block_is_the_identity() {
    let m = model(tiny(5), 3, DType::F32);
    let x = input(&m, 2);
    let c = context(&m, 2);
    let cond = Cond {
        labels: Some(&[0, 2]),
        context: Some(&c),
        ..Cond::default()
    };
    let y = m
        .forward_cond(&x, &[4.0, 400.0], &cond, &Ctx::eval())
        .unwrap();
    assert!(rows(&y).iter().flatten().all(|&v| v == 0.0));
    // Each block on its own: the gates, and the cross-attention's output projection, are zero.
    let dit = DiT::new(&m.params().root(), &tiny(5)).unwrap();
    let tokens = dit.patchify(&x).unwrap();
    let cond_emb = dit.conditioning(&[4.0, 400.0], Some(&[0, 2]), &x).unwrap();
    assert!(rows(&cond_emb).iter().flatten().any(|&v| v != 0.0));
    for block in &dit.blocks {
        let out = block.forward(&tokens, &cond_emb, Some(&c)).unwrap();
        assert_eq!(rows(&out), rows(&tokens));
    }
}

#[test]
fn the_position_embedding_is_the_closed_form_sin_cos_of_column_then_row() {
    // dim 8: quarter 2, ω = [1, 1/100]; a 2×3 grid, token (i, j) at index 3 i + j.
    let e = position_embedding_2d(8, 2, 3);
    for i in 0..2 {
        for j in 0..3 {
            let (fi, fj) = (i as f64, j as f64);
            let want = [
                fj.sin(),
                (fj / 100.0).sin(),
                fj.cos(),
                (fj / 100.0).cos(),
                fi.sin(),
                (fi / 100.0).sin(),
                fi.cos(),
                (fi / 100.0).cos(),
            ];
            let got = &e[(3 * i + j) * 8..(3 * i + j + 1) * 8];
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-15,
                    "token ({i}, {j}): {got:?} vs {want:?}"
                );
            }
        }
    }
    // The model holds it for its grid and does not train it.
    let m = model(tiny(0), 0, DType::F64);
    let dit = DiT::new(&m.params().root(), &tiny(0)).unwrap();
    let held: Vec<f64> = dit.position.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(held, position_embedding_2d(8, 2, 2));
    assert!(m
        .params()
        .named_vars()
        .iter()
        .all(|(n, _)| !n.contains("position") && n != "pos_embed.pos_embed"));
}

#[test]
fn patchify_is_the_stride_p_convolution_plus_positions_and_unpatchify_inverts_the_layout() {
    let m = model(tiny(0), 2, DType::F64);
    randomize(&m, 0.3);
    let dit = DiT::new(&m.params().root(), &tiny(0)).unwrap();
    let x = input(&m, 2);
    let conv = x
        .conv2d(&dit.patch_weight, 0, 2, 1, 1)
        .unwrap()
        .broadcast_add(&dit.patch_bias.reshape((1, 8, 1, 1)).unwrap())
        .unwrap();
    // [B, D, 2, 2] -> [B, 4, D] tokens, row-major.
    let conv_tokens = conv
        .flatten_from(2)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    let ours = dit
        .patchify(&x)
        .unwrap()
        .broadcast_sub(&dit.position.unsqueeze(0).unwrap())
        .unwrap();
    let diff = crate::nn::test_util::max_diff(&ours, &conv_tokens);
    assert!(diff < 1e-12, "{diff}");
    // Token t of channel c, patch row r, column s holds pixel (c, 2 i + r, 2 j + s).
    let y: Vec<f64> = (0..2 * 4 * 16).map(|v| v as f64).collect();
    let y = Tensor::from_vec(y, (2, 4, 16), &Device::Cpu).unwrap();
    let img: Vec<Vec<Vec<Vec<f64>>>> = dit.unpatchify(&y, 4, 4).unwrap().to_vec3_4d();
    for (b, item) in img.iter().enumerate() {
        for (c, plane) in item.iter().enumerate() {
            for (py, row) in plane.iter().enumerate() {
                for (px, &v) in row.iter().enumerate() {
                    let token = (py / 2) * 2 + px / 2;
                    let feature = ((py % 2) * 2 + px % 2) * 4 + c;
                    assert_eq!(v, ((b * 4 + token) * 16 + feature) as f64);
                }
            }
        }
    }
}

/// [B, C, H, W] as nested vectors.
trait To4d {
    fn to_vec3_4d(&self) -> Vec<Vec<Vec<Vec<f64>>>>;
}

impl To4d for Tensor {
    fn to_vec3_4d(&self) -> Vec<Vec<Vec<Vec<f64>>>> {
        (0..self.dims()[0])
            .map(|b| self.get(b).unwrap().to_vec3().unwrap())
            .collect()
    }
}

/// Central finite differences of the probe loss against autograd, in f64, for a few
/// coordinates of every parameter tensor of a DiT with every parameter randomised.
fn check_finite_differences(c: DiTConfig) {
    let m = model(c, 4, DType::F64);
    randomize(&m, 0.3);
    let x = input(&m, 2);
    let vars: Vec<(String, Var)> = m.params().named_vars();
    let grads = probe_loss(&m, &x, &Ctx::eval()).backward().unwrap();
    let eps = 1e-5f64;
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
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                probe_loss(&m, &x, &Ctx::eval()).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 1e-6 * fd.abs().max(g[i].abs()) + 1e-8;
            if (fd - g[i]).abs() > tol {
                bad.push(format!(
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "gradient mismatches: {bad:#?}");
}

#[test]
fn gradients_match_finite_differences() {
    check_finite_differences(tiny(0));
}

#[test]
fn gradients_with_cross_attention_match_finite_differences() {
    check_finite_differences(tiny(5));
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    for c in [tiny(0), tiny(5)] {
        let m = model(c, 1, DType::F32);
        randomize(&m, 0.1);
        let x = input(&m, 2);
        let grads = probe_loss(&m, &x, &Ctx::train(7, 0)).backward().unwrap();
        let mut bad = Vec::new();
        for (name, v) in m.params().named_vars() {
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
}

#[test]
fn parameter_names_follow_diffusers_dit() {
    let m = model(tiny(5), 0, DType::F32);
    let names: Vec<String> = m.params().named_vars().into_iter().map(|v| v.0).collect();
    for want in [
        "pos_embed.proj.weight",
        "pos_embed.proj.bias",
        "timestep_embedder.linear_1.weight",
        "timestep_embedder.linear_2.bias",
        "class_embedder.embedding_table.weight",
        "transformer_blocks.0.norm1.linear.weight",
        "transformer_blocks.1.attn1.to_q.weight",
        "transformer_blocks.1.attn1.to_out.0.bias",
        "transformer_blocks.0.attn2.to_k.weight",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "proj_out_1.weight",
        "proj_out_2.bias",
        "null_context",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let shapes: std::collections::HashMap<String, Vec<usize>> = m
        .params()
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    assert_eq!(shapes["pos_embed.proj.weight"], [8, 2, 2, 2]);
    assert_eq!(shapes["class_embedder.embedding_table.weight"], [4, 8]);
    assert_eq!(shapes["transformer_blocks.0.norm1.linear.weight"], [48, 8]);
    assert_eq!(shapes["transformer_blocks.0.ff.net.0.proj.weight"], [12, 8]);
    assert_eq!(shapes["transformer_blocks.0.attn2.to_k.weight"], [8, 5]);
    assert_eq!(shapes["timestep_embedder.linear_1.weight"], [8, 256]);
    assert_eq!(shapes["proj_out_2.weight"], [16, 8]);
}

#[test]
fn missing_labels_are_the_null_class_and_labels_change_the_output() {
    let m = model(tiny(0), 5, DType::F32);
    randomize(&m, 0.2);
    let x = input(&m, 2);
    let none = run(&m, &x, &Cond::default());
    let null = run(
        &m,
        &x,
        &Cond {
            labels: Some(&[3, 3]),
            ..Cond::default()
        },
    );
    let class = run(
        &m,
        &x,
        &Cond {
            labels: Some(&[0, 1]),
            ..Cond::default()
        },
    );
    assert_eq!(none, null);
    assert_ne!(class[0], null[0]);
    assert_ne!(class[1], null[1]);
}

#[test]
fn null_rows_attend_to_the_learned_null_context_and_given_rows_to_theirs() {
    let m = model(tiny(5), 6, DType::F32);
    randomize(&m, 0.2);
    let x = input(&m, 2);
    let c = context(&m, 2);
    let with = |context: Option<&Tensor>, null: Option<&[bool]>| {
        run(
            &m,
            &x,
            &Cond {
                labels: Some(&[1, 1]),
                context,
                null_context: null,
                ..Cond::default()
            },
        )
    };
    let given = with(Some(&c), None);
    let mixed = with(Some(&c), Some(&[false, true]));
    let none = with(None, None);
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
    assert_eq!(mixed[0], given[0]);
    assert!(
        close(&mixed[1], &none[1]),
        "a null row equals the no-context output"
    );
    assert!(
        !close(&given[1], &none[1]),
        "the context changes the output"
    );
    // The null context is one token: the same token M times attends to the same thing.
    let null = m
        .params()
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "null_context")
        .unwrap()
        .1;
    let repeated = null
        .as_tensor()
        .reshape((1, 1, 5))
        .unwrap()
        .broadcast_as((2, 4, 5))
        .unwrap()
        .contiguous()
        .unwrap();
    let rep = with(Some(&repeated), None);
    assert!(close(&rep[0], &none[0]) && close(&rep[1], &none[1]));
}

#[test]
fn bad_configs_and_inputs_are_clear_errors() {
    let err = |c: DiTConfig| {
        Model::new(ModelConfig::Dit(c), 0, &Device::Cpu)
            .err()
            .expect("an invalid config")
            .to_string()
    };
    let e = err(DiTConfig {
        image_size: 9,
        ..tiny(0)
    });
    assert!(
        e.contains("image_size 9 is not divisible by patch_size 2"),
        "{e}"
    );
    let e = err(DiTConfig {
        num_heads: 3,
        ..tiny(0)
    });
    assert!(
        e.contains("num_heads = 3 must divide hidden_size = 8"),
        "{e}"
    );
    let e = err(DiTConfig {
        hidden_size: 6,
        num_heads: 2,
        ..tiny(0)
    });
    assert!(e.contains("multiple of 4"), "{e}");
    let e = err(DiTConfig {
        mlp_ratio: 0.0,
        ..tiny(0)
    });
    assert!(e.contains("mlp_ratio"), "{e}");
    let e = err(DiTConfig {
        depth: 0,
        ..tiny(0)
    });
    assert!(e.contains("depth"), "{e}");

    let m = model(tiny(0), 0, DType::F32);
    let wrong_channels = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&wrong_channels, &[0.0, 0.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[2, 3, 4, 4]") && e.contains("[B, 2, 4, 4]"),
        "{e}"
    );
    let wrong_size = Tensor::zeros((2, 2, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&wrong_size, &[0.0, 0.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_size = 4"), "{e}");
    let c = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward_cond(
            &input(&m, 2),
            &[0.0, 0.0],
            &Cond {
                context: Some(&c),
                ..Cond::default()
            },
            &Ctx::eval(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no cross-attention"), "{e}");
}

#[test]
fn named_variants_have_the_papers_sizes() {
    let s = DiTConfig::named("DiT-S/2").unwrap();
    assert_eq!(
        (s.depth, s.hidden_size, s.num_heads, s.patch_size),
        (12, 384, 6, 2)
    );
    let xl = DiTConfig::named("DiT-XL/8").unwrap();
    assert_eq!(
        (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size),
        (28, 1152, 16, 8)
    );
    for (name, want) in [("DiT-B/4", (12, 768, 12)), ("DiT-L/2", (24, 1024, 16))] {
        let c = DiTConfig::named(name).unwrap();
        assert_eq!((c.depth, c.hidden_size, c.num_heads), want);
        c.validate().unwrap();
    }
    assert_eq!(DiTConfig::named("DiT-XS/2").unwrap(), DiTConfig::default());
    for bad in ["DiT-S", "DiT-Q/2", "DiT-S/0", "DiT-S/x"] {
        assert!(DiTConfig::named(bad).is_err(), "{bad}");
    }
}

#[test]
fn configs_round_trip_through_json_and_reject_unknown_fields() {
    let c = ModelConfig::Dit(tiny(5));
    let s = serde_json::to_string(&c).unwrap();
    assert!(s.contains(r#""type":"dit""#), "{s}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
    let partial: ModelConfig =
        serde_json::from_str(r#"{"type":"dit","hidden_size":64,"num_heads":2}"#).unwrap();
    assert_eq!(
        partial,
        ModelConfig::Dit(DiTConfig {
            hidden_size: 64,
            num_heads: 2,
            ..DiTConfig::default()
        })
    );
    assert!(serde_json::from_str::<ModelConfig>(r#"{"type":"dit","patch":2}"#).is_err());
}
