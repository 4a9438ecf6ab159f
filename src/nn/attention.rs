//! Fused CPU softmax attention, softmax(q kᵀ · scale) v, as a candle custom op with its own
//! backward.
//!
//! Built from candle ops, attention materialises the scores [BH, N, M] several times over (the
//! product, the scaled copy, the shifted copy, the exponentials, the probabilities) and keeps
//! them all alive for the backward pass, and the softmax is a chain of single-threaded
//! elementwise passes. Here each batch·head item runs on one rayon thread, a block of at most
//! [`ROW_BLOCK`] query rows at a time, with the block's scores in a per-thread scratch buffer:
//!
//! - forward: S = Q_blk Kᵀ · scale (`gemm`), P = softmax(S) in place (row max subtracted),
//!   O_blk = P V (`gemm`). Nothing is saved: the backward pass recomputes P block by block;
//! - backward: with P recomputed, dV += Pᵀ dO_blk, dP = dO_blk Vᵀ,
//!   dS = P ∘ (dP − rowsum(P ∘ dP)) · scale, dQ_blk = dS K, dK += dSᵀ Q_blk.
//!
//! rowsum(P ∘ dP) equals the usual rowsum(dO ∘ O) (as Σ_j P_ij dO_i·v_j = dO_i·o_i), but does
//! not need the forward output, and it is the exact derivative of the P that the backward pass
//! recomputes.
//!
//! Every item is computed by one thread in a fixed order, so results are bit-identical for any
//! thread count. f32 and f64 (the gradient checks run in f64); other dtypes and devices, and
//! `FERRODIFF_REFERENCE_KERNELS=1`, run [`attention_reference`] from candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernels::{matmul, msg, use_kernel, Elem};

type CResult<T> = candle_core::Result<T>;

/// Query rows per block: the block's scores (ROW_BLOCK x M) stay in a per-thread buffer that
/// fits in cache for the key counts of the U-Net's attention (M ≤ a few hundred), and gemm
/// still gets a full-height panel.
pub const ROW_BLOCK: usize = 64;

