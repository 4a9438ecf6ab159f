//! Timing helpers shared by the kernel examples (`#[path]`-included, not an example itself).
#![allow(dead_code)]

use std::time::Instant;

use candle_core::{DType, Result, Tensor};

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds over `reps` runs of `f` (the first run, a warm-up, is left out); with
/// `backward`, each run also takes the gradients of Σ y².
pub fn time_ms(reps: usize, backward: bool, f: impl Fn() -> Result<Tensor>) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let y = f()?;
        if backward {
            y.sqr()?.sum_all()?.backward()?;
        } else {
            y.to_dtype(DType::F32)?;
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times[1..].to_vec()))
}
