//! The adaLN-Zero kernels of the Diffusion Transformer (Peebles & Xie 2023), as candle custom
//! ops with their own backward:
//!
//! - [`modulated_layer_norm`]: y = LN(x) · (1 + scale) + shift, a LayerNorm over the last
//!   dimension without affine parameters whose output is modulated by a per-item scale and
//!   shift [B, D], broadcast over the tokens of x [B, N, D] (DiT's `modulate(norm(x), shift,
//!   scale)`). From candle's ops this is eight passes (mean, centring, square, variance,
//!   division, 1 + scale, product, sum), each keeping its output for the backward; here one
//!   pass forward and one backward, with each row's statistics recomputed.
//! - [`gated_residual`]: y = x + gate ⊙ h with gate [B, D] broadcast over the tokens (the
//!   gated residual of adaLN-Zero). From candle's ops the gate's gradient is a broadcast
//!   product followed by a strided sum over the token dimension; here one pass each way.
//!
//! Row statistics are accumulated in f64, as in the GroupNorm kernel. The forward passes split
//! rows over rayon's threads; the backward passes split batch items, each item's sums over its
//! tokens taken by one thread in token order, so results are bit-identical for any thread
//! count. f32 and f64 (the gradient checks run in f64); other dtypes and devices, and
//! `FERRODIFF_REFERENCE_KERNELS=1`, run the `*_reference` versions from candle ops.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

use super::kernels::{contiguous, msg, use_kernel, Elem};
use super::norm::{block_sum, stats};
use crate::kernels::simd::avx2_twin;
use crate::kernels::PARALLEL_MIN_ELEMENTS;

type CResult<T> = candle_core::Result<T>;

/// DiT's LayerNorm ε (facebookresearch/DiT, `nn.LayerNorm(hidden, elementwise_affine=False,
/// eps=1e-6)`).
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// Rows up to this width compute the input gradient's last step in f64: there its three terms
/// nearly cancel (a row of two elements has x̂ = ±1 and a gradient that is all rounding).
const SMALL_ROW: usize = 64;

/// Rows per parallel task of the forward passes (at least).
const TASK_ROWS: usize = 16;

/// x [B, ..., D]: B items of N tokens (the product of the middle dimensions) of width D.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dims {
    b: usize,
    n: usize,
    d: usize,
}

impl Dims {
    fn new(what: &str, x: &[usize]) -> CResult<Self> {
        let (Some(&b), Some(&d)) = (x.first(), x.last()) else {
            return Err(msg(format!("{what}: x must be [B, ..., D], got {x:?}")));
        };
        if x.len() < 2 || d == 0 {
            return Err(msg(format!(
                "{what}: x must be [B, ..., D] with D >= 1, got {x:?}"
            )));
        }
        Ok(Dims {
            b,
            n: x[1..x.len() - 1].iter().product(),
            d,
        })
    }

    fn len(&self) -> usize {
        self.b * self.n * self.d
    }

    fn per_item(&self) -> usize {
        self.b * self.d
    }

    /// Checks a per-item operand (scale, shift, gate) against [B, D].
    fn check_per_item(&self, what: &str, name: &str, t: &Tensor) -> CResult<()> {
        if t.dims() != [self.b, self.d] {
            return Err(msg(format!(
                "{what}: {name} must be [B, D] = [{}, {}], got {:?}",
                self.b,
                self.d,
                t.dims()
            )));
        }
        Ok(())
    }

    /// [B, 1, ..., 1, D] with x's rank: a per-item operand broadcast over the tokens.
    fn broadcast_shape(&self, rank: usize) -> Vec<usize> {
        let mut s = vec![1; rank];
        s[0] = self.b;
        s[rank - 1] = self.d;
        s
    }
}

/// Runs `f(row index, output row)` over the rows of `y` ([rows, d]), in parallel when large.
fn for_each_row<T: Send>(d: usize, y: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if y.len() < PARALLEL_MIN_ELEMENTS {
        y.chunks_mut(d).enumerate().for_each(|(r, yr)| f(r, yr));
    } else {
        y.par_chunks_mut(d)
            .enumerate()
            .with_min_len(TASK_ROWS)
            .for_each(|(r, yr)| f(r, yr));
    }
}

