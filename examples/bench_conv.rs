//! Per-op timing of the conv2d kernel against candle's conv2d, forward and forward + backward,
//! side by side in one process (RAYON_NUM_THREADS sets the threads):
//!
//!     cargo run --release --example bench_conv
#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Tensor, Var};
use ferrodiff::nn::kernels::conv2d;

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
            common::time_ms(6, backward, || {
                if ours {
                    conv2d(x.as_tensor(), w.as_tensor(), stride, 1)
                } else {
                    x.as_tensor().conv2d(w.as_tensor(), 1, stride, 1, 1)
                }
            })
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
