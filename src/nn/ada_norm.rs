//! The adaLN-Zero kernels of the Diffusion Transformer (Peebles & Xie 2023), as candle custom
//! ops with their own backward. Both read their per-item vectors straight out of a block's
//! modulation m [B, C·D] (C chunks of width D: shift, scale and gate for the attention and for
//! the MLP), so no narrow of m enters the graph (each would cost a zero fill, a concatenation
//! and a sum of a [B, C·D] gradient in the backward pass):
//!
//! - [`modulated_layer_norm`]: y = LN(x) · (1 + scale) + shift, a LayerNorm over the last
//!   dimension without affine parameters whose output is modulated by m's chunks `scale` and
//!   `shift`, broadcast over the tokens of x [B, N, D] (DiT's `modulate(norm(x), shift,
//!   scale)`). From candle's ops this is eight passes (mean, centring, square, variance,
//!   division, 1 + scale, product, sum), each keeping its output for the backward; here one
//!   pass forward and one backward, with each row's statistics recomputed.
//! - [`gated_residual`]: y = x + gate ⊙ h with m's chunk `gate` broadcast over the tokens (the
//!   gated residual of adaLN-Zero). From candle's ops the gate's gradient is a broadcast
//!   product followed by a strided sum over the token dimension; here one pass each way.
//!
//! Row statistics are accumulated in f64, as in the GroupNorm kernel. The forward passes split
//! rows over rayon's threads; the backward passes split batch items, each item's sums over its
//! tokens taken by one thread in token order, so results are bit-identical for any thread
//! count. f32 and f64 (the gradient checks run in f64); other dtypes and devices, and
//! `FERRODIFF_REFERENCE_KERNELS=1`, run the `*_reference` versions from candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
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

/// x [B, ..., D]: B items of N tokens (the product of the middle dimensions) of width D, with
/// a modulation m [B, C·D] of C chunks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) n: usize,
    pub(super) d: usize,
    pub(super) chunks: usize,
}

impl Dims {
    /// Checks x [B, ..., D] and m [B, C·D], and that `used` chunks exist.
    pub(super) fn new(what: &str, x: &[usize], m: &[usize], used: &[usize]) -> CResult<Self> {
        let (Some(&b), Some(&d)) = (x.first(), x.last()) else {
            return Err(msg(format!("{what}: x must be [B, ..., D], got {x:?}")));
        };
        if x.len() < 2 || d == 0 {
            return Err(msg(format!(
                "{what}: x must be [B, ..., D] with D >= 1, got {x:?}"
            )));
        }
        let &[mb, width] = m else {
            return Err(msg(format!(
                "{what}: the modulation must be [B, C·D], got {m:?}"
            )));
        };
        if mb != b || !width.is_multiple_of(d) {
            return Err(msg(format!(
                "{what}: the modulation {m:?} is not [B = {b}, C·D] with D = {d}"
            )));
        }
        let chunks = width / d;
        if let Some(bad) = used.iter().find(|&&c| c >= chunks) {
            return Err(msg(format!(
                "{what}: chunk {bad} of a modulation with {chunks} chunks"
            )));
        }
        Ok(Dims {
            b,
            n: x[1..x.len() - 1].iter().product(),
            d,
            chunks,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.b * self.n * self.d
    }

    /// Elements of m.
    pub(super) fn modulation(&self) -> usize {
        self.b * self.chunks * self.d
    }

    /// m's chunk `c` of item `item`.
    fn chunk<'a, T>(&self, m: &'a [T], item: usize, c: usize) -> &'a [T] {
        &m[(item * self.chunks + c) * self.d..][..self.d]
    }