#[inline(always)]
fn to64<T: Float>(v: T) -> f64 {
    v.to_f64().unwrap_or(0.0)
}

avx2_twin! {
/// One row: y = (x − mean) · rstd · (1 + scale) + shift.
fn norm_row<T>(eps: f64, x: &[T], scale: &[T], shift: &[T], y: &mut [T]) {
    let st = stats(x, eps);
    for (((o, &v), &s), &h) in y.iter_mut().zip(x).zip(scale).zip(shift) {
        *o = (v - st.mean) * st.rstd * (T::one() + s) + h;
    }
}
}

fn norm_forward<T: Elem + Float>(dm: &Dims, eps: f64, x: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
    let d = dm.d;
    let mut y = vec![T::ZERO; dm.len()];
    for_each_row(d, &mut y, |r, yr| {
        let item = r / dm.n;
        norm_row(
            eps,
            &x[r * d..(r + 1) * d],
            &scale[item * d..(item + 1) * d],
            &shift[item * d..(item + 1) * d],
            yr,
        )
    });
    y
}

avx2_twin! {
/// One item's backward: gx for its rows, and gscale = Σ gy · x̂, gshift = Σ gy over its rows
/// (zero on entry). `t` is scratch for ∂L/∂x̂ = gy · (1 + scale), one row long.
fn norm_backward_item<T>(
    d: usize,
    eps: f64,
    x: &[T],
    gy: &[T],
    scale: &[T],
    gx: &mut [T],
    gscale: &mut [T],
    gshift: &mut [T],
    t: &mut [T],
) {
    for ((xr, gyr), gxr) in x
        .chunks_exact(d)
        .zip(gy.chunks_exact(d))
        .zip(gx.chunks_exact_mut(d))
    {
        let st = stats(xr, eps);
        for (((((tj, &v), &g), &s), gs), gh) in t
            .iter_mut()
            .zip(xr)
            .zip(gyr)
            .zip(scale)
            .zip(gscale.iter_mut())
            .zip(gshift.iter_mut())
        {
            *gh += g;
            *gs += g * ((v - st.mean) * st.rstd);
            *tj = g * (T::one() + s);
        }
        // gx = rstd · (∂L/∂x̂ − mean(∂L/∂x̂) − x̂ · mean(∂L/∂x̂ · x̂)).
        let m1 = block_sum(t, t, |g, _| g) / d as f64;
        let m2 = block_sum(t, xr, |g, v| g * ((v - st.mean) * st.rstd)) / d as f64;
        if d <= SMALL_ROW {
            for ((o, &v), &g) in gxr.iter_mut().zip(xr).zip(t.iter()) {
                let xhat = (to64(v) - st.mean64) * st.rstd64;
                *o = T::from(st.rstd64 * (to64(g) - m1 - xhat * m2)).unwrap_or(T::ZERO);
            }
        } else {
            let c1 = T::from(st.rstd64 * m1).unwrap_or(T::ZERO);
            let c2 = T::from(st.rstd64 * m2).unwrap_or(T::ZERO);
            for ((o, &v), &g) in gxr.iter_mut().zip(xr).zip(t.iter()) {
                let xhat = (v - st.mean) * st.rstd;
                *o = st.rstd * g - c1 - xhat * c2;
            }
        }
    }
}
}

/// Packed [gx (B·N·D) | gscale (B·D) | gshift (B·D)].
fn norm_backward<T: Elem + Float>(dm: &Dims, eps: f64, x: &[T], scale: &[T], gy: &[T]) -> Vec<T> {
    let (item, d) = (dm.n * dm.d, dm.d);
    let mut out = vec![T::ZERO; dm.len() + 2 * dm.per_item()];
    if item == 0 {
        return out;
    }
    let (gx, rest) = out.split_at_mut(dm.len());
    let (gscale, gshift) = rest.split_at_mut(dm.per_item());
    gx.par_chunks_mut(item)
        .zip(gscale.par_chunks_mut(d).zip(gshift.par_chunks_mut(d)))
        .zip(x.par_chunks(item).zip(gy.par_chunks(item)))
        .zip(scale.par_chunks(d))
        .for_each_init(
            || vec![T::ZERO; d],
            |t, (((gxi, (gsi, ghi)), (xi, gyi)), si)| {
                norm_backward_item(d, eps, xi, gyi, si, gxi, gsi, ghi, t)
            },
        );
    out
}

