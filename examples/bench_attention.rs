//! Per-op timing of the fused attention kernel against the same attention from candle ops,
//! forward and forward + backward, side by side in one process (RAYON_NUM_THREADS sets the
//! kernel's threads; CANDLE_NUM_THREADS=1 keeps candle's own pool from competing):
//!
//!     CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 cargo run --release --example bench_attention
//!
//! The reference is called directly: `FERRODIFF_REFERENCE_KERNELS` is read once per process.
#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Tensor, Var};
use ferrodiff::nn::attention::{attention, attention_reference};

fn main() -> candle_core::Result<()> {
    // (BH, N = M, D): the U-Net's self-attention at 8x8 (batch 128) and 7x7 (batch 64), one
    // 64-wide head.
    let cases = [(128, 64, 64), (64, 49, 64)];
    let reps = 11;
    println!(
        "threads {} | ms, median of {} (after 1 warm-up)",
        rayon::current_num_threads(),
        reps - 1
    );
    println!("| attention (BH, N=M, D) | candle fwd | ours fwd | candle fwd+bwd | ours fwd+bwd | speed-up fwd | speed-up fwd+bwd |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (bh, n, d) in cases {
        let new = || -> candle_core::Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (bh, n, d), &Device::Cpu)?)
        };
        let (q, k, v) = (new()?, new()?, new()?);
        let scale = 1.0 / (d as f64).sqrt();
        let run = |ours: bool, backward: bool| -> candle_core::Result<f64> {
            let f = if ours { attention } else { attention_reference };
            common::time_ms(reps, backward, || {
                f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)
            })
        };
        let (cf, of, cb, ob) = (
            run(false, false)?,
            run(true, false)?,
            run(false, true)?,
            run(true, true)?,
        );
        println!(
            "| ({bh}, {n}, {d}) | {cf:.2} | {of:.2} | {cb:.2} | {ob:.2} | {:.1}x | {:.1}x |",
            cf / of,
            cb / ob
        );
    }
    Ok(())
}
