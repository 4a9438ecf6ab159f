//! Fused linear layer kernel: y = x Wᵀ + b as one candle custom op with its own backward.
//!
//! From candle's ops a linear layer is a matrix multiply, a broadcast add of the bias, and in
//! the backward a reduction over the batch for the bias gradient, which candle runs as a slow
//! strided reduction over the first dimension. Here the forward starts every output row at the
//! bias and accumulates the product onto it; the backward computes the input gradient by rows
//! of the batch and the weight and bias gradients by rows of the output features, each part
//! written by one thread, so the result does not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{contiguous, matmul, msg, use_kernel, Elem};

type CResult<T> = candle_core::Result<T>;

/// Rows per parallel task: large enough for an efficient matrix multiply, small enough to
/// spread a batch of a few hundred rows over the threads.
const ROWS: usize = 256;

/// x [n, din] · wᵀ [din, dout].
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub(super) n: usize,
    pub(super) din: usize,
    pub(super) dout: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    /// (x, w, b) -> y.
    Forward,
    /// (gy, w) -> gx.
    InputGrad,
    /// (x, gy) -> packed [gw | gb].
    WeightGrad,
}

struct LinearOp {
    d: Dims,
    pass: Pass,
}

/// Batches of at least this many rows multiply by a transposed copy of the weight: gemm packs
/// a row-major right-hand side faster than a transposed view, which pays once the copy is
/// shared by enough rows.
const TRANSPOSE_MIN_ROWS: usize = 64;

/// y [n, dout] = x wᵀ + b.
pub(super) fn forward<T: Elem>(d: &Dims, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    // Every row starts at the bias, which the product is accumulated onto.
    let mut y = Vec::with_capacity(d.n * d.dout);
    for _ in 0..d.n {
        y.extend_from_slice(b);
    }
    let wt;
    // rhs = wᵀ [din, dout]: w read transposed, or its transposed copy read row-major.
    let (rhs, rhs_strides) = if d.n >= TRANSPOSE_MIN_ROWS {
        let mut t = vec![T::ZERO; d.din * d.dout];
        for (o, row) in w.chunks_exact(d.din).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                t[i * d.dout + o] = v;
            }
        }
        wt = t;
        (&wt[..], (1, d.dout as isize))
    } else {
        (w, (d.din as isize, 1))
    };
    y.par_chunks_mut(ROWS * d.dout)
        .zip(x.par_chunks(ROWS * d.din))
        .for_each(|(ys, xs)| {
            let rows = xs.len() / d.din;
            // ys [rows, dout] += xs [rows, din] · wᵀ [din, dout]
            let din = d.din as isize;
            matmul(
                rows,
                d.dout,
                d.din,
                ys,
                true,
                xs,
                (1, din),
                rhs,
                rhs_strides,
            );
        });
    y
}

/// gx [n, din] = gy w.
pub(super) fn input_grad<T: Elem>(d: &Dims, gy: &[T], w: &[T]) -> Vec<T> {
    let mut gx = vec![T::ZERO; d.n * d.din];
    gx.par_chunks_mut(ROWS * d.din)
        .zip(gy.par_chunks(ROWS * d.dout))
        .for_each(|(gxs, gys)| {
            let rows = gys.len() / d.dout;
            // gxs [rows, din] = gys [rows, dout] · w [dout, din]
            matmul(
                rows,
                d.din,
                d.dout,
                gxs,
                false,
                gys,
                (1, d.dout as isize),
                w,
                (1, d.din as isize),
            );
        });
    gx
}

/// Output features per parallel task of the weight gradient, at least.
const FEATURES: usize = 64;
/// Parallel tasks of the weight gradient, at most: each task's product packs all of x again,
/// so fewer, larger tasks are faster as long as the threads have work.
const WEIGHT_GRAD_TASKS: usize = 4;