avx2_twin! {
/// One row: y = x + gate ⊙ h.
fn gated_row<T>(x: &[T], gate: &[T], h: &[T], y: &mut [T]) {
    for (((o, &v), &g), &hv) in y.iter_mut().zip(x).zip(gate).zip(h) {
        *o = v + g * hv;
    }
}
}

fn gated_forward<T: Elem + Float>(dm: &Dims, x: &[T], gate: &[T], h: &[T]) -> Vec<T> {
    let d = dm.d;
    let mut y = vec![T::ZERO; dm.len()];
    for_each_row(d, &mut y, |r, yr| {
        let item = r / dm.n;
        gated_row(
            &x[r * d..(r + 1) * d],
            &gate[item * d..(item + 1) * d],
            &h[r * d..(r + 1) * d],
            yr,
        )
    });
    y
}

avx2_twin! {
/// One item's backward: gh = gy ⊙ gate for its rows and ggate = Σ gy ⊙ h over them (zero on
/// entry).
fn gated_backward_item<T>(d: usize, gy: &[T], gate: &[T], h: &[T], gh: &mut [T], ggate: &mut [T]) {
    for ((gyr, hr), ghr) in gy
        .chunks_exact(d)
        .zip(h.chunks_exact(d))
        .zip(gh.chunks_exact_mut(d))
    {
        for ((((o, &g), &w), &hv), gg) in ghr
            .iter_mut()
            .zip(gyr)
            .zip(gate)
            .zip(hr)
            .zip(ggate.iter_mut())
        {
            *o = g * w;
            *gg += g * hv;
        }
    }
}
}

/// Packed [gh (B·N·D) | ggate (B·D)].
fn gated_backward<T: Elem + Float>(dm: &Dims, gate: &[T], h: &[T], gy: &[T]) -> Vec<T> {
    let (item, d) = (dm.n * dm.d, dm.d);
    let mut out = vec![T::ZERO; dm.len() + dm.per_item()];
    if item == 0 {
        return out;
    }
    let (gh, ggate) = out.split_at_mut(dm.len());
    gh.par_chunks_mut(item)
        .zip(ggate.par_chunks_mut(d))
        .zip(gy.par_chunks(item).zip(h.par_chunks(item)))
        .zip(gate.par_chunks(d))
        .for_each(|(((ghi, ggi), (gyi, hi)), gi)| gated_backward_item(d, gyi, gi, hi, ghi, ggi));
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// [`modulated_layer_norm`] with its ε.
    Norm(f64),
    /// [`gated_residual`].
    Gated,
}

/// Operands and result of each pass.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    /// Norm: (x, scale, shift) -> y. Gated: (x, gate, h) -> y.
    Forward,
    /// Norm: (x, scale, gy) -> [gx | gscale | gshift]. Gated: (gate, h, gy) -> [gh | ggate].
    Backward,
}

struct AdaOp {
    dims: Dims,
    kind: Kind,
    pass: Pass,
}

impl AdaOp {
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let a = contiguous(s1.as_slice::<T>()?, l1)?;
        let b = contiguous(s2.as_slice::<T>()?, l2)?;
        let c = contiguous(s3.as_slice::<T>()?, l3)?;
        let dm = &self.dims;
        let out = match (self.kind, self.pass) {
            (Kind::Norm(eps), Pass::Forward) => norm_forward(dm, eps, a, b, c),
            (Kind::Norm(eps), Pass::Backward) => norm_backward(dm, eps, a, b, c),
            (Kind::Gated, Pass::Forward) => gated_forward(dm, a, b, c),
            (Kind::Gated, Pass::Backward) => gated_backward(dm, a, b, c),
        };
        let shape = match self.pass {
            Pass::Forward => l1.shape().clone(),
            Pass::Backward => Shape::from(out.len()),
        };
        Ok((T::storage(out), shape))
    }
}

