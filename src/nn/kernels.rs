//! CPU kernels behind the network layers, as candle custom ops with their own backward.
//!
//! `conv2d`: candle 0.11's CPU convolution rearranges its input single-threaded before the
//! matrix multiply, and computes the input gradient with a plain loop (`conv_transpose2d`) with
//! no matrix-multiply path. Here every pass is an im2col / col2im around one `gemm` call per
//! batch item, with batch items spread over rayon's threads:
//!
//! - forward: out_b [Cout, HoWo] = W [Cout, Cin·k·k] · cols_b [Cin·k·k, HoWo];
//! - input gradient: cols_b = Wᵀ · g_b, scattered back by col2im (skipped when the input needs
//!   no gradient, e.g. the network's input image);
//! - weight gradient: Σ_b g_b · cols_bᵀ, summed over a fixed partition of the batch so the
//!   result does not depend on the thread count.
//!
//! f32 and f64 (the gradient checks run in f64); other devices fall back to candle's op.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

pub(super) fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// The element types the kernels run on.
pub trait Elem: Copy + Send + Sync + 'static + std::ops::AddAssign {
    const ZERO: Self;
    const ONE: Self;
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// e^x, vectorisable for f32 ([`crate::kernels::simd::exp_f32`]); f64 (the gradient checks) uses
    /// the exact `exp`.
    fn fast_exp(self) -> Self;
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        crate::kernels::simd::exp_f32(self)
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// dst [m, n] (row-major) = (accumulate ? dst : 0) + lhs · rhs, with lhs and rhs given by
/// (column stride, row stride) so that transposed views cost nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (isize, isize),
    rhs: &[T],
    rhs_strides: (isize, isize),
) {
    matmul_strided(
        m,
        n,
        k,
        dst,
        n,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
    )
}

/// As [`matmul`] into rows `dst_rs` apart: dst is a block of a wider row-major matrix.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_strided<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (isize, isize),
    rhs: &[T],
    rhs_strides: (isize, isize),
) {
    debug_assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the slices cover every element the strides address (checked by the callers'
    // shapes: lhs is m x k, rhs k x n, dst m x n with rows dst_rs apart), and dst does not alias
    // lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.0,
            lhs_strides.1,
            rhs.as_ptr(),
            rhs_strides.0,
            rhs_strides.1,
            if accumulate { T::ONE } else { T::ZERO },
            T::ONE,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Shapes of one convolution: x [b, cin, h, w], weight [cout, cin, k, k], out [b, cout, ho, wo].
#[derive(Clone, Copy, Debug, PartialEq)]
struct Geom {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> CResult<Self> {
        let (&[b, cin, h, wd], &[cout, wcin, k, k2]) = (x, w) else {
            return Err(msg(format!(
                "conv2d: x must be [B, C, H, W] and the weight [Cout, C, k, k], got {x:?} and {w:?}"
            )));
        };
        if wcin != cin || k != k2 || k == 0 || stride == 0 {
            return Err(msg(format!(
                "conv2d: weight {w:?} does not fit input {x:?} (stride {stride})"
            )));
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            return Err(msg(format!(
                "conv2d: a {k}x{k} kernel does not fit a {h}x{wd} input with padding {pad}"
            )));
        }
        Ok(Geom {
            b,
            cin,
            h,
            w: wd,
            cout,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (wd + 2 * pad - k) / stride + 1,
        })
    }

    fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }

    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }

    fn x_item(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn out_item(&self) -> usize {
        self.cout * self.hw_out()
    }

    #[inline]
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.pad)
            .filter(|&i| i < self.h)
    }
}

/// The output columns `ox` whose input column `ox·stride + kx − pad` lies inside the image, as
/// a range: outside it the window reads the zero padding.
#[inline]
fn valid_cols(g: &Geom, kx: usize) -> std::ops::Range<usize> {
    // ox·s + kx ≥ pad  ⇔  ox ≥ ceil((pad − kx) / s);  ox·s + kx − pad < w  ⇔  ox·s < w + pad − kx.
    let lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(g.wo);
    let hi = (g.w + g.pad)
        .saturating_sub(kx)
        .div_ceil(g.stride)
        .min(g.wo);
    lo..hi.max(lo)
}

/// cols [Cin·k·k, Ho·Wo] of one item x [Cin, H, W] (zeros where the window leaves the image).
fn im2col<T: Elem>(g: &Geom, x: &[T], cols: &mut [T]) {
    if g.stride == 1 && g.wo == g.w && g.ho == g.h {
        im2col_same(g, x, cols)
    } else {
        im2col_general(g, x, cols)
    }
}