    /// [B, 1, ..., 1, D] with x's rank: a per-item vector broadcast over the tokens.
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

pub(super) fn norm_forward<T: Elem + Float>(
    dm: &Dims,
    op: &NormChunks,
    x: &[T],
    m: &[T],
) -> Vec<T> {
    let d = dm.d;
    let mut y = vec![T::ZERO; dm.len()];
    for_each_row(d, &mut y, |r, yr| {
        let item = r / dm.n;
        norm_row(
            op.eps,
            &x[r * d..(r + 1) * d],
            dm.chunk(m, item, op.scale),
            dm.chunk(m, item, op.shift),
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

/// Packed [gx (B·N·D) | gm (B·C·D)], gm zero but in the chunks `scale` and `shift`.
pub(super) fn norm_backward<T: Elem + Float>(
    dm: &Dims,
    op: &NormChunks,
    x: &[T],
    m: &[T],
    gy: &[T],
) -> Vec<T> {
    let (item, d, cd) = (dm.n * dm.d, dm.d, dm.chunks * dm.d);
    let mut out = vec![T::ZERO; dm.len() + dm.modulation()];
    if item == 0 {
        return out;
    }
    let (gx, gm) = out.split_at_mut(dm.len());
    let (scale, shift) = (op.scale * d, op.shift * d);
    gx.par_chunks_mut(item)
        .zip(gm.par_chunks_mut(cd))
        .zip(x.par_chunks(item).zip(gy.par_chunks(item)))
        .zip(m.par_chunks(cd))
        .for_each_init(
            || (vec![T::ZERO; d], vec![T::ZERO; d], vec![T::ZERO; d]),
            |(t, gs, gh), (((gxi, gmi), (xi, gyi)), mi)| {
                gs.fill(T::ZERO);
                gh.fill(T::ZERO);
                norm_backward_item(d, op.eps, xi, gyi, &mi[scale..scale + d], gxi, gs, gh, t);
                // (the two chunks may be one: scale and shift then add up)
                for (o, &v) in gmi[scale..scale + d].iter_mut().zip(gs.iter()) {
                    *o += v;
                }
                for (o, &v) in gmi[shift..shift + d].iter_mut().zip(gh.iter()) {
                    *o += v;
                }
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

pub(super) fn gated_forward<T: Elem + Float>(
    dm: &Dims,
    gate: usize,
    x: &[T],
    m: &[T],
    h: &[T],
) -> Vec<T> {
    let d = dm.d;
    let mut y = vec![T::ZERO; dm.len()];
    for_each_row(d, &mut y, |r, yr| {
        let item = r / dm.n;
        gated_row(
            &x[r * d..(r + 1) * d],
            dm.chunk(m, item, gate),
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

/// Packed [gh (B·N·D) | gm (B·C·D)], gm zero but in the chunk `gate`.
pub(super) fn gated_backward<T: Elem + Float>(
    dm: &Dims,
    gate: usize,
    m: &[T],
    h: &[T],
    gy: &[T],
) -> Vec<T> {
    let (item, d, cd) = (dm.n * dm.d, dm.d, dm.chunks * dm.d);
    let mut out = vec![T::ZERO; dm.len() + dm.modulation()];
    if item == 0 {
        return out;
    }
    let (gh, gm) = out.split_at_mut(dm.len());
    let g0 = gate * d;
    gh.par_chunks_mut(item)
        .zip(gm.par_chunks_mut(cd))
        .zip(gy.par_chunks(item).zip(h.par_chunks(item)))
        .zip(m.par_chunks(cd))
        .for_each(|(((ghi, gmi), (gyi, hi)), mi)| {
            gated_backward_item(d, gyi, &mi[g0..g0 + d], hi, ghi, &mut gmi[g0..g0 + d])
        });
    out
}

/// The chunks of m a modulated LayerNorm reads, and its ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct NormChunks {
    pub(super) shift: usize,
    pub(super) scale: usize,
    pub(super) eps: f64,
}

/// (x, m) -> y, differentiable; its backward (x, m, gy) -> [gx | gm].
struct NormOp {
    dims: Dims,
    chunks: NormChunks,
}

/// (x, m, h) -> y, differentiable; its backward (m, h, gy) -> [gh | gm].
struct GatedOp {
    dims: Dims,
    gate: usize,
    backward: bool,
}

/// The contiguous elements of operand `s` as T.
fn slice<'a, T: candle_core::WithDType>((s, l): (&'a CpuStorage, &Layout)) -> CResult<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l)
}

impl NormOp {
    fn forward<T: Elem + Float + candle_core::WithDType>(
        &self,
        x: (&CpuStorage, &Layout),
        m: (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let y = norm_forward(&self.dims, &self.chunks, slice(x)?, slice(m)?);
        Ok((T::storage(y), x.1.shape().clone()))
    }

    fn backward<T: Elem + Float + candle_core::WithDType>(
        &self,
        x: (&CpuStorage, &Layout),
        m: (&CpuStorage, &Layout),
        gy: (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let out = norm_backward(&self.dims, &self.chunks, slice(x)?, slice(m)?, slice(gy)?);
        let n = out.len();
        Ok((T::storage(out), Shape::from(n)))
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        "ferrodiff-modulated-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.forward::<f32>((s1, l1), (s2, l2)),
            CpuStorage::F64(_) => self.forward::<f64>((s1, l1), (s2, l2)),
            _ => Err(msg("modulated_layer_norm: the CPU kernel takes f32 or f64")),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        m: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims;
        let packed = x.apply_op3_no_bwd(m, &gy.contiguous()?, self)?;
        let gx = x
            .track_op()
            .then(|| packed.narrow(0, 0, dm.len())?.reshape(x.shape()))
            .transpose()?;
        let gm = m
            .track_op()
            .then(|| {
                packed
                    .narrow(0, dm.len(), dm.modulation())?
                    .reshape(m.shape())
            })
            .transpose()?;
        Ok((gx, gm))
    }
}

/// The backward pass of [`NormOp`].
impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "ferrodiff-modulated-layer-norm-backward"
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
            CpuStorage::F32(_) => self.backward::<f32>((s1, l1), (s2, l2), (s3, l3)),
            CpuStorage::F64(_) => self.backward::<f64>((s1, l1), (s2, l2), (s3, l3)),
            _ => Err(msg("modulated_layer_norm: the CPU kernel takes f32 or f64")),
        }
    }
}

impl GatedOp {
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        a: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        c: (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let dm = &self.dims;
        if self.backward {
            let out = gated_backward(dm, self.gate, slice(a)?, slice(b)?, slice(c)?);
            let n = out.len();
            Ok((T::storage(out), Shape::from(n)))
        } else {
            let y = gated_forward(dm, self.gate, slice(a)?, slice(b)?, slice(c)?);
            Ok((T::storage(y), a.1.shape().clone()))
        }
    }
}

impl CustomOp3 for GatedOp {
    fn name(&self) -> &'static str {
        if self.backward {
            "ferrodiff-gated-residual-backward"
        } else {
            "ferrodiff-gated-residual"
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
        x: &Tensor,
        m: &Tensor,
        h: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.backward {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        let dm = self.dims;
        let gy = gy.contiguous()?;
        let back = GatedOp {
            backward: true,
            ..*self
        };
        let packed = m.apply_op3_no_bwd(h, &gy, &back)?;
        let gh = h
            .track_op()
            .then(|| packed.narrow(0, 0, dm.len())?.reshape(h.shape()))
            .transpose()?;
        let gm = m
            .track_op()
            .then(|| {
                packed
                    .narrow(0, dm.len(), dm.modulation())?
                    .reshape(m.shape())
            })
            .transpose()?;
        Ok((x.track_op().then(|| gy.clone()), gm, gh))
    }
}

/// LN(x) · (1 + scale) + shift for x [B, ..., D], with scale and shift the chunks `scale` and
/// `shift` of the modulation m [B, C·D] (broadcast over the middle dimensions); LN normalises
/// over the last dimension, without affine parameters, with ε = `eps`. Differentiable in x
/// and m.
pub fn modulated_layer_norm(
    x: &Tensor,
    m: &Tensor,
    shift: usize,
    scale: usize,
    eps: f64,
) -> CResult<Tensor> {
    let dims = Dims::new("modulated_layer_norm", x.dims(), m.dims(), &[shift, scale])?;
    if !use_kernel(x) {
        return modulated_layer_norm_reference(x, m, shift, scale, eps);
    }
    x.contiguous()?.apply_op2(
        &m.contiguous()?,
        NormOp {
            dims,
            chunks: NormChunks { shift, scale, eps },
        },
    )
}

/// LN(x) over the last dimension without affine parameters (the kernel of
/// [`modulated_layer_norm`] with a zero modulation).
pub fn layer_norm(x: &Tensor, eps: f64) -> CResult<Tensor> {
    let (Some(&b), Some(&d)) = (x.dims().first(), x.dims().last()) else {
        return Err(msg(format!(
            "layer_norm: x must be [B, ..., D], got {:?}",
            x.dims()
        )));
    };
    let zeros = Tensor::zeros((b, d), x.dtype(), x.device())?;
    modulated_layer_norm(x, &zeros, 0, 0, eps)
}

/// x + gate ⊙ h for x, h [B, ..., D] and gate the chunk `gate` of the modulation m [B, C·D]
/// (broadcast over the middle dimensions). Differentiable in all three.
pub fn gated_residual(x: &Tensor, m: &Tensor, gate: usize, h: &Tensor) -> CResult<Tensor> {
    const WHAT: &str = "gated_residual";
    let dims = Dims::new(WHAT, x.dims(), m.dims(), &[gate])?;
    if h.dims() != x.dims() {
        return Err(msg(format!(
            "{WHAT}: h has shape {:?} but x has {:?}",
            h.dims(),
            x.dims()
        )));
    }
    if !use_kernel(x) {
        return gated_residual_reference(x, m, gate, h);
    }
    x.contiguous()?.apply_op3(
        &m.contiguous()?,
        &h.contiguous()?,
        GatedOp {
            dims,
            gate,
            backward: false,
        },
    )
}

/// [`modulated_layer_norm`] from candle's ops (the fallback, and the tests' reference).
pub fn modulated_layer_norm_reference(
    x: &Tensor,
    m: &Tensor,
    shift: usize,
    scale: usize,
    eps: f64,
) -> CResult<Tensor> {
    let dims = Dims::new("modulated_layer_norm", x.dims(), m.dims(), &[shift, scale])?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let shape = dims.broadcast_shape(x.rank());
    let chunk = |c: usize| m.narrow(1, c * dims.d, dims.d)?.reshape(shape.as_slice());
    xhat.broadcast_mul(&(chunk(scale)? + 1.0)?)?
        .broadcast_add(&chunk(shift)?)
}

/// [`gated_residual`] from candle's ops (the fallback, and the tests' reference).
pub fn gated_residual_reference(
    x: &Tensor,
    m: &Tensor,
    gate: usize,
    h: &Tensor,
) -> CResult<Tensor> {
    let dims = Dims::new("gated_residual", x.dims(), m.dims(), &[gate])?;
    let shape = dims.broadcast_shape(x.rank());
    let g = m
        .narrow(1, gate * dims.d, dims.d)?
        .reshape(shape.as_slice())?;
    x + h.broadcast_mul(&g)?
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

    /// Modulations have three chunks; the norm reads shift 2 and scale 0, the gate chunk 1.
    const CHUNKS: usize = 3;

    fn norm(x: &Tensor, m: &Tensor, _h: &Tensor) -> CResult<Tensor> {
        modulated_layer_norm(x, m, 2, 0, LAYER_NORM_EPS)
    }

    fn norm_reference(x: &Tensor, m: &Tensor, _h: &Tensor) -> CResult<Tensor> {
        modulated_layer_norm_reference(x, m, 2, 0, LAYER_NORM_EPS)
    }

    fn gated(x: &Tensor, m: &Tensor, h: &Tensor) -> CResult<Tensor> {
        gated_residual(x, m, 1, h)
    }

    fn gated_reference(x: &Tensor, m: &Tensor, h: &Tensor) -> CResult<Tensor> {
        gated_residual_reference(x, m, 1, h)
    }

    type Three = fn(&Tensor, &Tensor, &Tensor) -> CResult<Tensor>;

    /// (x, m [B, 3·D], h): x has a large mean against its spread, which the two-pass statistics
    /// must survive.
    fn operands(shape: &[usize], seed: usize, dtype: DType) -> [Tensor; 3] {
        let b = shape[0];
        let d = shape[shape.len() - 1];
        let x = (filled(shape, seed, DType::F64, 2.0) + 3.0).unwrap();
        [
            x.to_dtype(dtype).unwrap(),
            filled(&[b, CHUNKS * d], seed + 1, dtype, 1.5),
            filled(shape, seed + 2, dtype, 1.0),
        ]
    }

    /// Value and the gradients of Σ y · probe with respect to the three operands (zero for an
    /// operand the op does not read).
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
        out.extend(vars.iter().map(|v| match g.get(v.as_tensor()) {
            Some(t) => t.clone(),
            None => v.as_tensor().zeros_like().unwrap(),
        }));
        out
    }

    fn compare(f: Three, reference: Three) {
        let up = |ts: Vec<Tensor>| -> Vec<Tensor> {
            ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
        };
        for (case, shape) in SHAPES.iter().enumerate() {
            let o64 = operands(shape, case, DType::F64);
            let o32 = operands(shape, case, DType::F32);
            let truth = run(reference, &o64);
            let ours = run(f, &o64);
            let ours32 = up(run(f, &o32));
            let candle32 = up(run(reference, &o32));
            for i in 0..4 {
                let name = ["y", "gx", "gm", "gh"][i];
                // 1e-10: rows of two elements have x̂ = ±1 and an input gradient that is all
                // rounding (it vanishes but for ε).
                let e = max_rel(&ours[i], &truth[i]);
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
        compare(norm, norm_reference);
    }

    #[test]
    fn gated_residual_matches_candle_ops_in_f64_and_f32() {
        compare(gated, gated_reference);
    }

    /// Shift and scale from the same chunk: their gradients add up.
    #[test]
    fn one_chunk_as_both_shift_and_scale_gets_both_gradients() {
        let f: Three = |x, m, _| modulated_layer_norm(x, m, 1, 1, LAYER_NORM_EPS);
        let r: Three = |x, m, _| modulated_layer_norm_reference(x, m, 1, 1, LAYER_NORM_EPS);
        let ops = operands(&[2, 5, 8], 3, DType::F64);
        let (a, b) = (run(f, &ops), run(r, &ops));
        for i in 0..3 {
            assert!(max_rel(&a[i], &b[i]) < 1e-12, "{i}");
        }
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
            check_finite_differences(norm, &operands(shape, case + 20, DType::F64));
            check_finite_differences(gated, &operands(shape, case + 30, DType::F64));
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
        let ops = operands(&[6, 40, 200], 1, DType::F32);
        assert_same_for_any_thread_count(|| {
            let a = run(norm, &ops);
            let b = run(gated, &ops);
            let all: Vec<&Tensor> = a.iter().chain(&b).collect();
            flat::<f32>(&all)
        });
    }

    #[test]
    fn constant_rows_stay_finite() {
        // A constant row has zero variance: x̂ = 0, y = shift, and no NaN in the gradients.
        let x = Tensor::full(2.0f32, (2, 3, 8), &Device::Cpu).unwrap();
        let m = filled(&[2, 24], 1, DType::F32, 1.0);
        let out = run(norm, &[x, m, filled(&[2, 3, 8], 2, DType::F32, 1.0)]);
        for t in &out {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = |s: &[usize]| filled(s, 0, DType::F32, 1.0);
        let x = t(&[2, 3, 4]);
        let eps = LAYER_NORM_EPS;
        assert!(modulated_layer_norm(&x, &t(&[2, 8]), 0, 1, eps).is_ok());
        assert!(modulated_layer_norm(&x, &t(&[2, 8]), 0, 2, eps).is_err());
        assert!(modulated_layer_norm(&x, &t(&[2, 7]), 0, 1, eps).is_err());
        assert!(modulated_layer_norm(&x, &t(&[1, 8]), 0, 1, eps).is_err());
        assert!(modulated_layer_norm(&x, &t(&[2, 2, 4]), 0, 1, eps).is_err());
        assert!(modulated_layer_norm(&t(&[4]), &t(&[4, 4]), 0, 0, eps).is_err());
        assert!(gated_residual(&x, &t(&[2, 4]), 0, &t(&[2, 3, 5])).is_err());
        assert!(gated_residual(&x, &t(&[3, 4]), 0, &x).is_err());
        assert!(gated_residual(&x, &t(&[2, 4]), 1, &x).is_err());
        let m64 = t(&[2, 8]).to_dtype(DType::F64).unwrap();
        assert!(modulated_layer_norm(&x, &m64, 0, 1, eps).is_err());
    }
}
