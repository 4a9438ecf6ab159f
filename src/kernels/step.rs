//! The fused sampler step: one pass that reads x, the model output and (optionally) the noise,
//! and writes x_{prev} and the predicted x0. Every DDPM/DDIM update is of the form
//!
//! ```text
//! x0      = a · x + b · m                      (m: model output; a, b from the prediction type)
//! x0c     = clamp(x0, lo, hi) · scale          (static clip, dynamic threshold, or identity)
//! x_prev  = p0 · x0c + px · x + pm · m + σ z   (σ fixed per row, or per element for learned_range)
//! ```
//!
//! with per-row scalars computed in f64 by the sampler. Noise z is generated inside the pass from
//! (seed, stream = the row's timestep, global element index), so the result does not depend on
//! how the pass is split over threads.

use rayon::prelude::*;

use super::rng::fill_normal;
use super::{for_each_row_piece, CHUNK_ELEMENTS, PARALLEL_MIN_ELEMENTS};

/// Per-row scalars of one fused step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStep {
    /// The row's timestep: the noise stream, and the timestep named in errors.
    pub timestep: i64,
    pub x0_from_x: f32,
    pub x0_from_model: f32,
    pub clip_min: f32,
    pub clip_max: f32,
    pub clip_scale: f32,
    pub prev_from_x0: f32,
    pub prev_from_x: f32,
    pub prev_from_model: f32,
    /// Standard deviation of the added noise (0: none).
    pub noise_std: f32,
    /// learned_range (Nichol & Dhariwal 2021, eq. 15): `(min_log, max_log)`; the per-element
    /// log variance is `frac · max_log + (1 - frac) · min_log` with `frac = (v + 1)/2` read from
    /// the second half of the model output's channels. Overrides `noise_std`.
    pub learned_log_variance: Option<(f32, f32)>,
}

impl RowStep {
    fn adds_noise(&self) -> bool {
        self.noise_std != 0.0 || self.learned_log_variance.is_some()
    }
}

/// Where the noise of a stochastic step comes from.
#[derive(Clone, Copy, Debug)]
pub enum Noise<'a> {
    /// Generated from this seed (stream = row timestep, counter = global element index).
    Seeded(u64),
    /// Given by the caller, same shape as x; used exactly.
    Given(&'a [f32]),
}

/// Elements of noise generated at a time into an L1-resident buffer.
const NOISE_BLOCK: usize = 1024;