/// The arithmetic the softmax needs on top of [`Elem`].
trait Float:
    Elem
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::MulAssign
{
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    fn from_f64(x: f64) -> Self;
    /// The elements of a storage of this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Float for f32 {
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Float for f64 {
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Shapes of one attention: q [bh, n, d], k and v [bh, m, d].
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dims {
    bh: usize,
    n: usize,
    m: usize,
    d: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> CResult<Self> {
        let (&[bh, n, d], &[kbh, m, kd], &[vbh, vm, vd]) = (q, k, v) else {
            return Err(msg(format!(
                "attention: q, k and v must be [BH, len, D], got {q:?}, {k:?} and {v:?}"
            )));
        };
        if kbh != bh || vbh != bh {
            return Err(msg(format!(
                "attention: q, k and v have different batch·head sizes: {q:?}, {k:?}, {v:?}"
            )));
        }
        if kd != d || vd != d {
            return Err(msg(format!(
                "attention: q, k and v have different head widths: {q:?}, {k:?}, {v:?}"
            )));
        }
        if vm != m {
            return Err(msg(format!(
                "attention: k {k:?} and v {v:?} have different numbers of keys"
            )));
        }
        if m == 0 || d == 0 {
            return Err(msg(format!(
                "attention needs at least one key and a nonzero head width, got k {k:?}"
            )));
        }
        Ok(Dims { bh, n, m, d })
    }

    fn q_item(&self) -> usize {
        self.n * self.d
    }

    fn kv_item(&self) -> usize {
        self.m * self.d
    }

    /// Rows in the first (largest) block.
    fn block(&self) -> usize {
        ROW_BLOCK.min(self.n)
    }
}

/// Scores of the query rows `qb` [rows, d] against k [m, d] into `s` [rows, m], turned in place
/// into softmax(qb kᵀ · scale) row by row.
fn probabilities<T: Float>(g: &Dims, rows: usize, qb: &[T], k: &[T], scale: T, s: &mut [T]) {
    let (m, d) = (g.m, g.d);
    // s [rows, m] = qb [rows, d] · kᵀ [d, m]
    matmul(
        rows,
        m,
        d,
        s,
        false,
        qb,
        (1, d as isize),
        k,
        (d as isize, 1),
    );
    for row in s[..rows * m].chunks_exact_mut(m) {
        // The scores are scaled on the fly (no pass writing them back); the max is of the
        // same rounded products, so every shifted score is ≤ 0 and exp cannot overflow.
        let max = scaled_max(row, scale);
        let mut sum = T::ZERO;
        for x in row.iter_mut() {
            *x = (*x * scale - max).exp();
            sum += *x;
        }
        let inv = T::ONE / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Σ a_j b_j, over eight independent lanes so that the compiler vectorises it.
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    const LANES: usize = 8;
    let mut lanes = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    for ((l, &x), &y) in lanes.iter_mut().zip(ra).zip(rb) {
        *l += x * y;
    }
    lanes.into_iter().fold(T::ZERO, |a, b| a + b)
}

/// max_j row_j · scale, over eight independent lanes so that the compiler vectorises it (a
/// float max is not associative for it to reorder); NaNs are skipped. Rounding is monotonic,
/// so this is exactly the max of the rounded products the softmax then shifts by.
fn scaled_max<T: Float>(row: &[T], scale: T) -> T {
    const LANES: usize = 8;
    let mut lanes = [T::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            let t = x * scale;
            *l = if t > *l { t } else { *l };
        }
    }
    for (l, &x) in lanes.iter_mut().zip(rest) {
        let t = x * scale;
        *l = if t > *l { t } else { *l };
    }
    lanes
        .into_iter()
        .fold(T::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

fn attention_forward<T: Float>(g: &Dims, scale: f64, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.bh * g.q_item()];
    if out.is_empty() {
        return out;
    }
    let (m, d, scale) = (g.m, g.d, T::from_f64(scale));
    out.par_chunks_mut(g.q_item()).enumerate().for_each_init(
        || vec![T::ZERO; g.block() * m],
        |s, (b, ob)| {
            let qi = &q[b * g.q_item()..][..g.q_item()];
            let ki = &k[b * g.kv_item()..][..g.kv_item()];
            let vi = &v[b * g.kv_item()..][..g.kv_item()];
            for r0 in (0..g.n).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(g.n - r0);
                probabilities(g, rows, &qi[r0 * d..(r0 + rows) * d], ki, scale, s);
                // ob [rows, d] = p [rows, m] · v [m, d]
                matmul(
                    rows,
                    d,
                    m,
                    &mut ob[r0 * d..(r0 + rows) * d],
                    false,
                    s,
                    (1, m as isize),
                    vi,
                    (1, d as isize),
                );
            }
        },
    );
    out
}

/// Which gradients the backward pass computes (those of inputs that carry no gradient are
/// left at zero and dropped).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Needs {
    q: bool,
    k: bool,
    v: bool,
}

/// The gradients packed as one flat buffer [dq (bh·n·d) | dk (bh·m·d) | dv (bh·m·d)], from q,
/// k, v and the output gradient go [bh, n, d].
#[allow(clippy::too_many_arguments)]
fn attention_backward<T: Float>(
    g: &Dims,
    scale: f64,
    needs: Needs,
    q: &[T],
    k: &[T],
    v: &[T],
    go: &[T],
) -> Vec<T> {
    let (n, m, d) = (g.n, g.m, g.d);
    let (qn, kn) = (g.bh * g.q_item(), g.bh * g.kv_item());
    let mut out = vec![T::ZERO; qn + 2 * kn];
    if qn == 0 {
        // No queries: every gradient is an empty sum.
        return out;
    }
    let (dq, rest) = out.split_at_mut(qn);
    let (dk, dv) = rest.split_at_mut(kn);
    let scale = T::from_f64(scale);
    dq.par_chunks_mut(g.q_item())
        .zip(dk.par_chunks_mut(g.kv_item()))
        .zip(dv.par_chunks_mut(g.kv_item()))
        .enumerate()
        .for_each_init(
            || (vec![T::ZERO; g.block() * m], vec![T::ZERO; g.block() * m]),
            |(p, dp), (b, ((dqi, dki), dvi))| {
                let qi = &q[b * g.q_item()..][..g.q_item()];
                let goi = &go[b * g.q_item()..][..g.q_item()];
                let ki = &k[b * g.kv_item()..][..g.kv_item()];
                let vi = &v[b * g.kv_item()..][..g.kv_item()];
                for r0 in (0..n).step_by(ROW_BLOCK) {
                    let rows = ROW_BLOCK.min(n - r0);
                    // dK and dV sum over every block; the first one overwrites.
                    let accumulate = r0 > 0;
                    let qb = &qi[r0 * d..(r0 + rows) * d];
                    let gob = &goi[r0 * d..(r0 + rows) * d];
                    probabilities(g, rows, qb, ki, scale, p);
                    if needs.v {
                        // dv [m, d] += pᵀ [m, rows] · go_blk [rows, d]
                        matmul(
                            m,
                            d,
                            rows,
                            dvi,
                            accumulate,
                            p,
                            (m as isize, 1),
                            gob,
                            (1, d as isize),
                        );
                    }
                    if !(needs.q || needs.k) {
                        continue;
                    }
                    // dp [rows, m] = go_blk [rows, d] · vᵀ [d, m]
                    matmul(
                        rows,
                        m,
                        d,
                        dp,
                        false,
                        gob,
                        (1, d as isize),
                        vi,
                        (d as isize, 1),
                    );
                    // ds = p ∘ (dp − rowsum(p ∘ dp)) · scale, in dp's buffer.
                    for (pr, dpr) in p[..rows * m]
                        .chunks_exact(m)
                        .zip(dp[..rows * m].chunks_exact_mut(m))
                    {
                        let delta = dot(pr, dpr);
                        for (&a, x) in pr.iter().zip(dpr.iter_mut()) {
                            *x = a * (*x - delta) * scale;
                        }
                    }
                    if needs.q {
                        // dq_blk [rows, d] = ds [rows, m] · k [m, d]
                        matmul(
                            rows,
                            d,
                            m,
                            &mut dqi[r0 * d..(r0 + rows) * d],
                            false,
                            dp,
                            (1, m as isize),
                            ki,
                            (1, d as isize),
                        );
                    }
                    if needs.k {
                        // dk [m, d] += dsᵀ [m, rows] · q_blk [rows, d]
                        matmul(
                            m,
                            d,
                            rows,
                            dki,
                            accumulate,
                            dp,
                            (m as isize, 1),
                            qb,
                            (1, d as isize),
                        );
                    }
                }
            },
        );
    out
}

/// The elements of a contiguous f32 or f64 operand.
fn operand<'a, T: Float>((s, l): (&'a CpuStorage, &Layout)) -> CResult<&'a [T]> {
    let s = T::slice(s).ok_or_else(|| {
        msg("attention kernel: q, k, v and the output gradient must be all f32 or all f64")
    })?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => Err(msg("attention kernel: operands must be contiguous")),
    }
}

