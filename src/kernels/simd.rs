//! What the elementwise kernels need to use the CPU's vector units: an `exp` that vectorises,
//! and AVX2 + FMA builds of the hot loops chosen at run time.
//!
//! The crate is compiled for the x86-64 baseline (SSE2, 4 lanes) so the wheel runs on any
//! x86-64 machine. [`avx2_twin!`] gives a kernel a second build with AVX2 and FMA enabled (8
//! lanes) that is called when the CPU has them. Neither build uses fused multiply-adds (Rust
//! never contracts `a * b + c`), and sums are taken in a fixed lane order, so both builds give
//! bit-identical results.
//!
//! glibc's `expf` is a scalar call, which keeps every loop around it scalar: the SiLU and the
//! GroupNorm backward spent most of their time there. [`exp_f32`] is a branch-free
//! range reduction and polynomial that the compiler inlines and vectorises.

/// Whether the CPU has AVX2 and FMA (std caches the CPUID answer).
#[inline]
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Wraps a kernel `fn name<T>(args) -> R { body }` (T: Elem + Float) so that its body runs
/// compiled with AVX2 and FMA enabled when the CPU has them, and as compiled otherwise. The body
/// becomes an `#[inline(always)]` function inside; what it calls in its hot loop must be
/// `#[inline(always)]` too, to be compiled into the wide build.
macro_rules! avx2_twin {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::nn::kernels::Elem + num_traits::Float>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn twin_body<$T: $crate::nn::kernels::Elem + num_traits::Float>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide<$T: $crate::nn::kernels::Elem + num_traits::Float>($($arg: $ty),*) $(-> $ret)? {
                    twin_body($($arg),*)
                }
                if $crate::kernels::simd::avx2() {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            twin_body($($arg),*)
        }
    };
}
pub(crate) use avx2_twin;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part with few mantissa bits (n · LN2_HI is exact for |n| < 2^9) and the rest.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds a float of magnitude < 2^22 to an integer, which then sits in
/// the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;

/// e^x in f32 to about 1 ulp (Cephes' `expf` polynomial after a Cody-Waite reduction), for
/// x ≤ 88 (e^88 ≈ 1.7e38). Inputs below -87 give e^-87 ≈ 1.6e-38 instead of something
/// smaller (or 0): callers add it to 1 (sigmoid) or to the row maximum's 1 (softmax), where
/// the difference does not show. NaN gives NaN. No branches or calls, so loops vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.0 { -87.0 } else { x };
    // x = n ln2 + r, |r| ≤ ln2 / 2.
    let t = x * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2^n from n's bits: t's integer part is n + 1.5 · 2^23, so its bits minus ROUNDER's are n.
    let n_bits = t.to_bits().wrapping_sub(ROUNDER.to_bits());
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// 1 / (1 + e^-z).
#[inline(always)]
pub fn sigmoid_f32(z: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-z))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's exp over the whole useful range, including the reduction's seams
    /// (multiples of ln 2 / 2) and values where e^x is denormal-adjacent.
    #[test]
    fn exp_f32_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            for v in [x, x + 1e-3, -x * 1e-3] {
                let ours = exp_f32(v) as f64;
                let exact = (v as f64).exp();
                let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
                worst = worst.max((ours - exact).abs() / ulp);
            }
            x += 0.013;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        for k in -10..=10 {
            let v = k as f32 * std::f32::consts::LN_2 / 2.0;
            let e = ((exp_f32(v) as f64) - (v as f64).exp()).abs() / (v as f64).exp();
            assert!(e < 2.5e-7, "at {v}: relative error {e}");
        }
    }

    #[test]
    fn exp_f32_saturates_and_keeps_nan() {
        assert!(exp_f32(1e4).is_finite() && exp_f32(1e4) > 1e38);
        let tiny = exp_f32(-1e4);
        assert!(tiny > 0.0 && tiny < 2e-38);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::INFINITY).is_finite());
        assert!(sigmoid_f32(-1e4) < 1e-37 && sigmoid_f32(1e4) == 1.0);
        assert_eq!(sigmoid_f32(0.0), 0.5);
    }

    /// The wide and baseline builds of a loop give the same bits.
    #[test]
    fn avx2_twin_matches_the_baseline_build() {
        #[inline(always)]
        fn kernel<T: crate::nn::kernels::Elem + num_traits::Float>(xs: &[T], out: &mut [T]) {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = T::fast_exp(x) * x + T::one();
            }
        }
        avx2_twin! {
            fn twin<T>(xs: &[T], out: &mut [T]) {
                kernel(xs, out)
            }
        }
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let (mut a, mut b) = (vec![0f32; 1000], vec![0f32; 1000]);
        twin(&xs, &mut a);
        kernel(&xs, &mut b);
        assert_eq!(a, b);
    }
}