/// Packed [gw = gyᵀ x (dout·din) | gb = Σ gy (dout)].
pub(super) fn weight_grad<T: Elem>(d: &Dims, x: &[T], gy: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; d.dout * d.din + d.dout];
    let (gw, gb) = out.split_at_mut(d.dout * d.din);
    // The split depends on the shapes only, so results do not depend on the thread count.
    let block = d
        .dout
        .div_ceil(WEIGHT_GRAD_TASKS)
        .next_multiple_of(16)
        .max(FEATURES);
    gw.par_chunks_mut(block * d.din)
        .zip(gb.par_chunks_mut(block))
        .enumerate()
        .for_each(|(i, (gws, gbs))| {
            let o0 = i * block;
            let feats = gbs.len();
            // gws [feats, din] = gy[:, o0..o0+feats]ᵀ [feats, n] · x [n, din]
            matmul(
                feats,
                d.din,
                d.n,
                gws,
                false,
                &gy[o0..],
                (d.dout as isize, 1),
                x,
                (1, d.din as isize),
            );
            for row in gy.chunks(d.dout) {
                for (s, &v) in gbs.iter_mut().zip(&row[o0..o0 + feats]) {
                    *s += v;
                }
            }
        });
    out
}

fn run2<R>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
    shape: R,
) -> CResult<(CpuStorage, Shape)>
where
    R: Into<Shape>,
{
    let out = match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            f32::storage(f32_fn(contiguous(a, l1)?, contiguous(b, l2)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            f64::storage(f64_fn(contiguous(a, l1)?, contiguous(b, l2)?))
        }
        _ => return Err(msg("linear kernel: operands must be all f32 or all f64")),
    };
    Ok((out, shape.into()))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "ferrodiff-linear",
            Pass::InputGrad => "ferrodiff-linear-input-grad",
            Pass::WeightGrad => "ferrodiff-linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = &self.d;
        match self.pass {
            Pass::Forward => Err(msg("linear kernel: the forward takes three operands")),
            Pass::InputGrad => run2(
                s1,
                l1,
                s2,
                l2,
                |a, b| input_grad(d, a, b),
                |a, b| input_grad(d, a, b),
                (d.n, d.din),
            ),
            Pass::WeightGrad => run2(
                s1,
                l1,
                s2,
                l2,
                |a, b| weight_grad(d, a, b),
                |a, b| weight_grad(d, a, b),
                d.dout * d.din + d.dout,
            ),
        }
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        CustomOp2::name(self)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = &self.d;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => f32::storage(forward(
                d,
                contiguous(x, l1)?,
                contiguous(w, l2)?,
                contiguous(b, l3)?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => f64::storage(forward(
                d,
                contiguous(x, l1)?,
                contiguous(w, l2)?,
                contiguous(b, l3)?,
            )),
            _ => return Err(msg("linear kernel: operands must be all f32 or all f64")),
        };
        // x's shape with the last dimension replaced by dout.
        let mut shape = l1.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = d.dout;
        }
        Ok((out, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.d;
        let gy = gy.contiguous()?;
        let op = |pass| LinearOp { d, pass };
        let gx = if x.track_op() {
            Some(
                gy.apply_op2_no_bwd(w, &op(Pass::InputGrad))?
                    .reshape(x.shape())?,
            )
        } else {
            None
        };
        let packed = x.apply_op2_no_bwd(&gy, &op(Pass::WeightGrad))?;
        let nw = d.dout * d.din;
        let gw = packed.narrow(0, 0, nw)?.reshape((d.dout, d.din))?;
        let gb = packed.narrow(0, nw, d.dout)?;
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// x [..., in] · weightᵀ + bias for weight [out, in] and bias [out] -> [..., out],
/// differentiable in all three (the leading dimensions are rows: no reshape enters the graph).
/// CPU f32/f64 tensors run the fused kernel, others (and `FERRODIFF_REFERENCE_KERNELS=1`)
/// candle's matmul and broadcast add.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> CResult<Tensor> {
    let dims = x.dims();
    let Some((&din, lead)) = dims.split_last() else {
        return Err(msg("linear: the input must have at least one dimension"));
    };
    let n = lead.iter().product();
    let (dout, win) = weight.dims2()?;
    if win != din || bias.dims() != [dout] {
        return Err(msg(format!(
            "linear: weight {:?} and bias {:?} do not fit input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        )));
    }
    if !use_kernel(x) {
        let mut out = lead.to_vec();
        out.push(dout);
        return x
            .reshape((n, din))?
            .matmul(&weight.t()?)?
            .broadcast_add(bias)?
            .reshape(out);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LinearOp {
            d: Dims { n, din, dout },
            pass: Pass::Forward,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_same_for_any_thread_count, filled, flat, max_diff};
    use candle_core::{DType, Device, Var};

    /// (n, in, out): batch 1, one feature, sizes that are not multiples of the row and feature
    /// blocks, more rows than one block.
    const CASES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (1, 5, 3),
        (7, 3, 17),
        (130, 33, 20),
        (64, 16, 16),
        (200, 2, 1),
    ];

    fn value_and_grads(
        f: fn(&Tensor, &Tensor, &Tensor) -> CResult<Tensor>,
        case: usize,
    ) -> Vec<Tensor> {
        let (n, din, dout) = CASES[case];
        let x = Var::from_tensor(&filled(&[n, din], case, DType::F64)).unwrap();
        let w = Var::from_tensor(&filled(&[dout, din], case + 1, DType::F64)).unwrap();
        let b = Var::from_tensor(&filled(&[dout], case + 2, DType::F64)).unwrap();
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let probe = filled(&[n, dout], case + 3, DType::F64);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y];
        out.extend([x, w, b].map(|v| g.get(v.as_tensor()).unwrap().clone()));
        out
    }

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> CResult<Tensor> {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }

    #[test]
    fn matches_candle_ops_in_values_and_gradients() {
        for case in 0..CASES.len() {
            let ours = value_and_grads(linear, case);
            let theirs = value_and_grads(reference, case);
            for (i, (o, r)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    max_diff(o, r) < 1e-11,
                    "case {case}, {}",
                    ["y", "gx", "gw", "gb"][i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, din, dout) = (9, 4, 3);
        let x = filled(&[n, din], 1, DType::F64);
        let w = filled(&[dout, din], 2, DType::F64);
        let b = filled(&[dout], 3, DType::F64);
        let probe = filled(&[n, dout], 4, DType::F64);
        let loss = |args: &[Tensor; 3]| -> f64 {
            (linear(&args[0], &args[1], &args[2]).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let vars = [&x, &w, &b].map(|t| Var::from_tensor(t).unwrap());
        let g = (linear(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        )
        .unwrap()
            * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let base = [x, w, b];
        for which in 0..3 {
            let grad: Vec<f64> = g
                .get(vars[which].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat: Vec<f64> = base[which].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..flat.len() {
                let bump = |delta: f64| {
                    let mut p = flat.clone();
                    p[i] += delta;
                    let mut args = base.clone();
                    args[which] = Tensor::from_vec(p, base[which].dims(), &Device::Cpu).unwrap();
                    loss(&args)
                };
                let fd = (bump(1e-6) - bump(-1e-6)) / 2e-6;
                assert!(
                    (fd - grad[i]).abs() < 1e-7,
                    "{which} [{i}]: {fd} vs {}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn leading_dimensions_are_rows() {
        let x = Var::from_tensor(&filled(&[2, 3, 4], 1, DType::F64)).unwrap();
        let w = filled(&[5, 4], 2, DType::F64);
        let b = filled(&[5], 3, DType::F64);
        let y = linear(x.as_tensor(), &w, &b).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5]);
        let flat_y = linear(&x.as_tensor().reshape((6, 4)).unwrap(), &w, &b).unwrap();
        assert_eq!(max_diff(&y.reshape((6, 5)).unwrap(), &flat_y), 0.0);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[2, 3, 4]);
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        assert_same_for_any_thread_count(|| {
            let ts = value_and_grads(linear, 3);
            flat::<f64>(&ts.iter().collect::<Vec<_>>())
        });
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = filled(&[4, 3], 0, DType::F32);
        assert!(linear(
            &x,
            &filled(&[2, 4], 0, DType::F32),
            &filled(&[2], 0, DType::F32)
        )
        .is_err());
        assert!(linear(
            &x,
            &filled(&[2, 3], 0, DType::F32),
            &filled(&[3], 0, DType::F32)
        )
        .is_err());
    }
}
