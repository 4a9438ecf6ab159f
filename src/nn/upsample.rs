//! Nearest-neighbour 2x upsampling, [B, C, H, W] → [B, C, 2H, 2W], as a candle custom op.
//!
//! candle's `upsample_nearest2d` backward runs one grouped convolution per channel; as a
//! broadcast (`reshape → broadcast_as → contiguous`) it is a strided copy forward and a
//! reduction over two broadcast axes backward. Here the forward writes each input row twice,
//! widened, and the backward sums each 2x2 block in one pass. Planes are independent, so any
//! split over threads gives the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{contiguous, msg, use_kernel, Elem};
use crate::kernels::PARALLEL_MIN_ELEMENTS;

type CResult<T> = candle_core::Result<T>;

/// One input plane [h, w] into its output plane [2h, 2w].
fn widen_plane<T: Elem>(w: usize, x: &[T], y: &mut [T]) {
    for (src, dst) in x.chunks_exact(w).zip(y.chunks_exact_mut(4 * w)) {
        let (top, bottom) = dst.split_at_mut(2 * w);
        for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
            pair[0] = v;
            pair[1] = v;
        }
        bottom.copy_from_slice(top);
    }
}

/// One output-gradient plane [2h, 2w] summed into its input-gradient plane [h, w].
fn sum_plane<T: Elem>(w: usize, gy: &[T], gx: &mut [T]) {
    for (src, dst) in gy.chunks_exact(4 * w).zip(gx.chunks_exact_mut(w)) {
        let (top, bottom) = src.split_at(2 * w);
        for ((d, t), b) in dst
            .iter_mut()
            .zip(top.chunks_exact(2))
            .zip(bottom.chunks_exact(2))
        {
            let mut s = t[0];
            s += t[1];
            s += b[0];
            s += b[1];
            *d = s;
        }
    }
}

/// Runs `f(in_plane, out_plane)` over the planes, on the pool when there is enough work.
fn planes<T: Elem>(
    input: &[T],
    in_plane: usize,
    out_len: usize,
    out_plane: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::ZERO; out_len];
    if out_len < PARALLEL_MIN_ELEMENTS || !crate::kernels::parallel_allowed() {
        for (i, o) in input
            .chunks_exact(in_plane)
            .zip(out.chunks_exact_mut(out_plane))
        {
            f(i, o);
        }
    } else {
        out.par_chunks_exact_mut(out_plane)
            .zip(input.par_chunks_exact(in_plane))
            .for_each(|(o, i)| f(i, o));
    }
    out
}

/// The forward (widen) or the backward (sum) for a [B, C, H, W] input of width `w`.
struct Upsample2x {
    /// (B, C, H, W) of the op's input: x for the forward, gx's shape for the backward.
    dims: (usize, usize, usize, usize),
    backward: bool,
}

impl Upsample2x {
    fn run<T: Elem + candle_core::WithDType>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.dims;
        let input = contiguous(s.as_slice::<T>()?, l)?;
        let (small, large) = (h * w, 4 * h * w);
        if self.backward {
            let gx = planes(input, large, b * c * small, small, |gy, gx| {
                sum_plane(w, gy, gx)
            });
            Ok((T::storage(gx), Shape::from((b, c, h, w))))
        } else {
            let y = planes(input, small, b * c * large, large, |x, y| {
                widen_plane(w, x, y)
            });
            Ok((T::storage(y), Shape::from((b, c, 2 * h, 2 * w))))
        }
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        if self.backward {
            "ferrodiff-upsample-nearest-2x-backward"
        } else {
            "ferrodiff-upsample-nearest-2x"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.run::<f32>(s, l),
            CpuStorage::F64(_) => self.run::<f64>(s, l),
            _ => Err(msg("upsample: the CPU kernel takes f32 or f64")),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, gy: &Tensor) -> CResult<Option<Tensor>> {
        let op = Upsample2x {
            dims: self.dims,
            backward: true,
        };
        Ok(Some(gy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// Nearest-neighbour 2x upsampling of x [B, C, H, W], differentiable. CPU f32/f64 tensors run
/// the kernel, others (and `FERRODIFF_REFERENCE_KERNELS=1`) the broadcast reference.
pub fn upsample_nearest_2x(x: &Tensor) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !use_kernel(x) {
        return upsample_nearest_2x_reference(x);
    }
    x.contiguous()?.apply_op1(Upsample2x {
        dims: (b, c, h, w),
        backward: false,
    })
}

/// The same as a broadcast of candle ops.
pub fn upsample_nearest_2x_reference(x: &Tensor) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{
        assert_same_for_any_thread_count, filled, flat, max_diff, value_and_grad as run,
    };
    use candle_core::DType;

    const SHAPES: [[usize; 4]; 4] = [[1, 1, 1, 1], [2, 3, 4, 5], [1, 2, 7, 1], [4, 64, 16, 16]];

    #[test]
    fn matches_candle_in_value_and_the_broadcast_in_gradient() {
        for shape in SHAPES {
            let x = filled(&shape, 1, DType::F64);
            let (y, g) = run(upsample_nearest_2x, &x);
            let candle = x.upsample_nearest2d(2 * shape[2], 2 * shape[3]).unwrap();
            assert_eq!(max_diff(&y, &candle), 0.0, "{shape:?}");
            let (ry, rg) = run(upsample_nearest_2x_reference, &x);
            assert_eq!(max_diff(&y, &ry), 0.0, "{shape:?}");
            assert!(max_diff(&g, &rg) < 1e-15, "{shape:?}");
        }
    }

    /// The gradient of a linear map is exact: element (i, j) of gx is the sum of the probe over
    /// its 2x2 block, computed here directly.
    #[test]
    fn gradient_is_the_probe_summed_over_each_block() {
        let x = filled(&[2, 3, 4, 5], 2, DType::F64);
        let (_, g) = run(upsample_nearest_2x, &x);
        let p = filled(&[2, 3, 8, 10], 7, DType::F64)
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for plane in 0..6 {
            for i in 0..4 {
                for j in 0..5 {
                    let at = |r: usize, c: usize| p[plane * 80 + r * 10 + c];
                    let want = at(2 * i, 2 * j)
                        + at(2 * i, 2 * j + 1)
                        + at(2 * i + 1, 2 * j)
                        + at(2 * i + 1, 2 * j + 1);
                    assert!((g[plane * 20 + i * 5 + j] - want).abs() < 1e-15);
                }
            }
        }
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let x = filled(&[4, 64, 16, 16], 3, DType::F32);
        assert_same_for_any_thread_count(|| {
            let (y, g) = run(upsample_nearest_2x, &x);
            flat::<f32>(&[&y, &g])
        });
    }

    #[test]
    fn a_non_4d_input_is_an_error() {
        assert!(upsample_nearest_2x(&filled(&[2, 3, 4], 0, DType::F32)).is_err());
    }
}
