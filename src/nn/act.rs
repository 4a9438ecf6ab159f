//! Activations as candle custom ops with their own backward: SiLU, x · σ(x), and GELU in its
//! tanh approximation (Hendrycks & Gimpel 2016), the MLP activation of the Diffusion
//! Transformer.
//!
//! candle's `silu` calls the scalar `expf` per element, and its backward is five elementwise
//! ops (each a full pass allocating its result); its `gelu` backward is a dozen. Here each
//! forward is one pass and each backward one pass, with the vectorised `exp` of
//! [`crate::kernels::simd`]: SiLU's backward is g · σ(x) · (1 + x (1 − σ(x))), and GELU is
//! written x · σ(z) with z = 2√(2/π) (x + 0.044715 x³) (as 0.5 (1 + tanh u) = σ(2u)), whose
//! derivative is σ(z) + x σ(z) (1 − σ(z)) dz/dx. Elements are independent, so any split over
//! threads gives the same bits.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;

use super::kernels::{contiguous, msg, use_kernel, Elem};
use crate::kernels::for_each_chunk;
use crate::kernels::simd::avx2_twin;

type CResult<T> = candle_core::Result<T>;

#[inline(always)]
fn sigmoid<T: Elem + Float>(x: T) -> T {
    T::one() / (T::one() + (-x).fast_exp())
}

avx2_twin! {
    fn forward_chunk<T>(x: &[T], y: &mut [T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * sigmoid(v);
        }
    }
}

avx2_twin! {
    fn backward_chunk<T>(x: &[T], g: &[T], gx: &mut [T]) {
        for ((o, &v), &gv) in gx.iter_mut().zip(x).zip(g) {
            let s = sigmoid(v);
            *o = gv * s * (T::one() + v * (T::one() - s));
        }
    }
}

/// √(2/π), the slope of GELU's tanh approximation (Hendrycks & Gimpel 2016).
const GELU_SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of GELU's tanh approximation (Hendrycks & Gimpel 2016).
const GELU_CUBIC: f64 = 0.044_715;

/// Inputs are clamped to ±GELU_SATURATED inside σ and its derivative: beyond ±40 σ(z) is 0 or
/// 1 to f64 precision (z < -4500), so nothing changes, but x³ and the derivative's x² · σ (1 − σ)
/// can no longer overflow into inf · 0 = NaN for huge inputs.
const GELU_SATURATED: f64 = 1e4;

/// (2√(2/π), 0.044715, GELU_SATURATED) in T: z = c (x + a x³) is twice tanh's argument.
#[inline(always)]
fn gelu_constants<T: Float>() -> (T, T, T) {
    (
        T::from(2.0 * GELU_SQRT_2_OVER_PI).unwrap_or(T::zero()),
        T::from(GELU_CUBIC).unwrap_or(T::zero()),
        T::from(GELU_SATURATED).unwrap_or(T::zero()),
    )
}

/// x clamped to [-k, k] with comparisons (a NaN stays NaN), so the loop vectorises.
#[inline(always)]
fn clamp<T: Float>(x: T, k: T) -> T {
    let x = if x > k { k } else { x };
    if x < -k {
        -k
    } else {
        x
    }
}

avx2_twin! {
    fn gelu_forward_chunk<T>(x: &[T], y: &mut [T]) {
        let (c, a, k) = gelu_constants::<T>();
        for (o, &v) in y.iter_mut().zip(x) {
            let vc = clamp(v, k);
            *o = v * sigmoid(c * (vc + a * vc * vc * vc));
        }
    }
}

avx2_twin! {
    fn gelu_backward_chunk<T>(x: &[T], g: &[T], gx: &mut [T]) {
        let (c, a, k) = gelu_constants::<T>();
        let three_a = a + a + a;
        for ((o, &v), &gv) in gx.iter_mut().zip(x).zip(g) {
            let vc = clamp(v, k);
            // 1 − σ(z) as e^(−z) σ(z): no cancellation where σ(z) is near 1.
            let e = (-(c * (vc + a * vc * vc * vc))).fast_exp();
            let s = T::one() / (T::one() + e);
            let dz = c * (T::one() + three_a * vc * vc);
            *o = gv * (s + vc * s * (e * s) * dz);
        }
    }
}

/// GELU(x) elementwise (in parallel when large).
pub(super) fn gelu_tanh_values<T: Elem + Float>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    for_each_chunk(&mut y, |start, o| {
        gelu_forward_chunk(&x[start..start + o.len()], o)
    });
    y
}

/// g · GELU'(x) elementwise (in parallel when large).
pub(super) fn gelu_tanh_backward<T: Elem + Float>(x: &[T], g: &[T]) -> Vec<T> {
    let mut gx = vec![T::ZERO; x.len()];
    for_each_chunk(&mut gx, |start, o| {
        let r = start..start + o.len();
        gelu_backward_chunk(&x[r.clone()], &g[r], o)
    });
    gx
}

/// Which activation an [`Activation`] op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Silu,
    GeluTanh,
}

