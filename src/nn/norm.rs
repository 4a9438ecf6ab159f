//! Fused GroupNorm kernel: y = act(GroupNorm(x) · a + d) in one pass over x, with its backward
//! in two, as a candle custom op.
//!
//! From candle's elementwise ops a GroupNorm is about ten full passes (mean, centring, square,
//! variance, division, affine, then the scale-shift conditioning and the SiLU), each allocating
//! its output and each with a backward of its own. Here the per-(item, channel) factors `a`, `d`
//! [B, C] carry everything affine: `a = γ (1 + scale)`, `d = β (1 + scale) + shift` for AdaGN,
//! `a = γ`, `d = β` (broadcast over the batch) for a plain GroupNorm. They are small, so they are
//! built from ordinary candle ops whose gradients autodiff already knows; the kernel returns the
//! gradients with respect to x, a and d.
//!
//! Work is split over (item, group) pairs with rayon; each pair's statistics are accumulated in
//! f64 and its outputs written by one thread, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::kernels::{msg, use_kernel, Elem};

type CResult<T> = candle_core::Result<T>;

/// The activation applied after the affine step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Identity,
    Silu,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    c: usize,
    /// Spatial size per channel (H·W; 1 for [B, C] inputs).
    s: usize,
    groups: usize,
}

impl Dims {
    fn new(x: &[usize], groups: usize) -> CResult<Self> {
        if x.len() < 2 {
            return Err(msg(format!("group_norm: x must be [B, C, ...], got {x:?}")));
        }
        let (b, c) = (x[0], x[1]);
        if groups == 0 || !c.is_multiple_of(groups) {
            return Err(msg(format!(
                "group_norm: {c} channels are not divisible into {groups} groups"
            )));
        }
        Ok(Dims {
            b,
            c,
            s: x[2..].iter().product(),
            groups,
        })
    }

    /// Elements of one (item, group) pair.
    fn group_len(&self) -> usize {
        self.c / self.groups * self.s
    }

    fn len(&self) -> usize {
        self.b * self.c * self.s
    }
}

/// Mean and 1/√(var + ε) of one group's elements (two passes in f64).
fn stats<T: Elem + Float>(xs: &[T], eps: f64) -> (T, T) {
    let (mean, rstd) = stats64(xs, eps);
    (
        T::from(mean).unwrap_or(T::ZERO),
        T::from(rstd).unwrap_or(T::ZERO),
    )
}

fn stats64<T: Elem + Float>(xs: &[T], eps: f64) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|v| v.to_f64().unwrap_or(0.0)).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|v| {
            let d = v.to_f64().unwrap_or(0.0) - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline]
fn sigmoid<T: Float>(z: T) -> T {
    T::one() / (T::one() + (-z).exp())
}

#[derive(Clone, Copy, Debug)]
enum Pass {
    /// (x, a, d) -> y.
    Forward,
    /// (x, ad = [a; d] as [2, B, C], gy) -> packed [gx | ga | gd].
    Backward,
}

struct GroupNormOp {
    dims: Dims,
    eps: f64,
    act: Act,
    pass: Pass,
}

fn forward<T: Elem + Float>(dm: &Dims, eps: f64, act: Act, x: &[T], a: &[T], d: &[T]) -> Vec<T> {
    let (gl, cg, s) = (dm.group_len(), dm.c / dm.groups, dm.s);
    let mut y = vec![T::ZERO; dm.len()];
    y.par_chunks_mut(gl)
        .zip(x.par_chunks(gl))
        .enumerate()
        .for_each(|(unit, (yg, xg))| {
            let (mean, rstd) = stats(xg, eps);
            // Channel `unit·cg + j` of the flattened [B·C] factors.
            for j in 0..cg {
                let bc = unit * cg + j;
                // (x − mean) first: folding the mean into the offset would cancel badly when
                // the variance is tiny and rstd large.
                let (scale, offset) = (a[bc] * rstd, d[bc]);
                let (ys, xs) = (&mut yg[j * s..(j + 1) * s], &xg[j * s..(j + 1) * s]);
                match act {
                    Act::Identity => {
                        for (o, &v) in ys.iter_mut().zip(xs) {
                            *o = (v - mean) * scale + offset;
                        }
                    }
                    Act::Silu => {
                        for (o, &v) in ys.iter_mut().zip(xs) {
                            let z = (v - mean) * scale + offset;
                            *o = z * sigmoid(z);
                        }
                    }
                }
            }
        });
    y
}