/// One fused step over a batch. `x = None` means x is read from `out` (in-place update).
/// `model_output` rows are `model_row_stride` long (`row_len`, or `2 · row_len` when it
/// carries a variance half). Returns the global index of the first non-finite result, if any.
#[allow(clippy::too_many_arguments)]
pub fn fused_step(
    rows: &[RowStep],
    row_len: usize,
    x: Option<&[f32]>,
    model_output: &[f32],
    model_row_stride: usize,
    noise: Noise<'_>,
    out: &mut [f32],
    pred_x0: Option<&mut [f32]>,
) -> Option<usize> {
    // A batch whose rows share every coefficient (one t for all, no variance half) is one long
    // row: no per-row bookkeeping, which dominates tiny rows such as a (256, 2) batch.
    if rows.len() > 1 && model_row_stride == row_len && rows.iter().all(|r| *r == rows[0]) {
        let n = row_len * rows.len();
        return fused_step(&rows[..1], n, x, model_output, n, noise, out, pred_x0);
    }
    // When every row has the same timestep (the usual case) the noise stream is shared, so the
    // noise of a whole block is generated at once, across row boundaries: tiny rows such as a
    // (256, 2) batch then cost one generator call per block instead of one per row.
    let shared_stream = rows.windows(2).all(|w| w[0].timestep == w[1].timestep);
    let any_noise = rows.iter().any(RowStep::adds_noise);
    let run = |start: usize, o: &mut [f32], px0: Option<&mut [f32]>| -> Option<usize> {
        let mut first_bad: Option<usize> = None;
        let mut px0 = px0;
        let mut block_noise = [0f32; NOISE_BLOCK];
        // Scratch for the scaled noise of one row piece, reused by every piece of the chunk.
        let mut scratch = [0f32; NOISE_BLOCK];
        // Noise is generated a block at a time into L1-resident scratch; without noise the
        // whole chunk is one block.
        let block = if any_noise {
            NOISE_BLOCK
        } else {
            o.len().max(1)
        };
        let mut b = 0;
        while b < o.len() {
            let e = (b + block).min(o.len());
            let pre = match noise {
                Noise::Seeded(seed) if shared_stream && any_noise && !rows.is_empty() => {
                    fill_normal(
                        seed,
                        rows[0].timestep as u64,
                        (start + b) as u64,
                        &mut block_noise[..e - b],
                    );
                    true
                }
                _ => false,
            };
            for_each_row_piece(start + b, e - b, row_len, |row, s, se| {
                let c = &rows[row];
                let col = s - row * row_len;
                let m_off = row * model_row_stride + col;
                let len = se - s;
                let m = &model_output[m_off..m_off + len];
                let v = c
                    .learned_log_variance
                    .map(|_| &model_output[m_off + row_len..m_off + row_len + len]);
                let (lo, hi) = (s - start, se - start);
                let z = if pre {
                    Some(&block_noise[s - start - b..se - start - b])
                } else {
                    None
                };
                let px = px0.as_deref_mut().map(|p| &mut p[lo..hi]);
                let xs = x.map(|x| &x[s..se]);
                if let Some(bad) = piece(c, xs, m, v, z, noise, s, &mut o[lo..hi], px, &mut scratch)
                {
                    if first_bad.is_none() {
                        first_bad = Some(s + bad);
                    }
                }
            });
            b = e;
        }
        first_bad
    };
    let n = out.len();
    if n < PARALLEL_MIN_ELEMENTS || !super::parallel_allowed() {
        return run(0, out, pred_x0);
    }
    match pred_x0 {
        Some(p) => out
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(p.par_chunks_mut(CHUNK_ELEMENTS))
            .enumerate()
            .filter_map(|(i, (o, p))| run(i * CHUNK_ELEMENTS, o, Some(p)))
            .min(),
        None => out
            .par_chunks_mut(CHUNK_ELEMENTS)
            .enumerate()
            .filter_map(|(i, o)| run(i * CHUNK_ELEMENTS, o, None))
            .min(),
    }
}