impl Kind {
    fn name(self, backward: bool) -> &'static str {
        match (self, backward) {
            (Kind::Silu, false) => "ferrodiff-silu",
            (Kind::Silu, true) => "ferrodiff-silu-backward",
            (Kind::GeluTanh, false) => "ferrodiff-gelu-tanh",
            (Kind::GeluTanh, true) => "ferrodiff-gelu-tanh-backward",
        }
    }
}

/// y = act(x); differentiable through [`ActivationBackward`].
struct Activation(Kind);
/// (x, gy) -> gx.
struct ActivationBackward(Kind);

impl Activation {
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s.as_slice::<T>()?, l)?;
        let mut y = vec![T::ZERO; x.len()];
        for_each_chunk(&mut y, |start, o| {
            let x = &x[start..start + o.len()];
            match self.0 {
                Kind::Silu => forward_chunk(x, o),
                Kind::GeluTanh => gelu_forward_chunk(x, o),
            }
        });
        Ok((T::storage(y), l.shape().clone()))
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        self.0.name(false)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.run::<f32>(s, l),
            CpuStorage::F64(_) => self.run::<f64>(s, l),
            _ => Err(msg(format!(
                "{}: the CPU kernel takes f32 or f64",
                self.name()
            ))),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &gy.contiguous()?,
            &ActivationBackward(self.0),
        )?))
    }
}

impl ActivationBackward {
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, g) = (
            contiguous(s1.as_slice::<T>()?, l1)?,
            contiguous(s2.as_slice::<T>()?, l2)?,
        );
        if x.len() != g.len() {
            return Err(msg(format!(
                "{}: gradient and input differ in size",
                self.name()
            )));
        }
        let mut gx = vec![T::ZERO; x.len()];
        for_each_chunk(&mut gx, |start, o| {
            let r = start..start + o.len();
            match self.0 {
                Kind::Silu => backward_chunk(&x[r.clone()], &g[r], o),
                Kind::GeluTanh => gelu_backward_chunk(&x[r.clone()], &g[r], o),
            }
        });
        Ok((T::storage(gx), l1.shape().clone()))
    }
}

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        self.0.name(true)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>((s1, l1), (s2, l2)),
            CpuStorage::F64(_) => self.run::<f64>((s1, l1), (s2, l2)),
            _ => Err(msg(format!(
                "{}: the CPU kernel takes f32 or f64",
                self.name()
            ))),
        }
    }
}

/// x · σ(x), differentiable. CPU f32/f64 tensors run the fused kernel, others (and
/// `FERRODIFF_REFERENCE_KERNELS=1`) candle's `silu`.
pub fn silu(x: &Tensor) -> CResult<Tensor> {
    if !use_kernel(x) {
        return x.silu();
    }
    x.contiguous()?.apply_op1(Activation(Kind::Silu))
}

/// GELU in its tanh approximation, 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))) (PyTorch's
/// `gelu(approximate="tanh")`, DiT's MLP activation), differentiable. CPU f32/f64 tensors run
/// the fused kernel, others (and `FERRODIFF_REFERENCE_KERNELS=1`) candle's `gelu` (the same
/// approximation).
pub fn gelu_tanh(x: &Tensor) -> CResult<Tensor> {
    if !use_kernel(x) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Activation(Kind::GeluTanh))
}