/// Packed [gx (B·C·S) | ga (B·C) | gd (B·C)].
fn backward<T: Elem + Float>(
    dm: &Dims,
    eps: f64,
    act: Act,
    x: &[T],
    a: &[T],
    d: &[T],
    gy: &[T],
) -> Vec<T> {
    let (gl, cg, s) = (dm.group_len(), dm.c / dm.groups, dm.s);
    let bc = dm.b * dm.c;
    let mut out = vec![T::ZERO; dm.len() + 2 * bc];
    let (gx, gad) = out.split_at_mut(dm.len());
    let (ga, gd) = gad.split_at_mut(bc);
    gx.par_chunks_mut(gl)
        .zip(ga.par_chunks_mut(cg))
        .zip(gd.par_chunks_mut(cg))
        .enumerate()
        .for_each_init(
            || vec![0f64; gl],
            |gxhat, (unit, ((gxg, gag), gdg))| {
                let xg = &x[unit * gl..(unit + 1) * gl];
                let gyg = &gy[unit * gl..(unit + 1) * gl];
                let (mean, rstd) = stats(xg, eps);
                let (mean64, rstd64) = stats64(xg, eps);
                // First pass: ∂L/∂x̂ (kept in f64), the per-channel sums for ga and gd, and the
                // group sums Σ ∂L/∂x̂ and Σ ∂L/∂x̂ · x̂ that the normalisation's backward needs.
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for j in 0..cg {
                    let ch = unit * cg + j;
                    let (aj, dj) = (a[ch], d[ch]);
                    let a64 = aj.to_f64().unwrap_or(0.0);
                    let (mut acc_a, mut acc_d) = (0f64, 0f64);
                    let range = j * s..(j + 1) * s;
                    for ((o, &v), &g) in gxhat[range.clone()]
                        .iter_mut()
                        .zip(&xg[range.clone()])
                        .zip(&gyg[range])
                    {
                        let xhat = (v - mean) * rstd;
                        let gz = match act {
                            Act::Identity => g,
                            Act::Silu => {
                                let z = xhat * aj + dj;
                                let sg = sigmoid(z);
                                g * sg * (T::one() + z * (T::one() - sg))
                            }
                        };
                        let gz = gz.to_f64().unwrap_or(0.0);
                        let xhat = (v.to_f64().unwrap_or(0.0) - mean64) * rstd64;
                        acc_a += gz * xhat;
                        acc_d += gz;
                        *o = gz * a64;
                        sum_g += *o;
                        sum_gx += *o * xhat;
                    }
                    gag[j] = T::from(acc_a).unwrap_or(T::ZERO);
                    gdg[j] = T::from(acc_d).unwrap_or(T::ZERO);
                }
                // Second pass, in f64 (the three terms nearly cancel when a group is small):
                // gx = rstd · (∂L/∂x̂ − mean(∂L/∂x̂) − x̂ · mean(∂L/∂x̂ · x̂)).
                let n = gl as f64;
                let (m1, m2) = (sum_g / n, sum_gx / n);
                for ((o, &v), &gh) in gxg.iter_mut().zip(xg).zip(gxhat.iter()) {
                    let xhat = (v.to_f64().unwrap_or(0.0) - mean64) * rstd64;
                    *o = T::from(rstd64 * (gh - m1 - xhat * m2)).unwrap_or(T::ZERO);
                }
            },
        );
    out
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(&s.as_slice::<T>()?[lo..hi]),
        None => Err(msg("group_norm: inputs must be contiguous")),
    }
}

impl GroupNormOp {
    fn run<T: Elem + Float + candle_core::WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> CResult<(CpuStorage, Shape)> {
        let dm = &self.dims;
        let x = slice::<T>(s1, l1)?;
        let bc = dm.b * dm.c;
        match self.pass {
            Pass::Forward => {
                let (a, d) = (slice::<T>(s2, l2)?, slice::<T>(s3, l3)?);
                let y = forward(dm, self.eps, self.act, x, a, d);
                Ok((T::storage(y), l1.shape().clone()))
            }
            Pass::Backward => {
                let ad = slice::<T>(s2, l2)?;
                let gy = slice::<T>(s3, l3)?;
                let out = backward(dm, self.eps, self.act, x, &ad[..bc], &ad[bc..], gy);
                let n = out.len();
                Ok((T::storage(out), Shape::from(n)))
            }
        }
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "ferrodiff-group-norm",
            Pass::Backward => "ferrodiff-group-norm-backward",
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
            _ => Err(msg("group_norm: the CPU kernel takes f32 or f64")),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        d: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims;
        let bc = dm.b * dm.c;
        let ad = Tensor::cat(&[a.flatten_all()?, d.flatten_all()?], 0)?;
        let packed = x.apply_op3_no_bwd(
            &ad,
            &gy.contiguous()?,
            &GroupNormOp {
                dims: dm,
                eps: self.eps,
                act: self.act,
                pass: Pass::Backward,
            },
        )?;
        let gx = x
            .track_op()
            .then(|| packed.narrow(0, 0, dm.len())?.reshape(x.shape()))
            .transpose()?;
        let ga = packed.narrow(0, dm.len(), bc)?.reshape((dm.b, dm.c))?;
        let gd = packed.narrow(0, dm.len() + bc, bc)?.reshape((dm.b, dm.c))?;
        Ok((gx, Some(ga), Some(gd)))
    }
}