/// Any stride and padding: each output row is one contiguous copy for stride 1 (a strided
/// gather otherwise) between two zero fills.
fn im2col_general<T: Elem>(g: &Geom, x: &[T], cols: &mut [T]) {
    let hw = g.hw_out();
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let valid = valid_cols(g, kx);
                let row = &mut cols[((c * g.k + ky) * g.k + kx) * hw..][..hw];
                for oy in 0..g.ho {
                    let dst = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    let Some(iy) = g.in_row(oy, ky) else {
                        dst.fill(T::ZERO);
                        continue;
                    };
                    dst[..valid.start].fill(T::ZERO);
                    dst[valid.end..].fill(T::ZERO);
                    if valid.is_empty() {
                        continue;
                    }
                    let first = valid.start * g.stride + kx - g.pad;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let inside = &mut dst[valid.clone()];
                    if g.stride == 1 {
                        inside.copy_from_slice(&src[first..first + inside.len()]);
                    } else {
                        for (j, d) in inside.iter_mut().enumerate() {
                            *d = src[first + j * g.stride];
                        }
                    }
                }
            }
        }
    }
}

/// im2col for stride 1 and "same" padding (the U-Net's 3x3 and 1x1 convolutions). Each
/// channel is copied once into a zero-bordered plane; a tap's rows are then plain copies out of
/// it, with no per-row bounds or padding logic (which dominated on 8x8 and 4x4 images). A 1x1
/// kernel's columns are the image itself.
fn im2col_same<T: Elem>(g: &Geom, x: &[T], cols: &mut [T]) {
    let (h, w, p, k) = (g.h, g.w, g.pad, g.k);
    let hw = h * w;
    if k == 1 {
        cols[..g.cin * hw].copy_from_slice(&x[..g.cin * hw]);
        return;
    }
    let pw = w + 2 * p;
    // The border stays zero: only the interior is overwritten, channel after channel.
    let mut padded = vec![T::ZERO; (h + 2 * p) * pw];
    for (c, plane) in x.chunks_exact(hw).take(g.cin).enumerate() {
        for (iy, src) in plane.chunks_exact(w).enumerate() {
            padded[(iy + p) * pw + p..][..w].copy_from_slice(src);
        }
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((c * k + ky) * k + kx) * hw..][..hw];
                for (oy, dst) in row.chunks_exact_mut(w).enumerate() {
                    let src = &padded[(oy + ky) * pw + kx..][..w];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// Adds cols [Cin·k·k, Ho·Wo] back into the item gradient gx [Cin, H, W] (im2col's adjoint).
/// `gx` must start at zero.
fn col2im<T: Elem>(g: &Geom, cols: &[T], gx: &mut [T]) {
    let hw = g.hw_out();
    for c in 0..g.cin {
        let plane = &mut gx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let valid = valid_cols(g, kx);
                if valid.is_empty() {
                    continue;
                }
                let first = valid.start * g.stride + kx - g.pad;
                let row = &cols[((c * g.k + ky) * g.k + kx) * hw..][..hw];
                for oy in 0..g.ho {
                    let Some(iy) = g.in_row(oy, ky) else { continue };
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    let src = &row[oy * g.wo + valid.start..oy * g.wo + valid.end];
                    if g.stride == 1 {
                        for (d, &v) in dst[first..first + src.len()].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (j, &v) in src.iter().enumerate() {
                            dst[first + j * g.stride] += v;
                        }
                    }
                }
            }
        }
    }
}

/// out = conv(x, w) + bias (per output channel), or no bias.
fn conv_forward<T: Elem>(g: &Geom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let mut out = vec![T::ZERO; g.b * g.out_item()];
    out.par_chunks_mut(g.out_item())
        .zip(x.par_chunks(g.x_item()))
        .for_each_init(
            || vec![T::ZERO; ckk * hw],
            |cols, (o, xb)| {
                im2col(g, xb, cols);
                // The bias first, then the product accumulated onto it.
                if let Some(bias) = bias {
                    for (row, &bc) in o.chunks_mut(hw).zip(bias) {
                        row.fill(bc);
                    }
                }
                matmul(
                    g.cout,
                    hw,
                    ckk,
                    o,
                    bias.is_some(),
                    w,
                    (1, ckk as isize),
                    cols,
                    (1, hw as isize),
                );
            },
        );
    out
}