/// One row piece (at most `NOISE_BLOCK` long) starting at global element `start`; `z` is its
/// pre-generated standard noise when the caller had it. Returns the offset of a non-finite result.
/// Runs the AVX2 build of the same code where the CPU has it (plain IEEE operations, no FMA
/// contraction, so both builds give identical bits).
#[allow(clippy::too_many_arguments)]
#[inline]
fn piece(
    c: &RowStep,
    x: Option<&[f32]>,
    m: &[f32],
    v: Option<&[f32]>,
    z: Option<&[f32]>,
    noise: Noise<'_>,
    start: usize,
    o: &mut [f32],
    px: Option<&mut [f32]>,
    sz: &mut [f32; NOISE_BLOCK],
) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::simd::avx2() {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { piece_avx2(c, x, m, v, z, noise, start, o, px, sz) };
        }
    }
    piece_generic(c, x, m, v, z, noise, start, o, px, sz)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn piece_avx2(
    c: &RowStep,
    x: Option<&[f32]>,
    m: &[f32],
    v: Option<&[f32]>,
    z: Option<&[f32]>,
    noise: Noise<'_>,
    start: usize,
    o: &mut [f32],
    px: Option<&mut [f32]>,
    sz: &mut [f32; NOISE_BLOCK],
) -> Option<usize> {
    piece_generic(c, x, m, v, z, noise, start, o, px, sz)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn piece_generic(
    c: &RowStep,
    x: Option<&[f32]>,
    m: &[f32],
    v: Option<&[f32]>,
    z: Option<&[f32]>,
    noise: Noise<'_>,
    start: usize,
    o: &mut [f32],
    px: Option<&mut [f32]>,
    sz: &mut [f32; NOISE_BLOCK],
) -> Option<usize> {
    let n = o.len();
    let noisy = c.adds_noise();
    debug_assert!(!noisy || n <= NOISE_BLOCK);
    // The standard noise of this piece and the factor it is scaled by inside the pass: the
    // row's σ, or 1 when learned variances have already scaled it element by element.
    let (zs, scale): (&[f32], f32) = if !noisy {
        (&[], 0.0)
    } else {
        let raw: &[f32] = match (z, noise) {
            (Some(z), _) => z,
            (None, Noise::Given(g)) => &g[start..start + n],
            (None, Noise::Seeded(seed)) => {
                fill_normal(seed, c.timestep as u64, start as u64, &mut sz[..n]);
                &sz[..n]
            }
        };
        match (c.learned_log_variance, v) {
            (Some((min_log, max_log)), Some(v)) => {
                let mut scaled = [0f32; NOISE_BLOCK];
                for ((o, &z), &vv) in scaled.iter_mut().zip(raw).zip(v) {
                    // Nichol & Dhariwal 2021, eq. 15, as a standard deviation exp(log σ² / 2).
                    let frac = 0.5 * (vv + 1.0);
                    *o = z * (0.5 * (frac * max_log + (1.0 - frac) * min_log)).exp();
                }
                sz[..n].copy_from_slice(&scaled[..n]);
                (&sz[..n], 1.0)
            }
            _ => (raw, c.noise_std),
        }
    };
    let bad = match (x, px, noisy) {
        (Some(x), Some(p), true) => body::<false, true, true>(c, x, m, zs, scale, o, p),
        (Some(x), Some(p), false) => body::<false, true, false>(c, x, m, zs, scale, o, p),
        (Some(x), None, true) => body::<false, false, true>(c, x, m, zs, scale, o, &mut []),
        (Some(x), None, false) => body::<false, false, false>(c, x, m, zs, scale, o, &mut []),
        (None, Some(p), true) => body::<true, true, true>(c, &[], m, zs, scale, o, p),
        (None, Some(p), false) => body::<true, true, false>(c, &[], m, zs, scale, o, p),
        (None, None, true) => body::<true, false, true>(c, &[], m, zs, scale, o, &mut []),
        (None, None, false) => body::<true, false, false>(c, &[], m, zs, scale, o, &mut []),
    };
    if bad {
        o.iter().position(|v| !v.is_finite())
    } else {
        None
    }
}

/// The arithmetic of the step over one block; returns true if any result is non-finite.
#[inline(always)]
fn body<const IN_PLACE: bool, const WRITE_X0: bool, const NOISY: bool>(
    c: &RowStep,
    x: &[f32],
    m: &[f32],
    z: &[f32],
    noise_scale: f32,
    o: &mut [f32],
    px: &mut [f32],
) -> bool {
    let n = o.len();
    let m = &m[..n];
    let x = if IN_PLACE { x } else { &x[..n] };
    let z = if NOISY { &z[..n] } else { z };
    let px = if WRITE_X0 { &mut px[..n] } else { px };
    let mut non_finite = 0u32;
    for i in 0..n {
        let xv = if IN_PLACE { o[i] } else { x[i] };
        let mv = m[i];
        // f32::clamp propagates NaN (unlike min/max), so a NaN model output is never hidden.
        let x0 =
            (c.x0_from_x * xv + c.x0_from_model * mv).clamp(c.clip_min, c.clip_max) * c.clip_scale;
        let mut prev = c.prev_from_x0 * x0 + c.prev_from_x * xv + c.prev_from_model * mv;
        if NOISY {
            prev += noise_scale * z[i];
        }
        if WRITE_X0 {
            px[i] = x0;
        }
        o[i] = prev;
        // prev - prev is +0 exactly when prev is finite (Inf - Inf and NaN - NaN are NaN).
        #[allow(clippy::eq_op)]
        let finite_probe = prev - prev;
        non_finite |= finite_probe.to_bits();
    }
    non_finite != 0
}

/// Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per row, the `ratio`-quantile
/// (linear interpolation, as torch.quantile) of |x0|, floored at 1 and, when `max_value` is
/// given, capped at it (diffusers' `sample_max_value`). x0 = a·x + b·m with the row's
/// coefficients. Non-finite x0 gives a NaN scale, which the step then reports.
pub fn threshold_scales(
    rows: &[RowStep],
    row_len: usize,
    x: &[f32],
    model_output: &[f32],
    model_row_stride: usize,
    ratio: f64,
    max_value: Option<f64>,
) -> Vec<f32> {
    let one_row = |r: usize| -> f32 {
        if row_len == 0 {
            return 1.0;
        }
        let c = &rows[r];
        let xr = &x[r * row_len..(r + 1) * row_len];
        let mr = &model_output[r * model_row_stride..r * model_row_stride + row_len];
        let mut a: Vec<f32> = xr
            .iter()
            .zip(mr)
            .map(|(&xv, &mv)| (c.x0_from_x * xv + c.x0_from_model * mv).abs())
            .collect();
        if a.iter().any(|v| v.is_nan()) {
            return f32::NAN;
        }
        let pos = ratio * (row_len - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(row_len - 1);
        let (_, lo_v, upper) = a.select_nth_unstable_by(lo, f32::total_cmp);
        let lo_v = *lo_v as f64;
        let hi_v = if hi > lo {
            upper.iter().copied().fold(f32::INFINITY, f32::min) as f64
        } else {
            lo_v
        };
        let mut s = lo_v + (hi_v - lo_v) * (pos - lo as f64);
        s = s.max(1.0);
        if let Some(mx) = max_value {
            s = s.min(mx);
        }
        s as f32
    };
    let batch = rows.len();
    if batch * row_len < PARALLEL_MIN_ELEMENTS || !super::parallel_allowed() {
        (0..batch).map(one_row).collect()
    } else {
        (0..batch).into_par_iter().map(one_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
    }

    fn row(noise_std: f32, learned: bool) -> RowStep {
        RowStep {
            timestep: 321,
            x0_from_x: 1.7,
            x0_from_model: -0.9,
            clip_min: -1.0,
            clip_max: 1.0,
            clip_scale: 1.0,
            prev_from_x0: 0.6,
            prev_from_x: 0.3,
            prev_from_model: -0.2,
            noise_std,
            learned_log_variance: learned.then_some((-6.0, -3.0)),
        }
    }

    #[test]
    fn simd_and_portable_step_builds_give_identical_bits() {
        let n = 1000;
        let mut s = 7u64;
        let x: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
        let m: Vec<f32> = (0..2 * n).map(|_| lcg(&mut s)).collect();
        for (std, learned) in [(0.0, false), (0.37, false), (0.0, true)] {
            let c = row(std, learned);
            let mut reference: Option<(Vec<f32>, Vec<f32>)> = None;
            for simd in [false, true] {
                #[cfg(not(target_arch = "x86_64"))]
                if simd {
                    continue;
                }
                let (mut o, mut p) = (vec![0f32; n], vec![0f32; n]);
                let mut scratch = [0f32; NOISE_BLOCK];
                for start in (0..n).step_by(NOISE_BLOCK) {
                    let e = (start + NOISE_BLOCK).min(n);
                    let v = learned.then(|| &m[n + start..n + e]);
                    let args = (
                        &c,
                        Some(&x[start..e]),
                        &m[start..e],
                        v,
                        None,
                        Noise::Seeded(5),
                        start,
                    );
                    let r = if simd {
                        #[cfg(target_arch = "x86_64")]
                        {
                            if !crate::kernels::simd::avx2() {
                                return;
                            }
                            // SAFETY: AVX2 support was checked just above.
                            unsafe {
                                piece_avx2(
                                    args.0,
                                    args.1,
                                    args.2,
                                    args.3,
                                    args.4,
                                    args.5,
                                    args.6,
                                    &mut o[start..e],
                                    Some(&mut p[start..e]),
                                    &mut scratch,
                                )
                            }
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        unreachable!()
                    } else {
                        piece_generic(
                            args.0,
                            args.1,
                            args.2,
                            args.3,
                            args.4,
                            args.5,
                            args.6,
                            &mut o[start..e],
                            Some(&mut p[start..e]),
                            &mut scratch,
                        )
                    };
                    assert!(r.is_none());
                }
                match &reference {
                    None => reference = Some((o, p)),
                    Some((ro, rp)) => {
                        assert!(ro.iter().zip(&o).all(|(a, b)| a.to_bits() == b.to_bits()));
                        assert!(rp.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()));
                    }
                }
            }
        }
    }

    #[test]
    fn step_equals_the_formula_per_element() {
        let c = row(0.0, false);
        let (x, m) = ([0.5f32, -2.0, 3.0], [1.0f32, 0.25, -4.0]);
        let mut o = [0f32; 3];
        let mut p = [0f32; 3];
        assert!(fused_step(
            &[c],
            3,
            Some(&x),
            &m,
            3,
            Noise::Seeded(0),
            &mut o,
            Some(&mut p)
        )
        .is_none());
        for i in 0..3 {
            let x0 = (1.7 * x[i] - 0.9 * m[i]).clamp(-1.0, 1.0);
            assert_eq!(p[i], x0);
            assert_eq!(o[i], 0.6 * x0 + 0.3 * x[i] - 0.2 * m[i]);
        }
    }
}