/// act(GroupNorm(x) · a + d) for x [B, C, ...] with `groups` groups and per-(item, channel)
/// factors a, d [B, C]; differentiable in x, a and d. CPU f32/f64 tensors run the fused kernel,
/// others (and `FERRODIFF_REFERENCE_KERNELS=1`) candle's elementwise ops.
pub fn group_norm(
    x: &Tensor,
    a: &Tensor,
    d: &Tensor,
    groups: usize,
    eps: f64,
    act: Act,
) -> CResult<Tensor> {
    let dims = Dims::new(x.dims(), groups)?;
    for (name, t) in [("a", a), ("d", d)] {
        if t.dims() != [dims.b, dims.c] {
            return Err(msg(format!(
                "group_norm: {name} must be [B, C] = [{}, {}], got {:?}",
                dims.b,
                dims.c,
                t.dims()
            )));
        }
    }
    if !use_kernel(x) {
        return group_norm_reference(x, a, d, groups, eps, act);
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &d.contiguous()?,
        GroupNormOp {
            dims,
            eps,
            act,
            pass: Pass::Forward,
        },
    )
}

/// The same from candle's elementwise ops (the reference the kernel is tested against).
pub fn group_norm_reference(
    x: &Tensor,
    a: &Tensor,
    d: &Tensor,
    groups: usize,
    eps: f64,
    act: Act,
) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let g = x.reshape((b, groups, ()))?;
    let mean = g.mean_keepdim(2)?;
    let centred = g.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, ()))?;
    let z = normed
        .broadcast_mul(&a.unsqueeze(2)?)?
        .broadcast_add(&d.unsqueeze(2)?)?
        .reshape(dims)?;
    match act {
        Act::Identity => Ok(z),
        Act::Silu => z.silu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{filled_scaled as filled, with_threads};
    use candle_core::{DType, Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        crate::nn::test_util::max_rel(a, b, 1e-12)
    }

    /// (x shape, groups): odd spatial sizes, one group, one channel per group, batch 1, [B, C].
    const CASES: [(&[usize], usize); 6] = [
        (&[1, 4, 3, 5], 2),
        (&[3, 6, 7, 7], 3),
        (&[2, 8, 1, 1], 8),
        (&[2, 5, 4, 3], 1),
        (&[4, 16, 8, 8], 8),
        (&[3, 4], 2),
    ];

    type Fwd = fn(&Tensor, &Tensor, &Tensor, usize, f64, Act) -> CResult<Tensor>;

    /// Value and the gradients of Σ y · probe with respect to x, a and d.
    fn run(f: Fwd, x: &Tensor, a: &Tensor, d: &Tensor, groups: usize, act: Act) -> Vec<Tensor> {
        let (xv, av, dv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(a).unwrap(),
            Var::from_tensor(d).unwrap(),
        );
        let y = f(
            xv.as_tensor(),
            av.as_tensor(),
            dv.as_tensor(),
            groups,
            1e-5,
            act,
        )
        .unwrap();
        let probe = filled(y.dims(), 9, y.dtype(), 1.0);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vec![
            y,
            g.get(xv.as_tensor()).unwrap().clone(),
            g.get(av.as_tensor()).unwrap().clone(),
            g.get(dv.as_tensor()).unwrap().clone(),
        ]
    }

    /// f64: equal to candle's ops to 1e-10. f32: judged against the f64 reference, no worse
    /// than candle's f32 ops (beyond 2e-5): some cases are ill-conditioned in f32 (two
    /// elements per group give x̂ = ±1 and a near-zero input gradient that is all rounding).
    #[test]
    fn matches_candle_ops_in_values_and_gradients() {
        let f64_of = |ts: Vec<Tensor>| -> Vec<Tensor> {
            ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
        };
        for (case, &(shape, groups)) in CASES.iter().enumerate() {
            let x = filled(shape, case, DType::F64, 3.0);
            let a = filled(&shape[..2], case + 1, DType::F64, 1.5);
            let d = filled(&shape[..2], case + 2, DType::F64, 1.0);
            let x32 = x.to_dtype(DType::F32).unwrap();
            let a32 = a.to_dtype(DType::F32).unwrap();
            let d32 = d.to_dtype(DType::F32).unwrap();
            for act in [Act::Identity, Act::Silu] {
                let reference = run(group_norm_reference, &x, &a, &d, groups, act);
                let ours = run(group_norm, &x, &a, &d, groups, act);
                let ours32 = f64_of(run(group_norm, &x32, &a32, &d32, groups, act));
                let candle32 = f64_of(run(group_norm_reference, &x32, &a32, &d32, groups, act));
                for i in 0..4 {
                    let name = ["y", "gx", "ga", "gd"][i];
                    let e = max_rel(&ours[i], &reference[i]);
                    assert!(
                        e < 1e-10,
                        "f64 case {case} {act:?} {name}: relative error {e}"
                    );
                    let (e32, c32) = (
                        max_rel(&ours32[i], &reference[i]),
                        max_rel(&candle32[i], &reference[i]),
                    );
                    assert!(
                        e32 < 2e-5f64.max(2.0 * c32),
                        "f32 case {case} {act:?} {name}: relative error {e32} (candle's ops: {c32})"
                    );
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (case, &(shape, groups)) in CASES.iter().enumerate().take(4) {
            let x = filled(shape, case + 3, DType::F64, 2.0);
            let a = filled(&shape[..2], case + 4, DType::F64, 1.5);
            let d = filled(&shape[..2], case + 5, DType::F64, 1.0);
            let probe = filled(shape, case + 6, DType::F64, 1.0);
            let loss = |x: &Tensor, a: &Tensor, d: &Tensor| -> f64 {
                (group_norm(x, a, d, groups, 1e-5, Act::Silu).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let grads = {
                let (xv, av, dv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&a).unwrap(),
                    Var::from_tensor(&d).unwrap(),
                );
                let y = group_norm(
                    xv.as_tensor(),
                    av.as_tensor(),
                    dv.as_tensor(),
                    groups,
                    1e-5,
                    Act::Silu,
                )
                .unwrap();
                let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                [xv, av, dv].map(|v| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                })
            };
            let bases = [&x, &a, &d];
            for which in 0..3 {
                let flat: Vec<f64> = bases[which].flatten_all().unwrap().to_vec1().unwrap();
                for &i in &[0, flat.len() / 2, flat.len() - 1] {
                    let bump = |delta: f64| {
                        let mut p = flat.clone();
                        p[i] += delta;
                        let t = Tensor::from_vec(p, bases[which].dims(), &Device::Cpu).unwrap();
                        let mut args = bases.map(|b| b.clone());
                        args[which] = t;
                        loss(&args[0], &args[1], &args[2])
                    };
                    let eps = 1e-6;
                    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                    let g = grads[which][i];
                    assert!(
                        (fd - g).abs() < 1e-6 * (1.0 + g.abs()),
                        "case {case}, {}[{i}]: {fd} vs {g}",
                        ["x", "a", "d"][which]
                    );
                }
            }
        }
    }

    #[test]
    fn results_are_bit_identical_for_any_thread_count() {
        let x = filled(&[5, 8, 6, 6], 1, DType::F32, 2.0);
        let a = filled(&[5, 8], 2, DType::F32, 1.0);
        let d = filled(&[5, 8], 3, DType::F32, 1.0);
        let with = |threads: usize| -> Vec<Vec<f32>> {
            with_threads(threads, || {
                run(group_norm, &x, &a, &d, 4, Act::Silu)
                    .iter()
                    .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                    .collect()
            })
        };
        let one = with(1);
        assert_eq!(one, with(2));
        assert_eq!(one, with(3));
    }

    #[test]
    fn constant_groups_and_large_offsets_stay_finite() {
        // A constant group has zero variance: x̂ = 0 and the output is act(d), with no NaN.
        let x = Tensor::full(3.0f32, (2, 4, 3, 3), &Device::Cpu).unwrap();
        let a = filled(&[2, 4], 1, DType::F32, 1.0);
        let d = filled(&[2, 4], 2, DType::F32, 1.0);
        let out = run(group_norm, &x, &a, &d, 2, Act::Silu);
        for t in &out {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
        // Large values: SiLU saturates without overflow.
        let x = filled(&[2, 4, 3, 3], 3, DType::F32, 1e4);
        let a = filled(&[2, 4], 1, DType::F32, 100.0);
        let ours = run(group_norm, &x, &a, &d, 2, Act::Silu);
        let reference = run(group_norm_reference, &x, &a, &d, 2, Act::Silu);
        for (o, r) in ours.iter().zip(&reference) {
            assert!(max_rel(o, r) < 1e-4);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = filled(&[2, 6, 3, 3], 0, DType::F32, 1.0);
        let ok = filled(&[2, 6], 0, DType::F32, 1.0);
        assert!(group_norm(&x, &ok, &ok, 4, 1e-5, Act::Silu).is_err());
        assert!(group_norm(
            &x,
            &filled(&[1, 6], 0, DType::F32, 1.0),
            &ok,
            3,
            1e-5,
            Act::Silu
        )
        .is_err());
        assert!(group_norm(
            &filled(&[6], 0, DType::F32, 1.0),
            &ok,
            &ok,
            3,
            1e-5,
            Act::Silu
        )
        .is_err());
    }
}