fn conv_input_grad<T: Elem>(g: &Geom, grad: &[T], w: &[T]) -> Vec<T> {
    if g.stride == 1 && 2 * g.pad + 1 == g.k {
        return same_conv_input_grad(g, grad, w);
    }
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let mut gx = vec![T::ZERO; g.b * g.x_item()];
    gx.par_chunks_mut(g.x_item())
        .zip(grad.par_chunks(g.out_item()))
        .for_each_init(
            || vec![T::ZERO; ckk * hw],
            |cols, (gxb, gb)| {
                // cols = Wᵀ [ckk, cout] · g_b [cout, hw]
                matmul(
                    ckk,
                    hw,
                    g.cout,
                    cols,
                    false,
                    w,
                    (ckk as isize, 1),
                    gb,
                    (1, hw as isize),
                );
                col2im(g, cols, gxb);
            },
        );
    gx
}

/// The input gradient of a stride-1 "same" convolution (the U-Net's 3x3 and 1x1 convs) is
/// itself a same convolution: of the output gradient, with the weight's channel axes swapped
/// and its taps flipped, W'[ci, co, ky, kx] = W[co, ci, k−1−ky, k−1−kx]. That runs as a
/// forward pass (block-copy im2col, then one gemm per item writing gx directly) instead of a
/// gemm followed by col2im's scattered adds over short rows.
fn same_conv_input_grad<T: Elem>(g: &Geom, grad: &[T], w: &[T]) -> Vec<T> {
    let k = g.k;
    let mut flipped = vec![T::ZERO; w.len()];
    for co in 0..g.cout {
        for ci in 0..g.cin {
            let src = &w[(co * g.cin + ci) * k * k..][..k * k];
            let dst = &mut flipped[(ci * g.cout + co) * k * k..][..k * k];
            for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                *d = v;
            }
        }
    }
    let adjoint = Geom {
        cin: g.cout,
        cout: g.cin,
        ..*g
    };
    conv_forward(&adjoint, grad, &flipped, None)
}

/// Batch items per partial sum of the weight gradient: fixed, so the summation order (and the
/// result, bit for bit) is the same for every thread count.
const WEIGHT_GRAD_CHUNK: usize = 4;

/// Packed [weight gradient (Cout·Cin·k·k) | bias gradient (Cout)].
///
/// Each partial sum is accumulated transposed, [Cin·k·k, Cout] += cols_b · g_bᵀ: gemm packs
/// that operand order 1.2-1.7x faster than g_b · cols_bᵀ on these shapes (`cargo run --release
/// --example bench_gemm`). The total is transposed back once at the end.
fn conv_weight_grad<T: Elem>(g: &Geom, x: &[T], grad: &[T]) -> Vec<T> {
    let (ckk, hw) = (g.ckk(), g.hw_out());
    let partials: Vec<Vec<T>> = x
        .par_chunks(g.x_item() * WEIGHT_GRAD_CHUNK)
        .zip(grad.par_chunks(g.out_item() * WEIGHT_GRAD_CHUNK))
        .map(|(xs, gs)| {
            let mut acc = vec![T::ZERO; ckk * g.cout + g.cout];
            let mut cols = vec![T::ZERO; ckk * hw];
            for (i, (xb, gb)) in xs
                .chunks(g.x_item())
                .zip(gs.chunks(g.out_item()))
                .enumerate()
            {
                im2col(g, xb, &mut cols);
                // acc [ckk, cout] += cols_b [ckk, hw] · g_bᵀ [hw, cout]
                matmul(
                    ckk,
                    g.cout,
                    hw,
                    &mut acc,
                    i > 0,
                    &cols,
                    (1, hw as isize),
                    gb,
                    (hw as isize, 1),
                );
                for (b, row) in acc[g.cout * ckk..].iter_mut().zip(gb.chunks(hw)) {
                    for &v in row {
                        *b += v;
                    }
                }
            }
            acc
        })
        .collect();
    let mut sum = vec![T::ZERO; ckk * g.cout + g.cout];
    for p in &partials {
        for (t, &v) in sum.iter_mut().zip(p) {
            *t += v;
        }
    }
    let mut total = vec![T::ZERO; g.cout * ckk + g.cout];
    for (j, row) in sum[..ckk * g.cout].chunks_exact(g.cout).enumerate() {
        for (co, &v) in row.iter().enumerate() {
            total[co * ckk + j] = v;
        }
    }
    total[g.cout * ckk..].copy_from_slice(&sum[ckk * g.cout..]);
    total
}

