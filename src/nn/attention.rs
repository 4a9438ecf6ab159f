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

use super::kernels::{matmul, matmul_strided, msg, use_kernel, Elem};
use crate::kernels::simd::avx2_twin;

type CResult<T> = candle_core::Result<T>;

/// Query rows per block: the block's scores (ROW_BLOCK x M) stay in a per-thread buffer that
/// fits in cache for the key counts of the U-Net's attention (M ≤ a few hundred), and gemm
/// still gets a full-height panel.
pub const ROW_BLOCK: usize = 64;

/// The arithmetic the softmax needs on top of [`Elem`].
pub(super) trait Float:
    Elem
    + num_traits::Float
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::MulAssign
{
    fn from_f64(x: f64) -> Self;
    /// Shifted scores below this have e^x = 0 in the softmax: [`Elem::fast_exp`] stops at
    /// e^-87 for f32, where the exact exp goes on to denormals and 0 (f64's exp is exact).
    fn exp_floor() -> Self;
    /// The elements of a storage of this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

impl Float for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn exp_floor() -> Self {
        -87.0
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Float for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn exp_floor() -> Self {
        f64::NEG_INFINITY
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
    softmax_rows(&mut s[..rows * m], m, scale, T::exp_floor());
}

avx2_twin! {
/// Each row of `s` (rows of `m` scores) replaced by softmax(row · scale); shifted scores below
/// `floor` count as e^x = 0.
fn softmax_rows<T>(s: &mut [T], m: usize, scale: T, floor: T) {
    for row in s.chunks_exact_mut(m) {
        // The scores are scaled on the fly (no pass writing them back); the max is of the
        // same rounded products, so every shifted score is ≤ 0 and exp cannot overflow.
        let max = scaled_max(row, scale);
        for x in row.iter_mut() {
            let z = *x * scale - max;
            let e = z.fast_exp();
            *x = if z < floor { T::ZERO } else { e };
        }
        let inv = T::ONE / lane_sum(row);
        for x in row.iter_mut() {
            *x = *x * inv;
        }
    }
}
}

avx2_twin! {
/// The softmax's backward, row by row: ds = p ∘ (dp − rowsum(p ∘ dp)) · scale, in dp.
fn softmax_backward_rows<T>(p: &[T], dp: &mut [T], m: usize, scale: T) {
    for (pr, dpr) in p.chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
        let delta = dot(pr, dpr);
        for (&a, x) in pr.iter().zip(dpr.iter_mut()) {
            *x = a * (*x - delta) * scale;
        }
    }
}
}

/// Lanes of the vectorised reductions: independent partial sums in a fixed order.
const LANES: usize = 8;

/// Σ a_j b_j, over eight independent lanes so that the compiler vectorises it.
#[inline(always)]
fn dot<T: Elem + num_traits::Float>(a: &[T], b: &[T]) -> T {
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

/// Σ a_j, over eight independent lanes.
#[inline(always)]
fn lane_sum<T: Elem + num_traits::Float>(a: &[T]) -> T {
    let mut lanes = [T::ZERO; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    for (l, &x) in lanes.iter_mut().zip(rest) {
        *l += x;
    }
    lanes.into_iter().fold(T::ZERO, |a, b| a + b)
}

/// max_j row_j · scale, over eight independent lanes so that the compiler vectorises it (a
/// float max is not associative for it to reorder); NaNs are skipped. Rounding is monotonic,
/// so this is exactly the max of the rounded products the softmax then shifts by.
#[inline(always)]
fn scaled_max<T: Elem + num_traits::Float>(row: &[T], scale: T) -> T {
    let neg_inf = T::neg_infinity();
    let mut lanes = [neg_inf; LANES];
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
        .fold(neg_inf, |a, b| if b > a { b } else { a })
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
                    softmax_backward_rows(&p[..rows * m], &mut dp[..rows * m], m, scale);
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

/// Shapes of a multi-head self-attention over tokens: qkv [b, n, 3·heads·hd], the last
/// dimension ordered (q | k | v, head, width) as one projection of the tokens produces it, and
/// the output [b, n, heads·hd] ordered (head, width).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct TokenDims {
    pub(super) b: usize,
    pub(super) n: usize,
    pub(super) heads: usize,
    pub(super) hd: usize,
}

impl TokenDims {
    fn d(&self) -> usize {
        self.heads * self.hd
    }

    fn qkv_item(&self) -> usize {
        3 * self.n * self.d()
    }

    fn out_item(&self) -> usize {
        self.n * self.d()
    }

    /// Rows in the first (largest) block.
    fn block(&self) -> usize {
        ROW_BLOCK.min(self.n)
    }
}

/// Multi-head self-attention read straight from the projection's output and written straight
/// in the output projection's input layout: the heads are strided views (row stride 3D in
/// qkv, D in the output), so no split / merge of the heads is materialised, and the backward
/// pass writes the gradient of qkv in the same layout. One thread per batch item, all its heads.
struct TokenAttention {
    g: TokenDims,
    scale: f64,
}

pub(super) fn token_attention_forward<T: Float>(g: &TokenDims, scale: f64, qkv: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.b * g.out_item()];
    if out.is_empty() {
        return out;
    }
    let (n, hd, d) = (g.n, g.hd, g.d());
    let (rs, scale) = (3 * d as isize, T::from_f64(scale));
    out.par_chunks_mut(g.out_item()).enumerate().for_each_init(
        || vec![T::ZERO; g.block() * n],
        |s, (b, ob)| {
            let item = &qkv[b * g.qkv_item()..][..g.qkv_item()];
            for h in 0..g.heads {
                let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
                for r0 in (0..n).step_by(ROW_BLOCK) {
                    let rows = ROW_BLOCK.min(n - r0);
                    // s [rows, n] = q_blk [rows, hd] · kᵀ [hd, n]
                    matmul(
                        rows,
                        n,
                        hd,
                        s,
                        false,
                        &item[r0 * 3 * d + q..],
                        (1, rs),
                        &item[k..],
                        (rs, 1),
                    );
                    softmax_rows(&mut s[..rows * n], n, scale, T::exp_floor());
                    // out_blk [rows, hd] (rows d apart) = p [rows, n] · v [n, hd]
                    matmul_strided(
                        rows,
                        hd,
                        n,
                        &mut ob[r0 * d + h * hd..],
                        d,
                        false,
                        s,
                        (1, n as isize),
                        &item[v..],
                        (1, rs),
                    );
                }
            }
        },
    );
    out
}

/// The gradient of qkv [b, n, 3D] from qkv and the output gradient go [b, n, D].
pub(super) fn token_attention_backward<T: Float>(
    g: &TokenDims,
    scale: f64,
    qkv: &[T],
    go: &[T],
) -> Vec<T> {
    let mut dqkv = vec![T::ZERO; g.b * g.qkv_item()];
    if dqkv.is_empty() {
        return dqkv;
    }
    let (n, hd, d) = (g.n, g.hd, g.d());
    let (rs, scale) = (3 * d as isize, T::from_f64(scale));
    dqkv.par_chunks_mut(g.qkv_item()).enumerate().for_each_init(
        || (vec![T::ZERO; g.block() * n], vec![T::ZERO; g.block() * n]),
        |(p, dp), (b, di)| {
            let item = &qkv[b * g.qkv_item()..][..g.qkv_item()];
            let goi = &go[b * g.out_item()..][..g.out_item()];
            for h in 0..g.heads {
                let (q, k, v) = (h * hd, d + h * hd, 2 * d + h * hd);
                for r0 in (0..n).step_by(ROW_BLOCK) {
                    let rows = ROW_BLOCK.min(n - r0);
                    // dK and dV sum over every block; the first one overwrites.
                    let accumulate = r0 > 0;
                    let (qb, gob) = (r0 * 3 * d + q, r0 * d + h * hd);
                    // p = softmax(q_blk kᵀ · scale), recomputed
                    matmul(
                        rows,
                        n,
                        hd,
                        p,
                        false,
                        &item[qb..],
                        (1, rs),
                        &item[k..],
                        (rs, 1),
                    );
                    softmax_rows(&mut p[..rows * n], n, scale, T::exp_floor());
                    // dv [n, hd] += pᵀ [n, rows] · go_blk [rows, hd]
                    matmul_strided(
                        n,
                        hd,
                        rows,
                        &mut di[v..],
                        3 * d,
                        accumulate,
                        p,
                        (n as isize, 1),
                        &goi[gob..],
                        (1, d as isize),
                    );
                    // dp [rows, n] = go_blk [rows, hd] · vᵀ [hd, n]
                    matmul(
                        rows,
                        n,
                        hd,
                        dp,
                        false,
                        &goi[gob..],
                        (1, d as isize),
                        &item[v..],
                        (rs, 1),
                    );
                    // ds = p ∘ (dp − rowsum(p ∘ dp)) · scale, in dp's buffer.
                    softmax_backward_rows(&p[..rows * n], &mut dp[..rows * n], n, scale);
                    // dq_blk [rows, hd] = ds [rows, n] · k [n, hd]
                    matmul_strided(
                        rows,
                        hd,
                        n,
                        &mut di[qb..],
                        3 * d,
                        false,
                        dp,
                        (1, n as isize),
                        &item[k..],
                        (1, rs),
                    );
                    // dk [n, hd] += dsᵀ [n, rows] · q_blk [rows, hd]
                    matmul_strided(
                        n,
                        hd,
                        rows,
                        &mut di[k..],
                        3 * d,
                        accumulate,
                        dp,
                        (n as isize, 1),
                        &item[qb..],
                        (1, rs),
                    );
                }
            }
        },
    );
    dqkv
}

impl CustomOp1 for TokenAttention {
    fn name(&self) -> &'static str {
        "ferrodiff-token-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = &self.g;
        let out = match s {
            CpuStorage::F32(_) => {
                f32::storage(token_attention_forward(g, self.scale, operand((s, l))?))
            }
            CpuStorage::F64(_) => {
                f64::storage(token_attention_forward(g, self.scale, operand((s, l))?))
            }
            _ => return Err(msg("attention kernel: only f32 and f64 are supported")),
        };
        Ok((out, Shape::from((g.b, g.n, g.d()))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, self)?))
    }
}