/// Which pass an [`AttentionOp`] computes.
#[derive(Clone, Debug)]
enum Pass {
    /// (q, k, v) -> out [bh, n, d]; differentiable.
    Forward,
    /// (q, k, v) -> [dq | dk | dv], flat. A custom op takes at most three operands, so the
    /// output gradient [bh, n, d] travels in the op (concatenating k and v instead would copy
    /// them on every backward pass).
    Backward { needs: Needs, grad: Tensor },
}

struct AttentionOp {
    g: Dims,
    scale: f64,
    pass: Pass,
}

impl AttentionOp {
    /// The pass on operands of element type `T` (an error if any operand has another).
    fn run<T: Float>(
        &self,
        q: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        v: (&CpuStorage, &Layout),
    ) -> CResult<Vec<T>> {
        let (q, k, v) = (operand(q)?, operand(k)?, operand(v)?);
        match &self.pass {
            Pass::Forward => Ok(attention_forward(&self.g, self.scale, q, k, v)),
            Pass::Backward { needs, grad } => {
                // Read under the gradient's storage lock, a shared (read) lock like the ones
                // candle holds on q, k and v meanwhile; nothing writes to a gradient during
                // the backward pass.
                let (storage, layout) = grad.storage_and_layout();
                let candle_core::Storage::Cpu(storage) = &*storage else {
                    return Err(msg(
                        "attention kernel: the output gradient is not on the CPU",
                    ));
                };
                let go = operand((storage, layout))?;
                Ok(attention_backward(&self.g, self.scale, *needs, q, k, v, go))
            }
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "ferrodiff-attention",
            Pass::Backward { .. } => "ferrodiff-attention-backward",
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
        let g = &self.g;
        let shape = match self.pass {
            Pass::Forward => Shape::from((g.bh, g.n, g.d)),
            Pass::Backward { .. } => Shape::from(g.bh * (g.n + 2 * g.m) * g.d),
        };
        let (q, k, v) = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.run(q, k, v)?),
            CpuStorage::F64(_) => f64::storage(self.run(q, k, v)?),
            _ => return Err(msg("attention kernel: only f32 and f64 are supported")),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !matches!(self.pass, Pass::Forward) {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        let needs = Needs {
            q: q.track_op(),
            k: k.track_op(),
            v: v.track_op(),
        };
        let packed = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionOp {
                g: self.g,
                scale: self.scale,
                pass: Pass::Backward {
                    needs,
                    grad: grad.contiguous()?,
                },
            },
        )?;
        let Dims { bh, n, m, d } = self.g;
        let part = |need: bool, start: usize, len: usize| -> CResult<Option<Tensor>> {
            if !need {
                return Ok(None);
            }
            Ok(Some(
                packed
                    .narrow(0, start * bh * d, bh * len * d)?
                    .reshape((bh, len, d))?,
            ))
        };
        Ok((
            part(needs.q, 0, n)?,
            part(needs.k, n, m)?,
            part(needs.v, n + m, m)?,
        ))
    }
}

