//! Per-op timing of the conv2d kernel against candle's conv2d, forward and forward + backward,
//! side by side in one process (RAYON_NUM_THREADS sets the threads):
//!
//!     cargo run --release --example bench_conv
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use ferrodiff::nn::kernels::conv2d;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    // (batch, cin, cout, side, stride): the 28x28 U-Net's convs and the 8x8 U-Net's.
    let cases = [
        (64, 32, 32, 28, 1),
        (64, 64, 64, 14, 1),
        (64, 32, 32, 28, 2),
        (128, 64, 64, 8, 1),
        (128, 64, 64, 4, 1),
    ];
    println!(
        "threads {} | ms, median of 5 (after 1 warm-up)",
        rayon::current_num_threads()
    );
    println!("| conv (B, Cin->Cout, side, stride) | candle fwd | ours fwd | candle fwd+bwd | ours fwd+bwd | speed-up fwd+bwd |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (b, cin, cout, side, stride) in cases {
        let x = Var::from_tensor(&Tensor::randn(
            0f32,
            1.0,
            (b, cin, side, side),
            &Device::Cpu,
        )?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &Device::Cpu)?)?;
        let run = |ours: bool, backward: bool| -> candle_core::Result<f64> {
            let mut times = Vec::new();
            for _ in 0..6 {
                let t0 = Instant::now();
                let y = if ours {
                    conv2d(x.as_tensor(), w.as_tensor(), stride, 1)?
                } else {
                    x.as_tensor().conv2d(w.as_tensor(), 1, stride, 1, 1)?
                };
                if backward {
                    let g = y.sqr()?.sum_all()?.backward()?;
                    assert!(g.get(w.as_tensor()).is_some());
                } else {
                    let _ = y.to_dtype(DType::F32)?;
                }
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok(median(times[1..].to_vec()))
        };
        let (cf, of, cb, ob) = (
            run(false, false)?,
            run(true, false)?,
            run(false, true)?,
            run(true, true)?,
        );
        println!(
            "| ({b}, {cin}->{cout}, {side}, {stride}) | {cf:.1} | {of:.1} | {cb:.1} | {ob:.1} | {:.1}x |",
            cb / ob
        );
    }
    Ok(())
}