impl CustomOp3 for AdaOp {
    fn name(&self) -> &'static str {
        match (self.kind, self.pass) {
            (Kind::Norm(_), Pass::Forward) => "ferrodiff-modulated-layer-norm",
            (Kind::Norm(_), Pass::Backward) => "ferrodiff-modulated-layer-norm-backward",
            (Kind::Gated, Pass::Forward) => "ferrodiff-gated-residual",
            (Kind::Gated, Pass::Backward) => "ferrodiff-gated-residual-backward",
        }
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
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>((s1, l1), (s2, l2), (s3, l3)),
            CpuStorage::F64(_) => self.run::<f64>((s1, l1), (s2, l2), (s3, l3)),
            _ => Err(msg(format!(
                "{}: the CPU kernel takes f32 or f64",
                self.name()
            ))),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        let dm = self.dims;
        let (len, per_item) = (dm.len(), dm.per_item());
        let gy = gy.contiguous()?;
        let back = AdaOp {
            pass: Pass::Backward,
            ..*self
        };
        match self.kind {
            Kind::Norm(_) => {
                let (x, scale) = (a, b);
                let packed = x.apply_op3_no_bwd(scale, &gy, &back)?;
                let gx = x
                    .track_op()
                    .then(|| packed.narrow(0, 0, len)?.reshape(x.shape()))
                    .transpose()?;
                let gscale = packed.narrow(0, len, per_item)?.reshape((dm.b, dm.d))?;
                let gshift = packed
                    .narrow(0, len + per_item, per_item)?
                    .reshape((dm.b, dm.d))?;
                Ok((gx, Some(gscale), Some(gshift)))
            }
            Kind::Gated => {
                let (x, gate, h) = (a, b, c);
                let packed = gate.apply_op3_no_bwd(h, &gy, &back)?;
                let gh = packed.narrow(0, 0, len)?.reshape(h.shape())?;
                let ggate = packed.narrow(0, len, per_item)?.reshape((dm.b, dm.d))?;
                Ok((x.track_op().then(|| gy.clone()), Some(ggate), Some(gh)))
            }
        }
    }
}

/// LN(x) · (1 + scale) + shift for x [B, ..., D] and scale, shift [B, D] (broadcast over the
/// middle dimensions); LN normalises over the last dimension, without affine parameters, with
/// ε = `eps`. Differentiable in all three.
pub fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> CResult<Tensor> {
    const WHAT: &str = "modulated_layer_norm";
    let dims = Dims::new(WHAT, x.dims())?;
    dims.check_per_item(WHAT, "scale", scale)?;
    dims.check_per_item(WHAT, "shift", shift)?;
    if !use_kernel(x) {
        return modulated_layer_norm_reference(x, scale, shift, eps);
    }
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        AdaOp {
            dims,
            kind: Kind::Norm(eps),
            pass: Pass::Forward,
        },
    )
}

/// LN(x) over the last dimension without affine parameters (the kernel of
/// [`modulated_layer_norm`] with scale = shift = 0).
pub fn layer_norm(x: &Tensor, eps: f64) -> CResult<Tensor> {
    let dims = Dims::new("layer_norm", x.dims())?;
    let zeros = Tensor::zeros((dims.b, dims.d), x.dtype(), x.device())?;
    modulated_layer_norm(x, &zeros, &zeros, eps)
}

/// x + gate ⊙ h for x, h [B, ..., D] and gate [B, D] (broadcast over the middle dimensions).
/// Differentiable in all three.
pub fn gated_residual(x: &Tensor, gate: &Tensor, h: &Tensor) -> CResult<Tensor> {
    const WHAT: &str = "gated_residual";
    let dims = Dims::new(WHAT, x.dims())?;
    dims.check_per_item(WHAT, "gate", gate)?;
    if h.dims() != x.dims() {
        return Err(msg(format!(
            "{WHAT}: h has shape {:?} but x has {:?}",
            h.dims(),
            x.dims()
        )));
    }
    if !use_kernel(x) {
        return gated_residual_reference(x, gate, h);
    }
    x.contiguous()?.apply_op3(
        &gate.contiguous()?,
        &h.contiguous()?,
        AdaOp {
            dims,
            kind: Kind::Gated,
            pass: Pass::Forward,
        },
    )
}