pub(super) fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(msg("kernel inputs must be contiguous")),
    }
}

/// Runs `f` on two f32 or two f64 storages.
fn dispatch(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_fn: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> CResult<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            Ok(f32::storage(f32_fn(contiguous(a, l1)?, contiguous(b, l2)?)))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            Ok(f64::storage(f64_fn(contiguous(a, l1)?, contiguous(b, l2)?)))
        }
        _ => Err(msg("conv2d kernel: both operands must be f32 or both f64")),
    }
}

/// Which of the three passes of a convolution an op computes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    /// (x, weight) -> out; differentiable.
    Forward,
    /// (grad_out, weight) -> grad_x.
    InputGrad,
    /// (x, grad_out) -> grad_weight.
    WeightGrad,
}

struct ConvOp {
    g: Geom,
    pass: Pass,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "ferrodiff-conv2d",
            Pass::InputGrad => "ferrodiff-conv2d-input-grad",
            Pass::WeightGrad => "ferrodiff-conv2d-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let g = &self.g;
        let (out, shape) = match self.pass {
            Pass::Forward => return Err(msg("conv2d kernel: the forward takes three operands")),
            Pass::InputGrad => (
                dispatch(
                    s1,
                    l1,
                    s2,
                    l2,
                    |a, b| conv_input_grad(g, a, b),
                    |a, b| conv_input_grad(g, a, b),
                )?,
                (g.b, g.cin, g.h, g.w),
            ),
            Pass::WeightGrad => (
                dispatch(
                    s1,
                    l1,
                    s2,
                    l2,
                    |a, b| conv_weight_grad(g, a, b),
                    |a, b| conv_weight_grad(g, a, b),
                )?,
                (g.cout * g.ckk() + g.cout, 1, 1, 1),
            ),
        };
        Ok((out, Shape::from(shape)))
    }
}

/// The forward, (x, weight, bias) -> out, differentiable in all three.
impl CustomOp3 for ConvOp {
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
        let g = &self.g;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                f32::storage(conv_forward(
                    g,
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    Some(contiguous(b, l3)?),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                f64::storage(conv_forward(
                    g,
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    Some(contiguous(b, l3)?),
                ))
            }
            _ => return Err(msg("conv2d kernel: operands must be all f32 or all f64")),
        };
        Ok((out, Shape::from((g.b, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let grad = grad.contiguous()?;
        let op = |pass| ConvOp { g, pass };
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &op(Pass::InputGrad))?)
        } else {
            None
        };
        let packed = x
            .apply_op2_no_bwd(&grad, &op(Pass::WeightGrad))?
            .flatten_all()?;
        let nw = g.cout * g.ckk();
        let gw = packed.narrow(0, 0, nw)?.reshape(w.shape())?;
        let gb = packed.narrow(0, nw, g.cout)?;
        Ok((gx, Some(gw), Some(gb)))
    }
}

