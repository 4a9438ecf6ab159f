//! Helpers shared by the kernels' tests: deterministic inputs, error measures, thread pools.

use candle_core::{DType, Device, Tensor, Var};

/// A deterministic, irregular tensor with values in [-amp, amp].
pub fn filled_scaled(shape: &[usize], seed: usize, dtype: DType, amp: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| amp * ((((i * 7919 + seed * 104_729) % 1009) as f64 / 504.5) - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// `filled_scaled` with values in [-1, 1].
pub fn filled(shape: &[usize], seed: usize, dtype: DType) -> Tensor {
    filled_scaled(shape, seed, dtype, 1.0)
}

/// max |a|, as f64.
pub fn max_abs(a: &Tensor) -> f64 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).unwrap())
}

/// max |a − b| / max |b| (the denominator floored at `floor`).
pub fn max_rel(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    max_diff(a, b) / max_abs(b).max(floor)
}

/// Runs `f` on a rayon pool of `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Value of a one-input op and its gradient, of Σ f(x) · probe with a fixed irregular probe
/// (amplitude 1), as the tests of the elementwise kernels take them.
pub fn value_and_grad(
    f: fn(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor()).unwrap();
    let probe = filled_scaled(y.dims(), 7, y.dtype(), 1.0);
    let g = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (y, g.get(v.as_tensor()).unwrap().clone())
}

/// Tensors as flat vectors.
pub fn flat<T: candle_core::WithDType>(ts: &[&Tensor]) -> Vec<Vec<T>> {
    ts.iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<T>().unwrap())
        .collect()
}

/// Runs `f` on rayon pools of 1, 2 and 3 threads and asserts the three results are equal (bit
/// for bit, for float vectors).
pub fn assert_same_for_any_thread_count<R: PartialEq + std::fmt::Debug + Send>(
    f: impl Fn() -> R + Sync,
) {
    let one = with_threads(1, &f);
    assert_eq!(one, with_threads(2, &f));
    assert_eq!(one, with_threads(3, &f));
}