/// (qkv, go) -> dqkv: the backward pass of [`TokenAttention`].
impl CustomOp2 for TokenAttention {
    fn name(&self) -> &'static str {
        "ferrodiff-token-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = &self.g;
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(token_attention_backward(
                g,
                self.scale,
                operand((s1, l1))?,
                operand((s2, l2))?,
            )),
            CpuStorage::F64(_) => f64::storage(token_attention_backward(
                g,
                self.scale,
                operand((s1, l1))?,
                operand((s2, l2))?,
            )),
            _ => return Err(msg("attention kernel: only f32 and f64 are supported")),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Multi-head self-attention softmax(Q Kᵀ / √hd) V over tokens, from the output of one
/// projection qkv [B, N, 3D] whose last dimension is ordered (q | k | v, head, width), to
/// [B, N, D] ordered (head, width): the input of the output projection. Differentiable in qkv.
/// CPU f32/f64 tensors run the fused kernel, others [`attention_reference`] after splitting
/// the heads with candle ops.
pub fn token_self_attention(qkv: &Tensor, heads: usize) -> CResult<Tensor> {
    let dims = qkv.dims();
    let &[b, n, three_d] = dims else {
        return Err(msg(format!(
            "token attention: qkv must be [B, N, 3D], got {dims:?}"
        )));
    };
    if heads == 0 || three_d == 0 || !three_d.is_multiple_of(3 * heads) {
        return Err(msg(format!(
            "token attention: qkv {dims:?} does not split into q, k, v of {heads} heads"
        )));
    }
    let g = TokenDims {
        b,
        n,
        heads,
        hd: three_d / (3 * heads),
    };
    let scale = 1.0 / (g.hd as f64).sqrt();
    if n == 0 {
        return Err(msg(format!(
            "token attention needs at least one token, got {dims:?}"
        )));
    }
    if !use_kernel(qkv) {
        let parts = qkv
            .reshape((b, n, 3, heads, g.hd))?
            .permute([2, 0, 3, 1, 4])?
            .contiguous()?
            .reshape((3, b * heads, n, g.hd))?;
        let o = attention_reference(&parts.get(0)?, &parts.get(1)?, &parts.get(2)?, scale)?;
        return o
            .reshape((b, heads, n, g.hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, g.d()));
    }
    qkv.contiguous()?.apply_op1(TokenAttention { g, scale })
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

    /// token_self_attention against the heads split with candle ops and the reference
    /// attention, in values and in the gradient of qkv.
    #[test]
    fn token_self_attention_equals_attention_on_the_split_heads() {
        for (b, n, heads, hd) in [(1, 1, 1, 1), (3, 5, 2, 4), (2, 70, 3, 8), (2, 16, 4, 32)] {
            let d = heads * hd;
            for dtype in [DType::F64, DType::F32] {
                let qkv = filled(&[b, n, 3 * d], b + n, dtype, 1.0);
                let probe = filled(&[b, n, d], 3, dtype, 1.0);
                let run_with = |f: &dyn Fn(&Tensor) -> Tensor| {
                    let v = Var::from_tensor(&qkv).unwrap();
                    let out = f(v.as_tensor());
                    let g = (&out * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    (out, g.get(v.as_tensor()).unwrap().clone())
                };
                let (o1, g1) = run_with(&|t| token_self_attention(t, heads).unwrap());
                let (o2, g2) = run_with(&|t| {
                    let parts = t
                        .reshape((b, n, 3, heads, hd))
                        .unwrap()
                        .permute([2, 0, 3, 1, 4])
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .reshape((3, b * heads, n, hd))
                        .unwrap();
                    let scale = 1.0 / (hd as f64).sqrt();
                    let o = attention_reference(
                        &parts.get(0).unwrap(),
                        &parts.get(1).unwrap(),
                        &parts.get(2).unwrap(),
                        scale,
                    )
                    .unwrap();
                    o.reshape((b, heads, n, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .reshape((b, n, d))
                        .unwrap()
                });
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
                assert!(rel_diff(&o1, &o2) < tol, "{b} {n} {heads} {hd} {dtype:?}");
                assert_eq!(g1.dims(), &[b, n, 3 * d]);
                assert!(
                    rel_diff(&g1, &g2) < tol,
                    "{b} {n} {heads} {hd} {dtype:?} gradient"
                );
            }
        }
        let bad = filled(&[2, 3, 10], 0, DType::F32, 1.0);
        assert!(token_self_attention(&bad, 2).is_err());
        assert!(token_self_attention(&filled(&[2, 3], 0, DType::F32, 1.0), 1).is_err());
    }

    #[test]
    fn token_self_attention_is_bit_identical_for_any_thread_count() {
        let qkv = filled(&[6, 70, 48], 4, DType::F32, 1.0);
        let probe = filled(&[6, 70, 16], 5, DType::F32, 1.0);
        assert_same_for_any_thread_count(|| {
            let v = Var::from_tensor(&qkv).unwrap();
            let out = token_self_attention(v.as_tensor(), 2).unwrap();
            let g = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            flat::<f32>(&[&out, g.get(v.as_tensor()).unwrap()])
        });
    }
}