/// [`modulated_layer_norm`] from candle's ops (the fallback, and the tests' reference).
pub fn modulated_layer_norm_reference(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> CResult<Tensor> {
    let dims = Dims::new("modulated_layer_norm", x.dims())?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let shape = dims.broadcast_shape(x.rank());
    xhat.broadcast_mul(&(scale + 1.0)?.reshape(shape.as_slice())?)?
        .broadcast_add(&shift.reshape(shape.as_slice())?)
}

/// [`gated_residual`] from candle's ops (the fallback, and the tests' reference).
pub fn gated_residual_reference(x: &Tensor, gate: &Tensor, h: &Tensor) -> CResult<Tensor> {
    let dims = Dims::new("gated_residual", x.dims())?;
    let shape = dims.broadcast_shape(x.rank());
    x + h.broadcast_mul(&gate.reshape(shape.as_slice())?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_same_for_any_thread_count, filled_scaled as filled, flat};
    use candle_core::{DType, Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::test_util::max_rel(a, b, 1e-12)
    }

    /// x shapes: one token, odd widths, rows wider than SMALL_ROW, [B, D] inputs, enough
    /// elements to run in parallel, 4-D tokens.
    const SHAPES: [&[usize]; 7] = [
        &[1, 1, 5],
        &[3, 7, 2],
        &[2, 16, 96],
        &[4, 9],
        &[5, 40, 200],
        &[2, 3, 4, 6],
        &[3, 5, 64],
    ];

    type Three = fn(&Tensor, &Tensor, &Tensor) -> CResult<Tensor>;

    fn norm(x: &Tensor, s: &Tensor, h: &Tensor) -> CResult<Tensor> {
        modulated_layer_norm(x, s, h, LAYER_NORM_EPS)
    }

    fn norm_reference(x: &Tensor, s: &Tensor, h: &Tensor) -> CResult<Tensor> {
        modulated_layer_norm_reference(x, s, h, LAYER_NORM_EPS)
    }

    /// Operands (x, per-item, h or shift) of an op on x of `shape`: x has a large mean
    /// against its spread in some rows, which the two-pass statistics must survive.
    fn operands(shape: &[usize], seed: usize, dtype: DType) -> [Tensor; 3] {
        let b = shape[0];
        let d = shape[shape.len() - 1];
        let x = (filled(shape, seed, DType::F64, 2.0) + 3.0).unwrap();
        [
            x.to_dtype(dtype).unwrap(),
            filled(&[b, d], seed + 1, dtype, 1.5),
            filled(shape, seed + 2, dtype, 1.0),
        ]
    }

    /// Value and the gradients of Σ y · probe with respect to the three operands. For the norm
    /// the third operand is the shift [B, D], for the gated residual h (x's shape).
    fn run(f: Three, ops: &[Tensor; 3]) -> Vec<Tensor> {
        let vars = ops.clone().map(|t| Var::from_tensor(&t).unwrap());
        let y = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        )
        .unwrap();
        let probe = filled(y.dims(), 9, y.dtype(), 1.0);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y];
        out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
        out
    }

    /// The norm's operands: the third is the shift, [B, D].
    fn norm_operands(shape: &[usize], seed: usize, dtype: DType) -> [Tensor; 3] {
        let [x, s, _] = operands(shape, seed, dtype);
        let h = filled(s.dims(), seed + 3, dtype, 0.5);
        [x, s, h]
    }

    fn compare(f: Three, reference: Three, ops: fn(&[usize], usize, DType) -> [Tensor; 3]) {
        let up = |ts: Vec<Tensor>| -> Vec<Tensor> {
            ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
        };
        for (case, shape) in SHAPES.iter().enumerate() {
            let o64 = ops(shape, case, DType::F64);
            let o32 = ops(shape, case, DType::F32);
            let truth = run(reference, &o64);
            let ours = run(f, &o64);
            let ours32 = up(run(f, &o32));
            let candle32 = up(run(reference, &o32));
            for i in 0..4 {
                let name = ["y", "g0", "g1", "g2"][i];
                let e = max_rel(&ours[i], &truth[i]);
                // 1e-10: rows of two elements have x̂ = ±1 and an input gradient that is all
                // rounding (it vanishes but for ε).
                assert!(e < 1e-10, "f64 {shape:?} {name}: relative error {e}");
                let (e32, c32) = (
                    max_rel(&ours32[i], &truth[i]),
                    max_rel(&candle32[i], &truth[i]),
                );
                assert!(
                    e32 < 2e-5f64.max(2.0 * c32),
                    "f32 {shape:?} {name}: relative error {e32} (candle's ops: {c32})"
                );
            }
        }
    }

    #[test]
    fn modulated_layer_norm_matches_candle_ops_in_f64_and_f32() {
        compare(norm, norm_reference, norm_operands);
    }

    #[test]
    fn gated_residual_matches_candle_ops_in_f64_and_f32() {
        compare(gated_residual, gated_residual_reference, operands);
    }

    /// Central finite differences of Σ probe · f(operands) for a few entries of each operand.
    fn check_finite_differences(f: Three, ops: &[Tensor; 3]) {
        let grads = run(f, ops);
        let probe = filled(grads[0].dims(), 9, DType::F64, 1.0);
        let loss = |t: &[Tensor; 3]| -> f64 {
            (f(&t[0], &t[1], &t[2]).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for which in 0..3 {
            let flat: Vec<f64> = ops[which].flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f64> = grads[which + 1].flatten_all().unwrap().to_vec1().unwrap();
            for &i in &[0, flat.len() / 3, flat.len() / 2 + 1, flat.len() - 1] {
                let bump = |delta: f64| {
                    let mut p = flat.clone();
                    p[i] += delta;
                    let mut t = ops.clone();
                    t[which] = Tensor::from_vec(p, ops[which].dims(), &Device::Cpu).unwrap();
                    loss(&t)
                };
                let eps = 1e-6;
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + g[i].abs()),
                    "operand {which} [{i}]: finite differences {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (case, shape) in [&[2usize, 3, 5][..], &[3, 4, 70], &[2, 6]]
            .iter()
            .enumerate()
        {
            check_finite_differences(norm, &norm_operands(shape, case + 20, DType::F64));
            check_finite_differences(gated_residual, &operands(shape, case + 30, DType::F64));
        }
    }

    #[test]
    fn plain_layer_norm_has_zero_mean_and_unit_variance_rows() {
        let x = filled(&[2, 3, 10], 4, DType::F64, 5.0);
        let y: Vec<Vec<f64>> = layer_norm(&x, 0.0)
            .unwrap()
            .reshape((6, 10))
            .unwrap()
            .to_vec2()
            .unwrap();
        for row in y {
            let mean = row.iter().sum::<f64>() / 10.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 10.0;
            assert!(
                mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12,
                "{mean} {var}"
            );
        }
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let n = norm_operands(&[6, 40, 200], 1, DType::F32);
        let g = operands(&[6, 40, 200], 2, DType::F32);
        assert_same_for_any_thread_count(|| {
            let a = run(norm, &n);
            let b = run(gated_residual, &g);
            let all: Vec<&Tensor> = a.iter().chain(&b).collect();
            flat::<f32>(&all)
        });
    }

    #[test]
    fn constant_rows_stay_finite() {
        // A constant row has zero variance: x̂ = 0, y = shift, and no NaN in the gradients.
        let x = Tensor::full(2.0f32, (2, 3, 8), &Device::Cpu).unwrap();
        let s = filled(&[2, 8], 1, DType::F32, 1.0);
        let out = run(norm, &[x, s.clone(), s]);
        for t in &out {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = |s: &[usize]| filled(s, 0, DType::F32, 1.0);
        let x = t(&[2, 3, 4]);
        assert!(norm(&x, &t(&[2, 4]), &t(&[2, 4])).is_ok());
        assert!(norm(&x, &t(&[2, 3]), &t(&[2, 4])).is_err());
        assert!(norm(&x, &t(&[2, 4]), &t(&[1, 4])).is_err());
        assert!(norm(&t(&[4]), &t(&[4, 4]), &t(&[4, 4])).is_err());
        assert!(gated_residual(&x, &t(&[2, 4]), &t(&[2, 3, 5])).is_err());
        assert!(gated_residual(&x, &t(&[3, 4]), &x).is_err());
        let e = norm(&x, &t(&[2, 4]).to_dtype(DType::F64).unwrap(), &t(&[2, 4]));
        assert!(e.is_err());
    }
}
