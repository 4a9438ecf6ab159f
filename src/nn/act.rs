//! SiLU, x · σ(x), as a candle custom op with its own backward.
//!
//! candle's `silu` calls the scalar `expf` per element, and its backward is five elementwise
//! ops (each a full pass allocating its result). Here the forward is one pass and the
//! backward one pass, g · σ(x) · (1 + x (1 − σ(x))), with the vectorised `exp` of
//! [`crate::kernels::simd`]. Elements are independent, so any split over threads gives the
//! same bits.

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

struct Silu;
struct SiluBackward;

impl Silu {
    fn run<T: Elem + Float + candle_core::WithDType>(
        s: &CpuStorage,
        l: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s.as_slice::<T>()?, l)?;
        let mut y = vec![T::ZERO; x.len()];
        for_each_chunk(&mut y, |start, o| {
            forward_chunk(&x[start..start + o.len()], o)
        });
        Ok((T::storage(y), l.shape().clone()))
    }
}

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "ferrodiff-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => Self::run::<f32>(s, l),
            CpuStorage::F64(_) => Self::run::<f64>(s, l),
            _ => Err(msg("silu: the CPU kernel takes f32 or f64")),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &SiluBackward)?))
    }
}

impl SiluBackward {
    fn run<T: Elem + Float + candle_core::WithDType>(
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, g) = (
            contiguous(s1.as_slice::<T>()?, l1)?,
            contiguous(s2.as_slice::<T>()?, l2)?,
        );
        if x.len() != g.len() {
            return Err(msg("silu backward: gradient and input differ in size"));
        }
        let mut gx = vec![T::ZERO; x.len()];
        for_each_chunk(&mut gx, |start, o| {
            let r = start..start + o.len();
            backward_chunk(&x[r.clone()], &g[r], o)
        });
        Ok((T::storage(gx), l1.shape().clone()))
    }
}

impl CustomOp2 for SiluBackward {
    fn name(&self) -> &'static str {
        "ferrodiff-silu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => Self::run::<f32>((s1, l1), (s2, l2)),
            CpuStorage::F64(_) => Self::run::<f64>((s1, l1), (s2, l2)),
            _ => Err(msg("silu backward: the CPU kernel takes f32 or f64")),
        }
    }
}

/// x · σ(x), differentiable. CPU f32/f64 tensors run the fused kernel, others (and
/// `FERRODIFF_REFERENCE_KERNELS=1`) candle's `silu`.
pub fn silu(x: &Tensor) -> CResult<Tensor> {
    if !use_kernel(x) {
        return x.silu();
    }
    x.contiguous()?.apply_op1(Silu)
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
}
