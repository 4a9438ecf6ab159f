//! Per-op timings of the network kernels, for `benches/bench_train.py`'s per-op table: each op
//! alone on random inputs, forward and forward + backward of its sum, median over repeats.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::{act, ada_norm, attention, kernels, linear, norm};
use crate::error::Result;
use crate::value_error;

/// The ops [`time_op`] knows, with the meaning of their `dims`.
pub const OPS: [(&str, &str); 8] = [
    (
        "conv2d",
        "[B, Cin, H, W, Cout, k, stride]: k x k convolution with bias, padding k / 2",
    ),
    (
        "group_norm_silu",
        "[B, C, H, W, groups]: SiLU(GroupNorm(x) · γ + β)",
    ),
    ("attention", "[BH, N, D]: softmax(q kᵀ / √D) v"),
    ("linear_silu", "[N, Din, Dout]: SiLU(x Wᵀ + b)"),
    ("silu", "[N, D]: x · σ(x)"),
    (
        "modulated_layer_norm",
        "[B, N, D]: LN(x) · (1 + scale) + shift, scale and shift [B, D] (DiT's adaLN)",
    ),
    ("gelu_tanh", "[N, D]: GELU, tanh approximation"),
    (
        "token_attention",
        "[B, N, heads, hd]: multi-head self-attention from qkv [B, N, 3·heads·hd]",
    ),
];

/// An op applied to its input variables.
type OpFn = dyn Fn(&[Var]) -> candle_core::Result<Tensor>;

fn var(shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        shape,
        &Device::Cpu,
    )?)?)
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] * 1e3
}

/// Median milliseconds of (forward, forward + backward) of `op` over `repeats` runs after
/// one warm-up. Inputs (and the parameters the op has) are variables, so the backward computes
/// every gradient, as in training.
pub fn time_op(op: &str, dims: &[usize], repeats: usize) -> Result<(f64, f64)> {
    let want = |n: usize| -> Result<()> {
        if dims.len() != n || dims.contains(&0) {
            value_error!("{op} takes {n} positive sizes, got {dims:?}");
        }
        Ok(())
    };
    let vars: Vec<Var>;
    let f: Box<OpFn> = match op {
        "conv2d" => {
            want(7)?;
            let (b, cin, h, w, cout, k, stride) = (
                dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6],
            );
            vars = vec![
                var(&[b, cin, h, w])?,
                var(&[cout, cin, k, k])?,
                var(&[cout])?,
            ];
            Box::new(move |v| {
                kernels::conv2d_bias(
                    v[0].as_tensor(),
                    v[1].as_tensor(),
                    v[2].as_tensor(),
                    stride,
                    k / 2,
                )
            })
        }
        "group_norm_silu" => {
            want(5)?;
            let (b, c, groups) = (dims[0], dims[1], dims[4]);
            vars = vec![var(&dims[..4])?, var(&[c])?, var(&[c])?];
            Box::new(move |v| {
                let a = v[1].as_tensor().unsqueeze(0)?.broadcast_as((b, c))?;
                let d = v[2].as_tensor().unsqueeze(0)?.broadcast_as((b, c))?;
                norm::group_norm(v[0].as_tensor(), &a, &d, groups, 1e-5, norm::Act::Silu)
            })
        }
        "attention" => {
            want(3)?;
            vars = vec![var(dims)?, var(dims)?, var(dims)?];
            let scale = 1.0 / (dims[2] as f64).sqrt();
            Box::new(move |v| {
                attention::attention(v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor(), scale)
            })
        }
        "linear_silu" => {
            want(3)?;
            vars = vec![
                var(&[dims[0], dims[1]])?,
                var(&[dims[2], dims[1]])?,
                var(&[dims[2]])?,
            ];
            Box::new(|v| {
                act::silu(&linear::linear(
                    v[0].as_tensor(),
                    v[1].as_tensor(),
                    v[2].as_tensor(),
                )?)
            })
        }
        "silu" => {
            want(2)?;
            vars = vec![var(dims)?];
            Box::new(|v| act::silu(v[0].as_tensor()))
        }
        "modulated_layer_norm" => {
            want(3)?;
            // m = [shift | scale]
            vars = vec![var(dims)?, var(&[dims[0], 2 * dims[2]])?];
            Box::new(|v| {
                ada_norm::modulated_layer_norm(
                    v[0].as_tensor(),
                    v[1].as_tensor(),
                    0,
                    1,
                    ada_norm::LAYER_NORM_EPS,
                )
            })
        }
        "gelu_tanh" => {
            want(2)?;
            vars = vec![var(dims)?];
            Box::new(|v| act::gelu_tanh(v[0].as_tensor()))
        }
        "token_attention" => {
            want(4)?;
            let heads = dims[2];
            vars = vec![var(&[dims[0], dims[1], 3 * heads * dims[3]])?];
            Box::new(move |v| attention::token_self_attention(v[0].as_tensor(), heads))
        }
        _ => {
            let names: Vec<&str> = OPS.iter().map(|(n, _)| *n).collect();
            value_error!("unknown op {op:?}; the ops are {names:?}")
        }
    };
    if repeats == 0 {
        value_error!("repeats must be positive");
    }
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for i in 0..=repeats {
        let t0 = Instant::now();
        let y = f(&vars)?;
        let t1 = Instant::now();
        let grads = y.sum_all()?.to_dtype(DType::F32)?.backward()?;
        let t2 = Instant::now();
        drop(grads);
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            both.push((t2 - t0).as_secs_f64());
        }
    }
    Ok((median_ms(fwd), median_ms(both)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_runs_and_bad_requests_are_errors() {
        for (op, dims) in [
            ("conv2d", vec![2, 3, 5, 5, 4, 3, 1]),
            ("group_norm_silu", vec![2, 4, 3, 3, 2]),
            ("attention", vec![2, 5, 4]),
            ("linear_silu", vec![3, 4, 5]),
            ("silu", vec![3, 4]),
            ("modulated_layer_norm", vec![2, 3, 4]),
            ("gelu_tanh", vec![3, 4]),
            ("token_attention", vec![2, 3, 2, 4]),
        ] {
            let (f, b) = time_op(op, &dims, 2).unwrap();
            assert!(f > 0.0 && b >= f, "{op}: {f} {b}");
        }
        assert!(time_op("conv3d", &[1], 1).is_err());
        assert!(time_op("silu", &[3], 1).is_err());
        assert!(time_op("silu", &[3, 0], 1).is_err());
        assert!(time_op("silu", &[3, 4], 0).is_err());
    }
}