/// Self-attention on q, k and v packed in one tensor [3, BH, N, D], as one projection of the
/// tokens produces them: the backward pass writes the gradient packed the same way
/// ([dq | dk | dv] is already the kernel's layout), so no narrow or concatenation of q, k, v
/// or their gradients is needed.
struct PackedAttention {
    g: Dims,
    scale: f64,
    /// (qkv, go) -> [dq | dk | dv] when set; (qkv) -> out otherwise.
    backward: bool,
}

impl PackedAttention {
    /// The three parts of a packed operand.
    fn parts<'a, T: Float>(&self, s: (&'a CpuStorage, &Layout)) -> CResult<[&'a [T]; 3]> {
        let all = operand(s)?;
        let n = self.g.bh * self.g.q_item();
        if all.len() != 3 * n {
            return Err(msg("packed attention: qkv has the wrong size"));
        }
        Ok([&all[..n], &all[n..2 * n], &all[2 * n..]])
    }

    fn forward<T: Float>(&self, s: (&CpuStorage, &Layout)) -> CResult<Vec<T>> {
        let [q, k, v] = self.parts(s)?;
        Ok(attention_forward(&self.g, self.scale, q, k, v))
    }

    fn gradients<T: Float>(
        &self,
        s: (&CpuStorage, &Layout),
        go: (&CpuStorage, &Layout),
    ) -> CResult<Vec<T>> {
        let [q, k, v] = self.parts(s)?;
        let needs = Needs {
            q: true,
            k: true,
            v: true,
        };
        Ok(attention_backward(
            &self.g,
            self.scale,
            needs,
            q,
            k,
            v,
            operand(go)?,
        ))
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "ferrodiff-packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::storage(self.forward((s, l))?),
            CpuStorage::F64(_) => f64::storage(self.forward((s, l))?),
            _ => return Err(msg("attention kernel: only f32 and f64 are supported")),
        };
        Ok((out, Shape::from((self.g.bh, self.g.n, self.g.d))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let back = PackedAttention {
            backward: true,
            ..*self
        };
        let packed = qkv.apply_op2_no_bwd(&grad.contiguous()?, &back)?;
        Ok(Some(packed.reshape(qkv.shape())?))
    }
}

impl CustomOp2 for PackedAttention {
    fn name(&self) -> &'static str {
        "ferrodiff-packed-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if !self.backward {
            return Err(msg("packed attention: the forward takes one operand"));
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.gradients((s1, l1), (s2, l2))?),
            CpuStorage::F64(_) => f64::storage(self.gradients((s1, l1), (s2, l2))?),
            _ => return Err(msg("attention kernel: only f32 and f64 are supported")),
        };
        Ok((out, Shape::from(3 * self.g.bh * self.g.q_item())))
    }
}

