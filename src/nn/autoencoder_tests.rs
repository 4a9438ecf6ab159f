//! Autoencoder, resize and super-resolution conditioning tests.

use candle_core::{DType, Device, Tensor, Var};

use super::autoencoder::{codebook_usage, nearest_codes};
use super::resize::{self, Upsample};
use super::*;

fn ae_config(kind: AutoencoderKind) -> ModelConfig {
    ModelConfig::Autoencoder(AutoencoderConfig {
        kind,
        in_channels: 2,
        out_channels: 2,
        image_size: 8,
        block_out_channels: vec![4, 8],
        layers_per_block: 1,
        latent_channels: 3,
        norm_num_groups: 2,
        mid_block_add_attention: true,
        num_vq_embeddings: 6,
        vq_embed_dim: 0,
        scaling_factor: 1.0,
    })
}

fn images(batch: usize, dtype: DType) -> Tensor {
    let n = batch * 2 * 8 * 8;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 23) as f32 / 11.5) - 1.0)
        .collect();
    Tensor::from_vec(v, (batch, 2, 8, 8), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Σ reconstruction · probe + the regulariser terms: every parameter's gradient path.
fn probe(model: &Model, x: &Tensor, noise: Option<&Tensor>) -> Tensor {
    let out = model
        .autoencoder()
        .unwrap()
        .forward_train(x, noise, &Ctx::eval())
        .unwrap();
    let r = &out.reconstruction;
    let w: Vec<f32> = (0..r.elem_count())
        .map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0)
        .collect();
    let w = Tensor::from_vec(w, r.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(r.dtype())
        .unwrap();
    let mut loss = (r * w).unwrap().sum_all().unwrap();
    for t in [&out.kl, &out.codebook, &out.commitment]
        .into_iter()
        .flatten()
    {
        loss = (loss + t.sum_all().unwrap()).unwrap();
    }
    loss
}

fn latent_noise(batch: usize, dtype: DType) -> Tensor {
    let n = batch * 3 * 4 * 4;
    let v: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 / 6.5) - 1.0).collect();
    Tensor::from_vec(v, (batch, 3, 4, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[test]
fn autoencoder_shapes_and_diffusers_parameter_names() {
    let model = Model::new(ae_config(AutoencoderKind::Kl), 0, &Device::Cpu).unwrap();
    let names: Vec<String> = model
        .params()
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for want in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.conv1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.resnets.1.norm2.bias",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up_blocks.0.resnets.1.conv2.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.conv_norm_out.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}: {names:?}");
    }
    let ae = model.autoencoder().unwrap();
    let x = images(3, DType::F32);
    let m = ae.encode_moments(&x).unwrap();
    assert_eq!(m.dims(), &[3, 6, 4, 4]);
    let z = ae.encode(&x, None).unwrap();
    assert_eq!(z.dims(), &[3, 3, 4, 4]);
    assert_eq!(ae.decode(&z).unwrap().dims(), &[3, 2, 8, 8]);
    // The posterior mean is the first half of the moments.
    let d = (m.narrow(1, 0, 3).unwrap() - &z)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn kl_term_is_the_closed_form_of_the_posterior() {
    let model = Model::new(ae_config(AutoencoderKind::Kl), 3, &Device::Cpu).unwrap();
    let ae = model.autoencoder().unwrap();
    let x = images(2, DType::F32);
    let out = ae.forward_train(&x, None, &Ctx::eval()).unwrap();
    let m = ae.encode_moments(&x).unwrap().to_dtype(DType::F64).unwrap();
    let kl: Vec<f32> = out.kl.unwrap().to_vec1().unwrap();
    for (b, &got) in kl.iter().enumerate() {
        let mean: Vec<f64> = m
            .get(b)
            .unwrap()
            .narrow(0, 0, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let logvar: Vec<f64> = m
            .get(b)
            .unwrap()
            .narrow(0, 3, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: f64 = mean
            .iter()
            .zip(&logvar)
            .map(|(mu, lv)| 0.5 * (mu * mu + lv.exp() - 1.0 - lv))
            .sum();
        assert!(
            (got as f64 - want).abs() < 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}

#[test]
fn posterior_samples_are_mean_plus_sigma_noise() {
    let model = Model::new(ae_config(AutoencoderKind::Kl), 3, &Device::Cpu).unwrap();
    let ae = model.autoencoder().unwrap();
    let x = images(2, DType::F32);
    let n = latent_noise(2, DType::F32);
    let z = ae.encode(&x, Some(&n)).unwrap();
    let m = ae.encode_moments(&x).unwrap();
    let sigma = (m.narrow(1, 3, 3).unwrap() * 0.5).unwrap().exp().unwrap();
    let want = (m.narrow(1, 0, 3).unwrap() + (sigma * &n).unwrap()).unwrap();
    let d = (z - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6, "{d}");
}

fn assert_all_parameters_get_gradients(kind: AutoencoderKind) {
    let model = Model::new(ae_config(kind), 1, &Device::Cpu).unwrap();
    let x = images(2, DType::F32);
    // Attention's output projection starts at zero: move it so the rest of the block is reached.
    for _ in 0..2 {
        let g = probe(&model, &x, None).backward().unwrap();
        for (_, v) in model.params().named_vars() {
            if let Some(g) = g.get(v.as_tensor()) {
                v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap())
                    .unwrap();
            }
        }
    }
    let grads = probe(&model, &x, None).backward().unwrap();
    let mut bad = Vec::new();
    for (name, v) in model.params().named_vars() {
        let ok = grads.get(v.as_tensor()).is_some_and(|g| {
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            n.is_finite() && n > 0.0
        });
        if !ok {
            bad.push(name);
        }
    }
    assert!(bad.is_empty(), "parameters without a gradient: {bad:?}");
}

#[test]
fn every_kl_autoencoder_parameter_receives_a_gradient() {
    assert_all_parameters_get_gradients(AutoencoderKind::Kl);
}

#[test]
fn every_vq_autoencoder_parameter_receives_a_gradient_including_the_codebook() {
    assert_all_parameters_get_gradients(AutoencoderKind::Vq);
}

/// Central differences against autograd in f64, a few coordinates of every parameter (KL with
/// a posterior sample, so the σ path is checked too).
#[test]
fn kl_autoencoder_gradients_match_finite_differences() {
    let model = Model::new_in(ae_config(AutoencoderKind::Kl), 2, &Device::Cpu, DType::F64).unwrap();
    let x = images(2, DType::F64);
    let noise = latent_noise(2, DType::F64);
    let grads = probe(&model, &x, Some(&noise)).backward().unwrap();
    let eps = 1e-5f64;
    let mut bad = Vec::new();
    let vars = model.params().named_vars();
    for (name, v) in &vars {
        let g: Vec<f64> = match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            // The attention output projection is zero: its inputs' gradients are zero.
            None => vec![0.0; v.elem_count()],
        };
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for &i in &[0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                probe(&model, &x, Some(&noise)).to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            if (fd - g[i]).abs() > 1e-5 * fd.abs().max(g[i].abs()) + 1e-7 {
                bad.push(format!(
                    "{name}[{i}]: autograd {} vs finite differences {fd}",
                    g[i]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "gradient mismatches: {bad:#?}");
}

/// The straight-through estimator: the forward value of z + sg[e − z] is e, and the gradient
/// reaching the encoder output z equals the gradient the decoder input receives (the
/// derivative is the identity); the codebook gets none through this path.
#[test]
fn straight_through_gradient_passes_the_decoder_gradient_to_the_encoder_output() {
    let model = Model::new_in(ae_config(AutoencoderKind::Vq), 4, &Device::Cpu, DType::F64).unwrap();
    let ae = model.autoencoder().unwrap();
    let x = images(2, DType::F64);
    let z = Var::from_tensor(&ae.encode_moments(&x).unwrap().detach()).unwrap();
    let (e, _) = ae.quantize(z.as_tensor()).unwrap();
    let st = (z.as_tensor() + (&e - z.as_tensor()).unwrap().detach()).unwrap();
    // Forward values are those of e exactly.
    let d = (&st - &e)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12);
    let w: Vec<f64> = (0..st.elem_count())
        .map(|i| ((i * 5 % 9) as f64 - 4.0) / 4.0)
        .collect();
    let w = Tensor::from_vec(w, st.dims(), &Device::Cpu).unwrap();
    let g = (&st * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gz = g.get(z.as_tensor()).unwrap();
    let diff = (gz - &w)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        diff < 1e-12,
        "straight-through gradient differs from the upstream one by {diff}"
    );
    let book = ae.codebook().unwrap();
    assert_eq!(book.dims(), &[6, 3]);
    assert!(
        g.get(book).is_none(),
        "the codebook received a straight-through gradient"
    );
}

#[test]
fn nearest_codes_match_a_brute_force_search_and_usage_counts() {
    let tokens: Vec<f32> = (0..40).map(|i| ((i * 7 % 11) as f32 / 5.5) - 1.0).collect();
    let book: Vec<f32> = (0..18).map(|i| ((i * 5 % 13) as f32 / 6.5) - 1.0).collect();
    let t = Tensor::from_vec(tokens.clone(), (20, 2), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(book.clone(), (9, 2), &Device::Cpu).unwrap();
    let codes = nearest_codes(&t, &b).unwrap();
    for (r, &c) in codes.iter().enumerate() {
        let dist = |j: usize| {
            (0..2)
                .map(|k| (tokens[r * 2 + k] - book[j * 2 + k]).powi(2))
                .sum::<f32>()
        };
        let best = (0..9).map(dist).fold(f32::INFINITY, f32::min);
        assert!((dist(c as usize) - best).abs() < 1e-5, "row {r}");
    }
    // Uniform use of 4 codes out of 8: perplexity 4.
    let (used, perplexity) = codebook_usage(&[0, 1, 2, 3, 0, 1, 2, 3], 8);
    assert_eq!(used, 4);
    assert!((perplexity - 4.0).abs() < 1e-12);
    let (used, perplexity) = codebook_usage(&[5; 10], 8);
    assert_eq!((used, perplexity), (1, 1.0));
}

#[test]
fn autoencoder_bad_inputs_are_clear_errors() {
    let model = Model::new(ae_config(AutoencoderKind::Kl), 0, &Device::Cpu).unwrap();
    let ae = model.autoencoder().unwrap();
    let odd = Tensor::zeros((1, 2, 7, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(ae
        .encode(&odd, None)
        .unwrap_err()
        .to_string()
        .contains("multiples"));
    let z = Tensor::zeros((1, 5, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(ae
        .decode(&z)
        .unwrap_err()
        .to_string()
        .contains("latents have shape"));
    let e = model
        .forward(&images(1, DType::F32), &[1.0], None, &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a denoiser"), "{e}");
    let mut bad = ae_config(AutoencoderKind::Kl);
    if let ModelConfig::Autoencoder(c) = &mut bad {
        c.image_size = 9;
    }
    assert!(Model::new(bad, 0, &Device::Cpu).is_err());
    let vq = Model::new(ae_config(AutoencoderKind::Vq), 0, &Device::Cpu).unwrap();
    let x = images(1, DType::F32);
    let noise = latent_noise(1, DType::F32);
    assert!(vq.autoencoder().unwrap().encode(&x, Some(&noise)).is_err());
    assert!(model.autoencoder().unwrap().quantize(&noise).is_err());
}

#[test]
fn host_encode_decode_chunking_and_seeded_samples() {
    let model = Model::new(ae_config(AutoencoderKind::Kl), 5, &Device::Cpu).unwrap();
    let x = images(3, DType::F32)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let shape = [3, 2, 8, 8];
    let mean = model.encode_host(&x, &shape, None).unwrap();
    assert_eq!(mean.shape, vec![3, 3, 4, 4]);
    let a = model.encode_host(&x, &shape, Some(1)).unwrap();
    let b = model.encode_host(&x, &shape, Some(1)).unwrap();
    let c = model.encode_host(&x, &shape, Some(2)).unwrap();
    assert_eq!(a.data, b.data);
    assert_ne!(a.data, c.data);
    assert_ne!(a.data, mean.data);
    // Row 1 of a batch equals the same image encoded alone (noise depends on the row only
    // through its position, so compare means).
    let one = model
        .encode_host(&x[128..256], &[1, 2, 8, 8], None)
        .unwrap();
    assert_eq!(&mean.data[48..96], &one.data[..]);
    let dec = model.decode_host(&mean.data, &mean.shape).unwrap();
    assert_eq!(dec.shape, vec![3, 2, 8, 8]);
    let mut nan = mean.data.clone();
    nan[3] = f32::NAN;
    assert!(model.decode_host(&nan, &mean.shape).is_err());
}

#[test]
fn area_down_and_bilinear_resize_follow_their_definitions() {
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let d = resize::area_down(&x, [1, 1, 4, 4], 2).unwrap();
    assert_eq!(d, vec![2.5, 4.5, 10.5, 12.5]);
    assert!(resize::area_down(&x, [1, 1, 4, 4], 3).is_err());
    // Bilinear 2 → 4 with align_corners=False: source positions −0.25, 0.25, 0.75, 1.25
    // clamped to [0, 1]: weights (1, 0), (0.75, 0.25), (0.25, 0.75), (0, 1).
    let row = resize::resize(&[0.0, 4.0], [1, 1, 1, 2], 1, 4, Upsample::Bilinear).unwrap();
    assert_eq!(row, vec![0.0, 1.0, 3.0, 4.0]);
    let near = resize::resize(&[0.0, 4.0], [1, 1, 1, 2], 1, 4, Upsample::Nearest).unwrap();
    assert_eq!(near, vec![0.0, 0.0, 4.0, 4.0]);
    // A constant image stays constant under every resize and blur.
    let c = vec![0.3f32; 2 * 3 * 3];
    let up = resize::resize(&c, [2, 1, 3, 3], 7, 5, Upsample::Bilinear).unwrap();
    assert!(up.iter().all(|v| (v - 0.3).abs() < 1e-6));
    let mut b = c.clone();
    resize::gaussian_blur(&mut b, [2, 1, 3, 3], &[0.5, 0.0]).unwrap();
    assert!(b.iter().all(|v| (v - 0.3).abs() < 1e-6));
}

#[test]
fn augmentation_is_variance_preserving_at_its_level() {
    assert_eq!(resize::aug_alpha_bar(0.0), 1.0);
    assert!(resize::aug_alpha_bar(1.0) < 1e-12);
    let rows = 4;
    let per = 20_000;
    let mut x = vec![0.5f32; rows * per];
    resize::augment(&mut x, rows, &[0.0, 0.3, 0.7, 1.0], 9, 3).unwrap();
    for (r, &s) in [0.0f32, 0.3, 0.7, 1.0].iter().enumerate() {
        let row = &x[r * per..(r + 1) * per];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
        let a = resize::aug_alpha_bar(s) as f64;
        assert!(
            (mean - 0.5 * a.sqrt()).abs() < 0.02,
            "level {s}: mean {mean}"
        );
        assert!((var - (1.0 - a)).abs() < 0.03, "level {s}: var {var}");
    }
    assert!(resize::augment(&mut x, rows, &[0.0, 0.3, 0.7, 1.5], 9, 3).is_err());
}

fn sr_config() -> ModelConfig {
    ModelConfig::Unet(UNetConfig {
        in_channels: 1,
        image_size: 8,
        base_channels: 8,
        channel_mult: vec![1, 2],
        num_res_blocks: 1.into(),
        attention_resolutions: vec![],
        num_heads: 1,
        groups: 4,
        num_classes: 0,
        cond_channels: 1,
        aug_embed: true,
        ..UNetConfig::default()
    })
}

#[test]
fn super_resolution_unet_reads_its_conditioning_image_and_level() {
    let model = Model::new(sr_config(), 2, &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..2 * 64)
        .map(|i| ((i * 7 % 13) as f32 / 6.5) - 1.0)
        .collect();
    let low: Vec<f32> = (0..2 * 16)
        .map(|i| ((i * 5 % 11) as f32 / 5.5) - 1.0)
        .collect();
    let e = model
        .predict_host(&x, &[2, 1, 8, 8], &[10, 10], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("low-resolution image"), "{e}");
    // Zero-initialised output conv: move every layer a little first.
    for (_, v) in model.params().named_vars() {
        let n = v.elem_count();
        let d: Vec<f32> = (0..n).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.01).collect();
        let d = Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + d).unwrap()).unwrap();
    }
    let m = model
        .with_low_res(&low, &[2, 1, 4, 4], 0.0, None, Upsample::Bilinear)
        .unwrap();
    let a = m.predict_host(&x, &[2, 1, 8, 8], &[10, 10], None).unwrap();
    // Another conditioning image or level changes the output; the same one repeats it.
    let other: Vec<f32> = low.iter().map(|v| -v).collect();
    let m2 = model
        .with_low_res(&other, &[2, 1, 4, 4], 0.0, None, Upsample::Bilinear)
        .unwrap();
    assert_ne!(
        a.data,
        m2.predict_host(&x, &[2, 1, 8, 8], &[10, 10], None)
            .unwrap()
            .data
    );
    let m3 = model
        .with_low_res(&low, &[2, 1, 4, 4], 0.5, None, Upsample::Bilinear)
        .unwrap();
    assert_ne!(
        a.data,
        m3.predict_host(&x, &[2, 1, 8, 8], &[10, 10], None)
            .unwrap()
            .data
    );
    assert_eq!(
        a.data,
        m.predict_host(&x, &[2, 1, 8, 8], &[10, 10], None)
            .unwrap()
            .data
    );
    // A doubled (guided) batch repeats the conditioning rows.
    let mut xx = x.clone();
    xx.extend_from_slice(&x);
    let big = m.predict_host(&xx, &[4, 1, 8, 8], &[10; 4], None).unwrap();
    assert_eq!(&big.data[..128], &a.data[..]);
    assert_eq!(&big.data[128..], &a.data[..]);
    // Bad conditioning is a clear error.
    assert!(model
        .with_low_res(&low, &[2, 2, 4, 2], 0.0, None, Upsample::Bilinear)
        .is_err());
    assert!(model
        .with_low_res(&low, &[2, 1, 4, 4], 1.5, None, Upsample::Bilinear)
        .is_err());
    assert!(m
        .predict_host(&x[..64], &[1, 1, 8, 8], &[10], None)
        .is_err());
    let plain = Model::new(ModelConfig::Unet(UNetConfig::default()), 0, &Device::Cpu).unwrap();
    assert!(plain
        .with_low_res(&low, &[2, 1, 4, 4], 0.0, None, Upsample::Bilinear)
        .is_err());
}