/// [`gelu_tanh`] written from candle's primitives with tanh (the tests' reference).
pub fn gelu_tanh_reference(x: &Tensor) -> CResult<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * GELU_CUBIC)?)? * GELU_SQRT_2_OVER_PI)?;
    (x * 0.5)? * (inner.tanh()? + 1.0)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{
        assert_same_for_any_thread_count, filled_scaled, flat, max_rel, value_and_grad as run,
    };
    use candle_core::DType;

    /// Shapes: a scalar-like one, odd sizes, and one large enough to split over threads.
    const SHAPES: [&[usize]; 4] = [&[1], &[3, 7], &[2, 5, 3, 3], &[3, 200, 129]];

    #[test]
    fn matches_candle_silu_in_value_and_gradient() {
        for (i, shape) in SHAPES.iter().enumerate() {
            // Up to ±40: sigmoid saturates at both ends.
            let x = filled_scaled(shape, i, DType::F64, 40.0);
            let reference = run(Tensor::silu, &x);
            let ours = run(silu, &x);
            assert!(
                max_rel(&ours.0, &reference.0, 1e-12) < 1e-14,
                "{shape:?} value"
            );
            assert!(
                max_rel(&ours.1, &reference.1, 1e-12) < 1e-14,
                "{shape:?} gradient"
            );
            let x32 = filled_scaled(shape, i, DType::F32, 8.0);
            let (y32, g32) = run(silu, &x32);
            let (ry, rg) = run(Tensor::silu, &x32.to_dtype(DType::F64).unwrap());
            let up = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            assert!(max_rel(&up(&y32), &ry, 1e-12) < 1e-6, "{shape:?} f32 value");
            assert!(
                max_rel(&up(&g32), &rg, 1e-12) < 1e-6,
                "{shape:?} f32 gradient"
            );
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = filled_scaled(&[4, 9], 3, DType::F64, 6.0);
        let (_, g) = run(silu, &x);
        let probe = filled_scaled(&[4, 9], 7, DType::F64, 1.0);
        let loss = |x: &Tensor| -> f64 {
            (silu(x).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gs = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..xs.len() {
            let mut up = xs.clone();
            let mut down = xs.clone();
            up[i] += h;
            down[i] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (4, 9), x.device()).unwrap();
            let fd = (loss(&t(up)) - loss(&t(down))) / (2.0 * h);
            assert!((fd - gs[i]).abs() < 1e-7, "element {i}: {fd} vs {}", gs[i]);
        }
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let x = filled_scaled(&[3, 200, 129], 1, DType::F32, 10.0);
        assert_same_for_any_thread_count(|| {
            let (y, g) = run(silu, &x);
            flat::<f32>(&[&y, &g])
        });
    }

    #[test]
    fn extreme_inputs_stay_finite_and_nan_propagates() {
        let x = Tensor::new(
            &[-1e30f32, -100.0, 0.0, 100.0, 1e30],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (y, g) = run(silu, &x);
        let (y, g) = (y.to_vec1::<f32>().unwrap(), g.to_vec1::<f32>().unwrap());
        assert!(y.iter().chain(&g).all(|v| v.is_finite()), "{y:?} {g:?}");
        assert_eq!((y[2], y[3], y[4]), (0.0, 100.0, 1e30));
        assert!(y[0].abs() < 1e-6 && y[1].abs() < 1e-30);
        let nan = Tensor::new(&[f32::NAN, 1.0], &candle_core::Device::Cpu).unwrap();
        assert!(silu(&nan).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn gelu_matches_the_tanh_formula_in_value_and_gradient_and_candles_gelu_in_value() {
        for (i, shape) in SHAPES.iter().enumerate() {
            // Up to ±12: the sigmoid saturates and the cubic dominates at both ends. (candle's
            // own gelu backward differs from the formula's derivative by about 3e-6, so only
            // its value is compared.)
            let x = filled_scaled(shape, i + 3, DType::F64, 12.0);
            let reference = run(gelu_tanh_reference, &x);
            let candle = run(Tensor::gelu, &x);
            let ours = run(gelu_tanh, &x);
            for (name, a, b) in [
                ("value", &ours.0, &reference.0),
                ("gradient", &ours.1, &reference.1),
                ("candle's value", &candle.0, &reference.0),
            ] {
                let e = max_rel(a, b, 1e-12);
                assert!(e < 1e-13, "{shape:?} {name}: {e}");
            }
            let x32 = filled_scaled(shape, i + 3, DType::F32, 6.0);
            let (y32, g32) = run(gelu_tanh, &x32);
            let (ry, rg) = run(gelu_tanh_reference, &x32.to_dtype(DType::F64).unwrap());
            let up = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (ey, eg) = (
                max_rel(&up(&y32), &ry, 1e-12),
                max_rel(&up(&g32), &rg, 1e-12),
            );
            assert!(ey < 1e-6, "{shape:?} f32 value: {ey}");
            assert!(eg < 1e-6, "{shape:?} f32 gradient: {eg}");
        }
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        let x = filled_scaled(&[4, 9], 5, DType::F64, 5.0);
        let (_, g) = run(gelu_tanh, &x);
        let probe = filled_scaled(&[4, 9], 7, DType::F64, 1.0);
        let loss = |x: &Tensor| -> f64 {
            (gelu_tanh(x).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gs = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..xs.len() {
            let (mut up, mut down) = (xs.clone(), xs.clone());
            up[i] += h;
            down[i] -= h;
            let t = |v: Vec<f64>| Tensor::from_vec(v, (4, 9), x.device()).unwrap();
            let fd = (loss(&t(up)) - loss(&t(down))) / (2.0 * h);
            assert!((fd - gs[i]).abs() < 1e-7, "element {i}: {fd} vs {}", gs[i]);
        }
    }

    #[test]
    fn gelu_is_bit_identical_for_any_thread_count_and_finite_at_extremes() {
        let x = filled_scaled(&[3, 200, 129], 2, DType::F32, 10.0);
        assert_same_for_any_thread_count(|| {
            let (y, g) = run(gelu_tanh, &x);
            flat::<f32>(&[&y, &g])
        });
        let x = Tensor::new(
            &[-1e30f32, -100.0, -5.0, 0.0, 5.0, 100.0, 1e30],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (y, g) = run(gelu_tanh, &x);
        let (y, g) = (y.to_vec1::<f32>().unwrap(), g.to_vec1::<f32>().unwrap());
        assert!(y.iter().chain(&g).all(|v| v.is_finite()), "{y:?} {g:?}");
        assert_eq!((y[3], y[5], y[6]), (0.0, 100.0, 1e30));
        assert!(y[0].abs() < 1e-6 && y[1].abs() < 1e-30);
    }
}