/// softmax(q kᵀ · scale) v for q, k, v packed as qkv [3, BH, N, D] -> [BH, N, D]
/// (self-attention, where q, k and v come from one projection). Differentiable in qkv; the
/// gradient comes back packed. CPU f32/f64 tensors run the fused kernel, others
/// [`attention_reference`] on the three parts.
pub fn packed_self_attention(qkv: &Tensor, scale: f64) -> CResult<Tensor> {
    let dims = qkv.dims();
    let &[3, bh, n, d] = dims else {
        return Err(msg(format!(
            "packed attention: qkv must be [3, BH, N, D], got {dims:?}"
        )));
    };
    let g = Dims::new(&[bh, n, d], &[bh, n, d], &[bh, n, d])?;
    if !use_kernel(qkv) {
        return attention_reference(&qkv.get(0)?, &qkv.get(1)?, &qkv.get(2)?, scale);
    }
    qkv.contiguous()?.apply_op1(PackedAttention {
        g,
        scale,
        backward: false,
    })
}

/// softmax(q kᵀ · scale) v from candle ops, differentiable through candle's autograd: the row
/// max subtracted for stability is detached (a constant shift of each row). The fallback of
/// [`attention`] and the reference its tests and benchmarks compare against.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> CResult<Tensor> {
    Dims::new(q.dims(), k.dims(), v.dims())?;
    let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(v)
}