/// `FERRODIFF_REFERENCE_KERNELS=1` runs candle's own ops instead of these kernels (for
/// benchmarks that measure what the kernels buy, and for bisecting).
pub fn reference_kernels() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| {
        std::env::var("FERRODIFF_REFERENCE_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether the fused kernels run on `x`: f32 or f64 on the CPU, and not switched off by
/// `FERRODIFF_REFERENCE_KERNELS`. Otherwise each kernel falls back to candle's ops.
pub(super) fn use_kernel(x: &Tensor) -> bool {
    !reference_kernels()
        && x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// 2-D convolution (no bias) of x [B, Cin, H, W] with weight [Cout, Cin, k, k], zero padding
/// `pad` and `stride`, differentiable in both arguments. CPU tensors run ferrodiff's kernel,
/// others candle's `conv2d`.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> CResult<Tensor> {
    let zeros = Tensor::zeros(weight.dims()[0], weight.dtype(), weight.device())?;
    conv2d_bias(x, weight, &zeros, stride, pad)
}

/// conv2d(x, weight) + bias [Cout] per output channel, differentiable in all three. The kernel
/// starts each output row at its bias and sums the bias gradient in the weight-gradient pass,
/// which saves a broadcast add and a strided reduction per convolution.
pub fn conv2d_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: usize,
) -> CResult<Tensor> {
    let cout = weight.dims().first().copied().unwrap_or(0);
    if bias.dims() != [cout] {
        return Err(msg(format!(
            "conv2d: the bias must be [{cout}] for weight {:?}, got {:?}",
            weight.dims(),
            bias.dims()
        )));
    }
    if !use_kernel(x) {
        return x
            .conv2d(weight, pad, stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, cout, 1, 1))?);
    }
    let g = Geom::new(x.dims(), weight.dims(), stride, pad)?;
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        ConvOp {
            g,
            pass: Pass::Forward,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_same_for_any_thread_count, filled, flat, max_diff};
    use candle_core::{DType, Device, Var};

    /// (b, cin, h, w, cout, k, stride, pad)
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const CASES: [Case; 9] = [
        // (b, cin, h, w, cout, k, stride, pad)
        (1, 1, 5, 5, 1, 3, 1, 1),
        (2, 2, 7, 9, 3, 5, 2, 2),
        (2, 1, 3, 4, 2, 3, 1, 2),
        (2, 3, 7, 6, 4, 3, 1, 1),
        (3, 2, 9, 9, 5, 3, 2, 1),
        (5, 4, 8, 8, 3, 1, 1, 0),
        (2, 3, 6, 7, 2, 3, 2, 0),
        (9, 2, 4, 4, 6, 3, 1, 1),
        (2, 2, 1, 3, 2, 5, 1, 2),
    ];

    fn out_side(n: usize, k: usize, stride: usize, pad: usize) -> usize {
        (n + 2 * pad - k) / stride + 1
    }

    /// Values and both gradients against candle's conv2d on shapes with odd sizes, strides,
    /// paddings, 1x1 kernels and batch 1. Where candle's own backward fails (its
    /// conv_transpose2d gives the wrong input-gradient shape for a stride-2 conv of an odd-width
    /// input without padding), the finite-difference test below is the reference.
    #[test]
    fn matches_candle_values_and_gradients() {
        let mut compared = 0;
        for (i, &(b, cin, h, w, cout, k, stride, pad)) in CASES.iter().enumerate() {
            let x = Var::from_tensor(&filled(&[b, cin, h, w], i, DType::F64)).unwrap();
            let wt = Var::from_tensor(&filled(&[cout, cin, k, k], i + 50, DType::F64)).unwrap();
            let oshape = [
                b,
                cout,
                out_side(h, k, stride, pad),
                out_side(w, k, stride, pad),
            ];
            let probe = filled(&oshape, i + 99, DType::F64);
            let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_diff(&ours, &theirs) < 1e-12, "case {i}: values");
            let g1 = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let Ok(g2) = (theirs * &probe).unwrap().sum_all().unwrap().backward() else {
                continue;
            };
            for (name, v) in [("x", &x), ("weight", &wt)] {
                let a = g1.get(v.as_tensor()).unwrap();
                let c = g2.get(v.as_tensor()).unwrap();
                assert!(max_diff(a, c) < 1e-11, "case {i}: gradient of {name}");
            }
            compared += 1;
        }
        assert!(
            compared >= 5,
            "candle's backward ran on only {compared} cases"
        );
    }

    /// Central finite differences of Σ probe · conv(x, w) for a few entries of x and w, on every
    /// shape above.
    #[test]
    fn gradients_match_finite_differences() {
        for (case, &(b, cin, h, w, cout, k, stride, pad)) in CASES.iter().enumerate() {
            let xv = filled(&[b, cin, h, w], case + 3, DType::F64);
            let wv = filled(&[cout, cin, k, k], case + 4, DType::F64);
            let oshape = [
                b,
                cout,
                out_side(h, k, stride, pad),
                out_side(w, k, stride, pad),
            ];
            let probe = filled(&oshape, case + 5, DType::F64);
            let loss = |x: &Tensor, wt: &Tensor| -> f64 {
                (conv2d(x, wt, stride, pad).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let x = Var::from_tensor(&xv).unwrap();
            let wt = Var::from_tensor(&wv).unwrap();
            let grads = (conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let eps = 1e-6;
            for (which, base) in [(0, &xv), (1, &wv)] {
                let var = if which == 0 { &x } else { &wt };
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
                for &i in &[0, flat.len() / 3, flat.len() / 2 + 1, flat.len() - 1] {
                    let bump = |d: f64| {
                        let mut p = flat.clone();
                        p[i] += d;
                        let t = Tensor::from_vec(p, base.dims(), &Device::Cpu).unwrap();
                        if which == 0 {
                            loss(&t, &wv)
                        } else {
                            loss(&xv, &t)
                        }
                    };
                    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    assert!(
                        (fd - g[i]).abs() < 1e-6,
                        "case {case}, {}[{i}]: {fd} vs {}",
                        ["x", "weight"][which],
                        g[i]
                    );
                }
            }
        }
    }

    #[test]
    fn f32_matches_f64_and_skips_the_gradient_of_untracked_inputs() {
        let x = filled(&[4, 3, 10, 10], 1, DType::F32);
        let w = Var::from_tensor(&filled(&[8, 3, 3, 3], 2, DType::F32)).unwrap();
        let y = conv2d(&x, w.as_tensor(), 1, 1).unwrap();
        let y64 = conv2d(
            &x.to_dtype(DType::F64).unwrap(),
            &w.as_tensor().to_dtype(DType::F64).unwrap(),
            1,
            1,
        )
        .unwrap();
        assert!(max_diff(&y.to_dtype(DType::F64).unwrap(), &y64) < 1e-4);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none(), "a plain input gets no gradient");
        assert!(grads.get(w.as_tensor()).is_some());
    }

    #[test]
    fn weight_gradient_is_bit_identical_for_any_thread_count() {
        let x = filled(&[11, 3, 6, 6], 6, DType::F32);
        let w = Var::from_tensor(&filled(&[4, 3, 3, 3], 7, DType::F32)).unwrap();
        assert_same_for_any_thread_count(|| {
            let y = conv2d(&x, w.as_tensor(), 1, 1).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            flat::<f32>(&[g.get(w.as_tensor()).unwrap()])
        });
    }

    /// The fused bias: values and all three gradients against candle's conv2d + broadcast add.
    #[test]
    fn bias_is_added_and_differentiated_like_a_broadcast_add() {
        for (case, &(b, cin, h, w, cout, k, stride, pad)) in CASES.iter().enumerate() {
            let xv = Var::from_tensor(&filled(&[b, cin, h, w], case, DType::F64)).unwrap();
            let wv = Var::from_tensor(&filled(&[cout, cin, k, k], case + 1, DType::F64)).unwrap();
            let bv = Var::from_tensor(&filled(&[cout], case + 2, DType::F64)).unwrap();
            let (x, wt, bias) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
            let ours = conv2d_bias(x, wt, bias, stride, pad).unwrap();
            // candle's backward is wrong for some of these shapes (see above): the reference
            // output is ours without the bias, the bias part is a plain broadcast add.
            let reference = conv2d(x, wt, stride, pad)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-12, "case {case}");
            let probe = filled(ours.dims(), case + 3, DType::F64);
            let grads = |y: &Tensor| {
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                [x, wt, bias].map(|t| g.get(t).unwrap().clone())
            };
            for (i, (o, r)) in grads(&ours).iter().zip(&grads(&reference)).enumerate() {
                assert!(max_diff(o, r) < 1e-10, "case {case}, gradient {i}");
            }
        }
        let x = filled(&[1, 2, 4, 4], 0, DType::F32);
        let wt = filled(&[3, 2, 3, 3], 0, DType::F32);
        assert!(conv2d_bias(&x, &wt, &filled(&[2], 0, DType::F32), 1, 1).is_err());
    }

    #[test]
    fn same_padding_im2col_equals_the_general_one() {
        for (h, w, k, cin) in [
            (8, 8, 3, 2),
            (1, 3, 5, 1),
            (4, 1, 3, 3),
            (5, 7, 5, 2),
            (2, 2, 1, 1),
        ] {
            let g = Geom::new(&[1, cin, h, w], &[1, cin, k, k], 1, k / 2).unwrap();
            let x: Vec<f64> = (0..cin * h * w).map(|i| i as f64 + 1.0).collect();
            let (mut a, mut b) = (
                vec![-1.0; g.ckk() * g.hw_out()],
                vec![-2.0; g.ckk() * g.hw_out()],
            );
            im2col_same(&g, &x, &mut a);
            im2col_general(&g, &x, &mut b);
            assert_eq!(a, b, "{h}x{w}, k {k}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = filled(&[1, 2, 4, 4], 0, DType::F32);
        assert!(conv2d(&x, &filled(&[3, 5, 3, 3], 0, DType::F32), 1, 1).is_err());
        assert!(conv2d(&x, &filled(&[3, 2, 7, 7], 0, DType::F32), 1, 0).is_err());
    }
}