/// softmax(q kᵀ · scale) v for q [BH, N, D], k [BH, M, D], v [BH, M, D] -> [BH, N, D].
///
/// Differentiable in q, k and v. f32 and f64 CPU tensors run the fused kernel (any layout; they
/// are made contiguous first), others [`attention_reference`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> CResult<Tensor> {
    let g = Dims::new(q.dims(), k.dims(), v.dims())?;
    if !use_kernel(q) {
        return attention_reference(q, k, v, scale);
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttentionOp {
            g,
            scale,
            pass: Pass::Forward,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{
        assert_same_for_any_thread_count, filled_scaled as filled, flat, max_abs,
    };
    use candle_core::{DType, Device, Var};

    /// max |a − b| / max(max |b|, 1e-300).
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::test_util::max_rel(a, b, 1e-300)
    }

    /// (bh, n, m, d): single elements, odd sizes, several row blocks, a partial block, tiny
    /// key counts and cross-attention (n != m).
    const CASES: [(usize, usize, usize, usize); 7] = [
        (1, 1, 1, 1),
        (3, 5, 7, 4),
        (2, 64, 64, 32),
        (4, 49, 49, 16),
        (2, 70, 3, 8),
        (1, 130, 20, 5),
        (3, 2, 129, 6),
    ];

    type Grads = [Tensor; 3];

    /// Output and the gradients of Σ probe · out for q, k, v, by `f`.
    fn run(
        f: fn(&Tensor, &Tensor, &Tensor, f64) -> CResult<Tensor>,
        qkv: &[Tensor; 3],
        probe: &Tensor,
        scale: f64,
    ) -> (Tensor, Grads) {
        let vars: Vec<Var> = qkv.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let out = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            scale,
        )
        .unwrap();
        let grads = (&out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = |i: usize| grads.get(vars[i].as_tensor()).unwrap().clone();
        (out, [g(0), g(1), g(2)])
    }

    fn inputs(
        (bh, n, m, d): (usize, usize, usize, usize),
        seed: usize,
        dtype: DType,
        amp: f64,
    ) -> ([Tensor; 3], Tensor) {
        (
            [
                filled(&[bh, n, d], seed, dtype, amp),
                filled(&[bh, m, d], seed + 1, dtype, amp),
                filled(&[bh, m, d], seed + 2, dtype, amp),
            ],
            filled(&[bh, n, d], seed + 3, dtype, 1.0),
        )
    }

    fn compare(case: (usize, usize, usize, usize), dtype: DType, amp: f64, scale: f64, tol: f64) {
        let (qkv, probe) = inputs(case, case.0 + case.1 + case.3, dtype, amp);
        let (o1, g1) = run(attention, &qkv, &probe, scale);
        let (o2, g2) = run(attention_reference, &qkv, &probe, scale);
        assert_eq!(o1.dims(), o2.dims());
        let e = rel_diff(&o1, &o2);
        assert!(e < tol, "{case:?} {dtype:?}: values differ by {e:e}");
        for (name, a, b) in [
            ("q", &g1[0], &g2[0]),
            ("k", &g1[1], &g2[1]),
            ("v", &g1[2], &g2[2]),
        ] {
            assert_eq!(a.dims(), b.dims());
            let e = rel_diff(a, b);
            assert!(
                e < tol,
                "{case:?} {dtype:?}: gradient of {name} differs by {e:e}"
            );
            assert!(
                max_abs(a).is_finite(),
                "{case:?}: gradient of {name} not finite"
            );
        }
    }

    #[test]
    fn values_and_gradients_match_candle_ops_in_f64() {
        for case in CASES {
            compare(case, DType::F64, 1.0, 1.0 / (case.3 as f64).sqrt(), 1e-10);
        }
    }

    #[test]
    fn values_and_gradients_match_candle_ops_in_f32() {
        for case in CASES {
            compare(case, DType::F32, 1.0, 1.0 / (case.3 as f64).sqrt(), 2e-5);
        }
    }

    /// Logits in the thousands: the row max is subtracted before exp, so nothing overflows and
    /// the (nearly one-hot) result still matches.
    #[test]
    fn large_logits_stay_finite_and_match() {
        for case in [(2, 9, 11, 4), (1, 70, 5, 8)] {
            compare(case, DType::F64, 100.0, 1.0, 1e-10);
            compare(case, DType::F32, 100.0, 1.0, 1e-4);
            compare(case, DType::F64, 1.0, 1e4, 1e-10);
        }
        let (qkv, probe) = inputs((2, 9, 11, 4), 1, DType::F32, 100.0);
        let (o, g) = run(attention, &qkv, &probe, 50.0);
        for t in [&o, &g[0], &g[1], &g[2]] {
            assert!(max_abs(t).is_finite());
        }
    }

    /// Central finite differences of Σ probe · attention(q, k, v) for a few entries of each.
    #[test]
    fn gradients_match_finite_differences() {
        for (c, case) in [(2, 5, 7, 3), (1, 67, 4, 2)].into_iter().enumerate() {
            let (qkv, probe) = inputs(case, c + 10, DType::F64, 1.5);
            let scale = 0.7;
            let (_, grads) = run(attention, &qkv, &probe, scale);
            let loss = |t: &[Tensor]| -> f64 {
                (attention(&t[0], &t[1], &t[2], scale).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let eps = 1e-6;
            for which in 0..3 {
                let flat: Vec<f64> = qkv[which].flatten_all().unwrap().to_vec1().unwrap();
                let g: Vec<f64> = grads[which].flatten_all().unwrap().to_vec1().unwrap();
                for &i in &[0, flat.len() / 3, flat.len() / 2 + 1, flat.len() - 1] {
                    let bump = |delta: f64| {
                        let mut p = flat.clone();
                        p[i] += delta;
                        let mut t = qkv.clone();
                        t[which] = Tensor::from_vec(p, qkv[which].dims(), &Device::Cpu).unwrap();
                        loss(&t)
                    };
                    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    assert!(
                        (fd - g[i]).abs() < 1e-7,
                        "{case:?}, {}[{i}]: {fd} vs {}",
                        ["q", "k", "v"][which],
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn non_contiguous_inputs_and_untracked_inputs() {
        let (bh, n, m, d) = (3, 6, 5, 4);
        // Stored as [bh, d, len] and viewed transposed.
        let q = filled(&[bh, d, n], 1, DType::F64, 1.0)
            .transpose(1, 2)
            .unwrap();
        let k = filled(&[bh, d, m], 2, DType::F64, 1.0)
            .transpose(1, 2)
            .unwrap();
        let v = Var::from_tensor(&filled(&[bh, m, d], 3, DType::F64, 1.0)).unwrap();
        assert!(!q.is_contiguous());
        let ours = attention(&q, &k, v.as_tensor(), 0.5).unwrap();
        let theirs = attention_reference(&q, &k, v.as_tensor(), 0.5).unwrap();
        assert!(rel_diff(&ours, &theirs) < 1e-12);
        let grads = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&q).is_none() && grads.get(&k).is_none());
        let gv = grads.get(v.as_tensor()).unwrap();
        let gv_ref = attention_reference(&q, &k, v.as_tensor(), 0.5)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(rel_diff(gv, gv_ref.get(v.as_tensor()).unwrap()) < 1e-12);
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let (qkv, probe) = inputs((7, 70, 33, 8), 5, DType::F32, 1.0);
        assert_same_for_any_thread_count(|| {
            let (o, g) = run(attention, &qkv, &probe, 0.3);
            flat::<f32>(&[&o, &g[0], &g[1], &g[2]])
        });
    }

    #[test]
    fn empty_query_sets_give_empty_outputs_and_zero_gradients() {
        let (qkv, probe) = inputs((2, 0, 3, 4), 0, DType::F64, 1.0);
        let (o, g) = run(attention, &qkv, &probe, 1.0);
        assert_eq!(o.dims(), &[2, 0, 4]);
        assert_eq!(max_abs(&g[1]), 0.0);
        assert_eq!(max_abs(&g[2]), 0.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = |s: &[usize]| filled(s, 0, DType::F32, 1.0);
        let good = (t(&[2, 3, 4]), t(&[2, 5, 4]), t(&[2, 5, 4]));
        assert!(attention(&good.0, &good.1, &good.2, 1.0).is_ok());
        let bad = [
            (t(&[2, 3]), t(&[2, 5, 4]), t(&[2, 5, 4])),
            (t(&[2, 3, 4]), t(&[1, 2, 5, 4]), t(&[2, 5, 4])),
            (t(&[2, 3, 4]), t(&[3, 5, 4]), t(&[3, 5, 4])),
            (t(&[2, 3, 4]), t(&[2, 5, 3]), t(&[2, 5, 4])),
            (t(&[2, 3, 4]), t(&[2, 5, 4]), t(&[2, 6, 4])),
            (t(&[2, 3, 4]), t(&[2, 5, 4]), t(&[2, 5, 5])),
            (t(&[2, 3, 0]), t(&[2, 5, 0]), t(&[2, 5, 0])),
            (t(&[2, 3, 4]), t(&[2, 0, 4]), t(&[2, 0, 4])),
        ];
        for (i, (q, k, v)) in bad.iter().enumerate() {
            assert!(attention(q, k, v, 1.0).is_err(), "case {i}");
            assert!(attention_reference(q, k, v, 1.0).is_err(), "case {i}");
        }
        let mixed = attention(&good.0, &good.1.to_dtype(DType::F64).unwrap(), &good.2, 1.0);
        assert!(mixed.is_err());
    }

    #[test]
    fn packed_self_attention_equals_attention_on_the_parts_with_packed_gradients() {
        for (bh, n, d) in [(1, 1, 1), (3, 5, 4), (2, 70, 8)] {
            let qkv = filled(&[3, bh, n, d], bh + n, DType::F64, 1.0);
            let probe = filled(&[bh, n, d], 3, DType::F64, 1.0);
            let packed = Var::from_tensor(&qkv).unwrap();
            let out = packed_self_attention(packed.as_tensor(), 0.4).unwrap();
            let g = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let parts = [0, 1, 2].map(|i| qkv.get(i).unwrap());
            let (o2, g2) = run(attention, &parts, &probe, 0.4);
            assert!(rel_diff(&out, &o2) < 1e-12);
            let gp = g.get(packed.as_tensor()).unwrap();
            assert_eq!(gp.dims(), &[3, bh, n, d]);
            for (i, gi) in g2.iter().enumerate() {
                assert!(rel_diff(&gp.get(i).unwrap(), gi) < 1e-12, "part {i}");
            }
        }
        let bad = filled(&[2, 1, 3, 4], 0, DType::F32, 1.0);
        assert!(packed_self_attention(&bad, 1.0).is_err());
    }
}
