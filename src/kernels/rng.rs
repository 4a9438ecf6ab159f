//! Counter-based Gaussian noise: Philox4x32-10 plus a vectorised Box–Muller transform.
//!
//! # Why counter-based
//!
//! A sampler step needs noise for every element of a large array, filled by many threads in
//! chunks whose boundaries depend on the thread pool. With a counter-based generator the value
//! at element `i` is a pure function of `(seed, stream, i)`, so any chunking gives the same
//! array, bit for bit, and no generator state has to be carried between chunks or steps.
//!
//! # Counter layout
//!
//! Element index `i` (a global `u64` index into the noise stream) lives in Philox block
//! `b = i / 4`, lane `i % 4`. Block `b` of stream `stream` under seed `seed` is
//!
//! ```text
//! counter = [b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32]
//! key     = [seed as u32, (seed >> 32) as u32]
//! [x0, x1, x2, x3] = philox4x32_10(counter, key)
//! ```
//!
//! and its four outputs become four normals by Box–Muller, pairing `(x0, x1)` into lanes 0
//! and 1 and `(x2, x3)` into lanes 2 and 3:
//!
//! ```text
//! U = ((x_r >> 8) + 1) · 2^-24        in (0, 1]   (radius uniform, never 0)
//! V =  (x_t >> 8)      · 2^-24        in [0, 1)   (angle uniform)
//! lane 2k     = sqrt(-2 ln U) · cos(2π V)
//! lane 2k + 1 = sqrt(-2 ln U) · sin(2π V)
//! ```
//!
//! The stream id occupies the upper half of the counter, so different streams (e.g. one per
//! sampler step or per batch item) never share a counter while `b < 2^64`.
//!
//! # Tail truncation
//!
//! The smallest radius uniform is `U = 2^-24`, so `|z| <= sqrt(-2 ln 2^-24) = sqrt(48 ln 2)
//! ≈ 5.768`. The normal tail beyond 5.77σ (probability ≈ 8e-9) is therefore never produced;
//! apart from that the 24-bit uniforms put the discretisation error of the CDF near 2^-24.
//!
//! # Accuracy and reproducibility
//!
//! `ln`, `sin` and `cos` are evaluated with branch-free f32 polynomials built from plain IEEE
//! operations (no FMA, no fast-math); `sqrt` is the correctly rounded `f32::sqrt`. Measured
//! exhaustively over all 2^24 uniforms, `ln U` is within 1.3e-7 relative of f64 libm and
//! `sin`/`cos` of `2πV` within 1.3e-7; a sample is within 4e-7 relative and 1e-6 absolute of the
//! f64 Box–Muller value of the same uniforms (tests). Because Rust never contracts `a * b + c`
//! on its own, the AVX2 build of the kernel and the portable build produce bit-identical
//! samples, and so does any other target; the first samples of one stream are pinned in a test.
//!
//! # Speed
//!
//! `fill_normal` generates 16 Philox blocks (64 normals) at a time in lane arrays shaped for
//! LLVM's auto-vectoriser. On x86 the same body is compiled a second time with AVX2 enabled and
//! picked at run time (no `-C target-cpu` needed): about 4.4 cycles per sample on Zen 3, i.e.
//! ~550 M samples/s per core at 2.4 GHz, for chunks of 1024 elements and up.

/// Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, table 2).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;
const PHILOX_ROUNDS: usize = 10;

/// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..PHILOX_ROUNDS {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c0);
        let p1 = u64::from(PHILOX_M1) * u64::from(c2);
        (c0, c1, c2, c3) = (
            (p1 >> 32) as u32 ^ c1 ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ c3 ^ k1,
            p0 as u32,
        );
    }
    [c0, c1, c2, c3]
}

/// Philox blocks generated per batch. 16 measured fastest against 8 and 32 on AVX2: two
/// 4-lane chains of Philox state fit the 16 vector registers, and the 64 normals amortise the
/// per-batch setup.
const BLOCKS: usize = 16;
/// Normals produced per batch (4 per block).
const BATCH: usize = 4 * BLOCKS;

/// Philox key schedule `k_r = k + r·W (mod 2^32)` for the ten rounds, widened to the u64
/// lanes of [`philox_pairs`].
type RoundKeys = [[u64; 2]; PHILOX_ROUNDS];

#[inline(always)]
fn round_keys(seed: u64) -> RoundKeys {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut keys = [[0u64; 2]; PHILOX_ROUNDS];
    for (round, k) in keys.iter_mut().enumerate() {
        let r = round as u32;
        k[0] = u64::from(key[0].wrapping_add(r.wrapping_mul(PHILOX_W0)));
        k[1] = u64::from(key[1].wrapping_add(r.wrapping_mul(PHILOX_W1)));
    }
    keys
}

/// Box–Muller pairs per batch (2 per block).
const PAIRS: usize = 2 * BLOCKS;

/// Philox4x32-10 of the `BLOCKS` consecutive blocks `b0 ..` of `stream`, arranged as the
/// Box–Muller pairs in output order: pair `2j` of block `b0 + j` is `(x0, x1)`, pair `2j + 1` is
/// `(x2, x3)`; `radius[p]` and `angle[p]` are the two words of pair `p`.
///
/// Written for the auto-vectoriser: the lane loop over blocks is what gets vectorised, the
/// ten rounds unroll inside it, so a block's state stays in registers throughout. Each counter
/// word is carried in a u64 lane whose low 32 bits are the word and whose high bits are
/// don't-care: the only consumers of those high bits are the multiplications, which truncate
/// their operand to 32 bits, and that `u32 x u32 -> u64` product is exactly `vpmuludq` (AVX2) /
/// `umull` (NEON). `hi` is then one 64-bit shift and `lo` the product itself, so a round needs no
/// shuffles. Each iteration advances two blocks (`j` and `j + BLOCKS/2`) side by side because one
/// block's rounds are a serial multiply -> shift -> xor chain; the second chain fills its latency.
#[inline(always)]
fn philox_pairs(keys: &RoundKeys, stream: u64, b0: u64) -> ([u32; PAIRS], [u32; PAIRS]) {
    // Pairs are packed as u64 lanes whose two u32 halves are, in memory order, the words of
    // pairs 2j and 2j + 1; building that is one shift and one blend per vector instead of a
    // narrowing shuffle per word.
    let mut radius = [0u64; BLOCKS];
    let mut angle = [0u64; BLOCKS];
    const HALF: usize = BLOCKS / 2;
    for j in 0..HALF {
        // Counter of block b: [b, b >> 32, stream, stream >> 32] (high halves don't-care).
        let (ba, bb) = (
            b0.wrapping_add(j as u64),
            b0.wrapping_add((j + HALF) as u64),
        );
        let [mut a0, mut a1, mut a2, mut a3] = [ba, ba >> 32, stream, stream >> 32];
        let [mut c0, mut c1, mut c2, mut c3] = [bb, bb >> 32, stream, stream >> 32];
        for &[k0, k1] in keys {
            let pa0 = u64::from(PHILOX_M0) * u64::from(a0 as u32);
            let pa1 = u64::from(PHILOX_M1) * u64::from(a2 as u32);
            let pc0 = u64::from(PHILOX_M0) * u64::from(c0 as u32);
            let pc1 = u64::from(PHILOX_M1) * u64::from(c2 as u32);
            (a0, a1, a2, a3) = ((pa1 >> 32) ^ a1 ^ k0, pa1, (pa0 >> 32) ^ a3 ^ k1, pa0);
            (c0, c1, c2, c3) = ((pc1 >> 32) ^ c1 ^ k0, pc1, (pc0 >> 32) ^ c3 ^ k1, pc0);
        }
        (radius[j], angle[j]) = (pack_pair(a0, a2), pack_pair(a1, a3));
        (radius[j + HALF], angle[j + HALF]) = (pack_pair(c0, c2), pack_pair(c1, c3));
    }
    (unpack_pairs(radius), unpack_pairs(angle))
}

/// One u64 whose in-memory u32 halves are `first as u32`, `second as u32` on either endianness.
#[inline(always)]
fn pack_pair(first: u64, second: u64) -> u64 {
    if cfg!(target_endian = "little") {
        (first & 0xffff_ffff) | (second << 32)
    } else {
        (second & 0xffff_ffff) | (first << 32)
    }
}

/// Reinterprets packed pairs as the u32 sequence they hold in memory.
#[inline(always)]
fn unpack_pairs(packed: [u64; BLOCKS]) -> [u32; PAIRS] {
    // SAFETY: both are plain integer arrays of the same size; every bit pattern is a valid u32.
    unsafe { core::mem::transmute::<[u64; BLOCKS], [u32; PAIRS]>(packed) }
}

// Bit pattern of f32 sqrt(1/2): the mantissa is reduced to [sqrt(1/2), sqrt(2)).
const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
// Bit pattern of -2·m given the 23 mantissa bits of m in [sqrt(1/2), sqrt(2)): sign set and
// exponent one higher than SQRT_HALF_BITS.
const NEG2_SQRT_HALF_BITS: u32 = SQRT_HALF_BITS + 0x0080_0000 + 0x8000_0000;
// R(z) = (2 atanh(s) - 2s) / s = 2z/3 + 2z²/5 + ..., z = s² in [0, (3 - 2√2)²]: minimax
// (Remez) fit z·(L1 + L2 z + L3 z²), whose error adds < 1e-9 relative to ln m. The f64
// values are the fit; `as f32` rounds them to nearest. Stored premultiplied by -2 (exact).
const NEG2_LG1: f32 = -2.0 * (0.666_667_763_816_174_9_f64 as f32);
const NEG2_LG2: f32 = -2.0 * (0.399_775_415_759_662_4_f64 as f32);
const NEG2_LG3: f32 = -2.0 * (0.298_717_277_485_990_8_f64 as f32);
const NEG2_LN2: f32 = -2.0 * core::f32::consts::LN_2;

/// `-2 ln(U)` for the radius uniform `U = n · 2^-24`, `n = (x >> 8) + 1` in `[1, 2^24]`.
///
/// `n` converts to f32 exactly, so `U = m · 2^e` with `m` in `[sqrt(1/2), sqrt(2))` comes from
/// a pure bit split. With `f = m - 1` (exact, Sterbenz) and `s = f / (2 + f)`,
/// `ln m = 2 atanh(s) = (f - s·f) + s·R(s²)` (using `2s = f - s·f`): the leading `f` is exact
/// and the rounding of `s` only enters terms at most f²/2 in size. Then `ln U = e·ln 2 + ln m`;
/// f32 ln 2 is within 3e-9 of the true value, so no hi/lo split is needed for the 1.3e-7
/// relative accuracy this reaches.
///
/// The factor -2 is folded in exactly: every operand is carried scaled by -2 (`F = -2f`
/// straight from the bit pattern, `s = F / (F - 4)` is the same rounded quotient), and since
/// scaling by a power of two commutes with rounding, the result equals `-2 * ln(U)` computed
/// unscaled, one multiply cheaper. The evaluation order keeps the chain from the division to
/// the result short (`s·z` and `s·F` are formed beside the polynomial), which matters more than
/// operation count here: long chains hold vector registers and stall the out-of-order window.
#[inline(always)]
fn neg2_ln_radius_uniform(x: u32) -> f32 {
    let n = (x >> 8) + 1;
    // n < 2^31, so the signed conversion (cvtdq2ps) is exact and vectorises without AVX-512.
    let bits = (n as i32 as f32).to_bits();
    // Adding 1.0 - sqrt(1/2) in the bit domain carries into the exponent exactly when the
    // mantissa is >= sqrt(2), which moves m into [sqrt(1/2), sqrt(2)).
    let shifted = bits + (0x3f80_0000 - SQRT_HALF_BITS);
    let e = ((shifted >> 23) as i32 - (127 + 24)) as f32;
    let neg2_m = f32::from_bits((shifted & 0x007f_ffff).wrapping_add(NEG2_SQRT_HALF_BITS));
    let f2 = neg2_m + 2.0; // -2f, exact
    let s = f2 / (neg2_m - 2.0); // f / (2 + f): -2m - 2 is exactly -2 (2 + f)
    let z = s * s;
    let p = NEG2_LG1 + z * (NEG2_LG2 + z * NEG2_LG3); // -2 R(z) / z
    e * NEG2_LN2 + ((f2 - s * f2) + (s * z) * p)
}

// sin(π/2 · r) and cos(π/2 · r) for |r| <= 1/2, as r·(S1 + S3 r² + S5 r⁴ + S7 r⁶) and
// 1 + C2 r² + ... + C8 r⁸: minimax (Remez) fits of relative error 3e-9 and 7e-11, well below
// the f32 rounding of the evaluation (the f64 values are the fit, rounded to nearest by `as`).
const S1: f32 = 1.570_796_321_708_340_7_f64 as f32; // the same f32 as π/2
const S3: f32 = -0.645_963_460_233_191_2_f64 as f32;
const S5: f32 = 0.079_680_032_768_503_15_f64 as f32;
const S7: f32 = -0.004_601_657_887_273_431_f64 as f32;
const C2: f32 = -1.233_700_542_597_666_f64 as f32;
const C4: f32 = 0.253_669_225_965_414_8_f64 as f32;
const C6: f32 = -0.020_860_165_110_797_187_f64 as f32;
const C8: f32 = 0.000_903_766_541_690_983_9_f64 as f32;

/// `(sin 2πV, cos 2πV)` for the angle uniform `V = (x >> 8) · 2^-24`.
///
/// `4V` counted in quarter turns is `x' · 2^-30` with `x' = x & !0xff`; the reduction
/// `4V = q + r`, `q = round(4V) mod 4`, `r` in `[-1/2, 1/2)`, is exact integer work on `x`:
/// `q` is the top two bits of `x + 2^29` and `r` the low 30 bits of `x'` sign-extended. Then
/// `2πV = q·π/2 + r·π/2` carries no reduction error, and the quadrant only swaps and negates
/// the two polynomials.
#[inline(always)]
fn sincos_angle_uniform(x: u32) -> (f32, f32) {
    let t = x.wrapping_add(1 << 29);
    // The low 10 bits are cleared, so the i32 has at most 22 significant bits: exact in f32.
    let r = ((x << 2) & !0x3ff) as i32 as f32 * (1.0 / 4_294_967_296.0); // · 2^-32
    let r2 = r * r;
    let sin_r = r * (S1 + r2 * (S3 + r2 * (S5 + r2 * S7)));
    let cos_r = 1.0 + r2 * (C2 + r2 * (C4 + r2 * (C6 + r2 * C8)));
    // sin(qπ/2 + α), cos(qπ/2 + α) for q = 0,1,2,3: (s, c), (c, -s), (-s, -c), (-c, s).
    // Bit 30 of t is q's low bit (swap), bit 31 its high bit (sin < 0), their xor cos < 0.
    let swap = ((t << 1) as i32) < 0;
    let (sin_mag, cos_mag) = if swap { (cos_r, sin_r) } else { (sin_r, cos_r) };
    let sin_sign = t & 0x8000_0000;
    let cos_sign = (t ^ (t << 1)) & 0x8000_0000;
    (
        f32::from_bits(sin_mag.to_bits() ^ sin_sign),
        f32::from_bits(cos_mag.to_bits() ^ cos_sign),
    )
}

/// Box–Muller on one (radius word, angle word) pair: `(r cos θ, r sin θ)`.
#[inline(always)]
fn box_muller(xr: u32, xt: u32) -> (f32, f32) {
    let radius = neg2_ln_radius_uniform(xr).sqrt();
    let (s, c) = sincos_angle_uniform(xt);
    (radius * c, radius * s)
}

/// The `BATCH` normals of blocks `b0 .. b0 + BLOCKS`, in element order.
#[inline(always)]
fn normal_batch(keys: &RoundKeys, stream: u64, b0: u64, out: &mut [f32; BATCH]) {
    let (radius, angle) = philox_pairs(keys, stream, b0);
    for p in 0..PAIRS {
        (out[2 * p], out[2 * p + 1]) = box_muller(radius[p], angle[p]);
    }
}

/// Up to this many blocks, a partial batch is generated block by block with the scalar Philox
/// (measured break-even against a whole 16-block batch: about 2 blocks).
const SCALAR_BLOCKS: usize = 2;

/// The 4 normals of block `b` on their own (same values as in a batch).
#[inline(always)]
fn normal_block(key: [u32; 2], stream: u64, b: u64) -> [f32; 4] {
    let counter = [
        b as u32,
        (b >> 32) as u32,
        stream as u32,
        (stream >> 32) as u32,
    ];
    let [x0, x1, x2, x3] = philox4x32_10(counter, key);
    let ((z0, z1), (z2, z3)) = (box_muller(x0, x1), box_muller(x2, x3));
    [z0, z1, z2, z3]
}

/// The whole fill, written once and instantiated per instruction set by the callers below.
#[inline(always)]
fn fill_normal_body(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let keys = round_keys(seed);
    let mut elem = start;
    let mut rest = out;
    while !rest.is_empty() {
        let b0 = elem / 4;
        let skip = (elem % 4) as usize;
        if skip == 0 && rest.len() >= BATCH {
            let Some((head, tail)) = rest.split_first_chunk_mut::<BATCH>() else {
                unreachable!("rest holds at least BATCH elements")
            };
            normal_batch(&keys, stream, b0, head);
            rest = tail;
            elem = elem.wrapping_add(BATCH as u64);
        } else {
            // Unaligned head or short tail (at most one of each per call): generate on the stack
            // and copy out the part that belongs to this call. A few blocks go one at a time, so
            // that tiny requests (e.g. one short row) do not pay for a whole batch.
            let mut buf = [0f32; BATCH];
            let blocks = (skip + rest.len()).div_ceil(4);
            if blocks <= SCALAR_BLOCKS {
                for (k, z) in buf.chunks_exact_mut(4).take(blocks).enumerate() {
                    z.copy_from_slice(&normal_block(key, stream, b0.wrapping_add(k as u64)));
                }
            } else {
                normal_batch(&keys, stream, b0, &mut buf);
            }
            let take = (BATCH - skip).min(rest.len());
            let (head, tail) = rest.split_at_mut(take);
            head.copy_from_slice(&buf[skip..skip + take]);
            rest = tail;
            elem = elem.wrapping_add(take as u64);
        }
    }
}

fn fill_normal_portable(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    fill_normal_body(seed, stream, start, out);
}

/// Box–Muller over arbitrary words, for testing the transform across instruction sets.
#[cfg(all(test, any(target_arch = "x86", target_arch = "x86_64")))]
#[inline(always)]
fn box_muller_slice(radius: &[u32], angle: &[u32], out: &mut [f32]) {
    for ((&xr, &xt), z) in radius.iter().zip(angle).zip(out.chunks_exact_mut(2)) {
        (z[0], z[1]) = box_muller(xr, xt);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86 {
    /// The portable body compiled for x86-64-v3. FMA is enabled with AVX2 as that level has it,
    /// but the body contains no fused operation (Rust never forms one from `a * b + c`), so the
    /// results are bit-identical to the portable build; the gain is 256-bit lanes and
    /// `vpmuludq`/`vblendvps`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (see [`crate::kernels::simd::avx2`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fill_normal_avx2(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
        super::fill_normal_body(seed, stream, start, out);
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn box_muller_slice_avx2(radius: &[u32], angle: &[u32], out: &mut [f32]) {
        super::box_muller_slice(radius, angle, out);
    }
}

/// Standard normal f32 samples for the global element indices `start .. start + out.len()`
/// of the noise stream identified by (seed, stream). Pure function of (seed, stream, index):
/// the value at element index i never depends on `start` or on the length of `out`, so a
/// caller splitting an array into chunks at ANY boundaries (e.g. rayon chunks) gets results
/// identical to one call over the whole array.
///
/// See the module documentation for the counter layout and the 5.77σ tail truncation. No heap
/// allocation; on x86 an AVX2 build of the kernel is chosen at run time (CPUID checked once).
pub fn fill_normal(seed: u64, stream: u64, start: u64, out: &mut [f32]) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if crate::kernels::simd::avx2() {
        // SAFETY: the CPU reported AVX2 and FMA.
        unsafe { x86::fill_normal_avx2(seed, stream, start, out) };
        return;
    }
    fill_normal_portable(seed, stream, start, out);
}

/// Which implementation [`fill_normal`] uses on this CPU: `"avx2"` or `"portable"`.
pub fn fill_normal_path() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if crate::kernels::simd::avx2() {
        return "avx2";
    }
    "portable"
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_POW_24: f64 = 16_777_216.0;

    #[test]
    fn philox_known_answers() {
        // Random123 kat_vectors, "philox4x32 10" lines: counter, key -> output.
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (counter, key, want) in kat {
            assert_eq!(
                philox4x32_10(counter, key),
                want,
                "counter {counter:x?} key {key:x?}"
            );
        }
    }

    #[test]
    fn philox_pairs_match_scalar() {
        let seed = 0x9abc_def0_1234_5678_u64;
        let key = [seed as u32, (seed >> 32) as u32];
        let stream = 0x0bad_cafe_dead_beef_u64;
        // b0 chosen so the block index carries into the high counter word mid-batch.
        let b0 = 0x0000_0001_ffff_fffa_u64;
        let (radius, angle) = philox_pairs(&round_keys(seed), stream, b0);
        for j in 0..BLOCKS {
            let b = b0 + j as u64;
            let x = philox4x32_10(
                [
                    b as u32,
                    (b >> 32) as u32,
                    stream as u32,
                    (stream >> 32) as u32,
                ],
                key,
            );
            assert_eq!([radius[2 * j], angle[2 * j]], [x[0], x[1]], "block {j}");
            assert_eq!(
                [radius[2 * j + 1], angle[2 * j + 1]],
                [x[2], x[3]],
                "block {j}"
            );
        }
    }

    /// Slow reference: the same Philox words and uniforms, Box–Muller in f64 with libm.
    fn reference(seed: u64, stream: u64, i: u64) -> f64 {
        let b = i / 4;
        let x = philox4x32_10(
            [
                b as u32,
                (b >> 32) as u32,
                stream as u32,
                (stream >> 32) as u32,
            ],
            [seed as u32, (seed >> 32) as u32],
        );
        let lane = (i % 4) as usize;
        let (xr, xt) = (x[lane & 2], x[(lane & 2) + 1]);
        let u = f64::from((xr >> 8) + 1) / TWO_POW_24;
        let v = f64::from(xt >> 8) / TWO_POW_24;
        let radius = (-2.0 * u.ln()).sqrt();
        let theta = core::f64::consts::TAU * v;
        if lane.is_multiple_of(2) {
            radius * theta.cos()
        } else {
            radius * theta.sin()
        }
    }

    #[test]
    fn matches_f64_reference() {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        let cases = [
            (0u64, 0u64, 0u64),
            (42, 7, 1_000_003),
            (u64::MAX, u64::MAX, (1 << 34) - 4097),
        ];
        for (seed, stream, start) in cases {
            let mut out = vec![0f32; 1 << 18];
            fill_normal(seed, stream, start, &mut out);
            for (k, &z) in out.iter().enumerate() {
                let want = reference(seed, stream, start + k as u64);
                let err = (f64::from(z) - want).abs();
                worst_abs = worst_abs.max(err);
                if want != 0.0 {
                    worst_rel = worst_rel.max(err / want.abs());
                }
            }
        }
        println!("vs f64 reference: max abs error {worst_abs:.3e}, max rel error {worst_rel:.3e}");
        assert!(worst_abs < 1e-6, "max abs error {worst_abs:.3e}");
        assert!(worst_rel < 4e-7, "max rel error {worst_rel:.3e}");
    }

    /// Max relative error of `ln U` from `neg2_ln_radius_uniform` over all 2^24 uniforms.
    fn ln_max_rel_err() -> f64 {
        let mut worst = 0f64;
        for a in 0..1u32 << 24 {
            let got = -0.5 * f64::from(neg2_ln_radius_uniform(a << 8 | 0xa5));
            let want = (f64::from(a + 1) / TWO_POW_24).ln();
            if a + 1 == 1 << 24 {
                assert_eq!(got, 0.0, "ln 1");
            } else {
                worst = worst.max(((got - want) / want).abs());
            }
        }
        worst
    }

    /// Max relative errors of `sincos_angle_uniform` (sin, cos) over all 2^24 angles.
    fn sincos_max_rel_err() -> (f64, f64) {
        let (mut ws, mut wc) = (0f64, 0f64);
        for a in 0..1u32 << 24 {
            let (s, c) = sincos_angle_uniform(a << 8 | 0x5a);
            let (es, ec) = (core::f64::consts::TAU * f64::from(a) / TWO_POW_24).sin_cos();
            if a % (1 << 23) == 0 {
                assert_eq!(s, 0.0, "sin at a multiple of π, a = {a}");
            } else {
                ws = ws.max(((f64::from(s) - es) / es).abs());
            }
            if a % (1 << 23) == 1 << 22 {
                assert_eq!(c, 0.0, "cos at an odd multiple of π/2, a = {a}");
            } else {
                wc = wc.max(((f64::from(c) - ec) / ec).abs());
            }
        }
        (ws, wc)
    }

    #[test]
    fn ln_is_accurate_for_every_uniform() {
        let e = ln_max_rel_err();
        println!("ln: max relative error {e:.3e} over all 2^24 uniforms");
        assert!(e < 2e-7, "ln max relative error {e:.3e}");
    }

    #[test]
    fn sincos_is_accurate_for_every_angle() {
        let (es, ec) = sincos_max_rel_err();
        println!("sin: max relative error {es:.3e}, cos: {ec:.3e} over all 2^24 angles");
        assert!(es < 2e-7 && ec < 2e-7, "sin {es:.3e} cos {ec:.3e}");
    }

    #[test]
    fn radius_is_monotone_and_tail_is_truncated_at_5_77_sigma() {
        let mut prev = f32::INFINITY;
        for a in 0..1u32 << 24 {
            let r2 = neg2_ln_radius_uniform(a << 8);
            assert!(
                r2.is_finite() && r2 >= 0.0 && r2 <= prev,
                "a = {a}: {r2} after {prev}"
            );
            prev = r2;
        }
        assert_eq!(prev, 0.0, "U = 1 gives radius 0");
        let max_radius = neg2_ln_radius_uniform(0).sqrt();
        let bound = (48.0 * core::f64::consts::LN_2).sqrt(); // sqrt(-2 ln 2^-24)
        assert!(
            (f64::from(max_radius) - bound).abs() < 1e-6,
            "{max_radius} vs {bound}"
        );
        for xt in [0, 1 << 30, 1 << 31, 3 << 30, 0x2000_0000, u32::MAX] {
            let (z0, z1) = box_muller(0xff, xt);
            assert!(z0.abs() <= 5.7683 && z1.abs() <= 5.7683, "{z0} {z1}");
            assert_eq!(box_muller(u32::MAX, xt), (0.0, 0.0));
        }
        // The angle words at quarter turns give exact axes: (r, 0), (0, r), (-r, 0), (0, -r).
        let r = max_radius;
        assert_eq!(box_muller(0, 0), (r, 0.0));
        assert_eq!(box_muller(0, 1 << 30), (0.0, r));
        assert_eq!(box_muller(0, 2 << 30), (-r, 0.0));
        assert_eq!(box_muller(0, 3 << 30), (0.0, -r));
    }

    /// Values pinned from this implementation: a change here changes every seeded run.
    #[test]
    fn stream_is_stable() {
        let mut out = [0f32; 8];
        fill_normal(0, 0, 0, &mut out);
        let bits = out.map(f32::to_bits);
        println!("first samples of (seed 0, stream 0): {out:?} bits {bits:08x?}");
        assert_eq!(bits, PINNED);
    }
    const PINNED: [u32; 8] = [
        0x3f7d_bb30,
        0xbf6c_b6b3,
        0xbf1e_1ba1,
        0xbef6_d1a9,
        0xbe1d_534f,
        0x3e39_2a6b,
        0x3f54_ec99,
        0x3e4a_2d9b,
    ];

    #[test]
    fn any_chunking_gives_identical_bits() {
        let lens = [
            0usize, 1, 3, 5, 1023, 64, 63, 65, 2, 4096, 7, 129, 0, 1000, 4, 333,
        ];
        let starts = [
            0u64,
            1,
            2,
            3,
            61,
            4097,
            (1 << 34) - 1500,
            0x7fff_ffff_ffff_0003,
        ];
        for (case, &start) in starts.iter().enumerate() {
            let total: usize = lens.iter().sum();
            let mut whole = vec![f32::NAN; total];
            fill_normal(9, case as u64, start, &mut whole);
            // Chunks at irregular boundaries, in a case-dependent order of lengths.
            let mut pieces = vec![f32::NAN; total];
            let mut at = 0usize;
            for k in 0..lens.len() {
                let len = lens[(k + case) % lens.len()];
                fill_normal(9, case as u64, start + at as u64, &mut pieces[at..at + len]);
                at += len;
            }
            assert_eq!(at, total);
            for (i, (a, b)) in whole.iter().zip(&pieces).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "start {start}, element {i}");
            }
            // Element by element, too.
            for i in (0..total).step_by(37) {
                let mut one = [f32::NAN];
                fill_normal(9, case as u64, start + i as u64, &mut one);
                assert_eq!(
                    one[0].to_bits(),
                    whole[i].to_bits(),
                    "start {start}, element {i}"
                );
            }
        }
    }

    #[test]
    fn simd_and_portable_paths_are_bit_identical() {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if !crate::kernels::simd::avx2() {
                println!("CPU without AVX2+FMA: only the portable path exists here");
                return;
            }
            for (seed, stream, start, len) in [
                (1u64, 2u64, 0u64, 1usize << 20),
                (u64::MAX, 0, 3, 100_001),
                (0x5eed, 1 << 40, (1 << 34) - 333, 4099),
                (5, 6, 7, 3), // short requests take the block-at-a-time path
                (5, 6, 8, 8),
            ] {
                let mut simd = vec![0f32; len];
                let mut portable = vec![0f32; len];
                // SAFETY: AVX2 and FMA were detected above.
                unsafe { x86::fill_normal_avx2(seed, stream, start, &mut simd) };
                fill_normal_portable(seed, stream, start, &mut portable);
                for (i, (a, b)) in simd.iter().zip(&portable).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "seed {seed} element {i}");
                }
            }
            // Every radius word and every angle word through both builds of the transform.
            // (Every 5th word in unoptimised builds, to keep `cargo test` quick.)
            let step = if cfg!(debug_assertions) { 5 } else { 1 };
            let xr: Vec<u32> = (0..1u32 << 24)
                .step_by(step)
                .map(|a| a << 8 | 0x3c)
                .collect();
            let xt: Vec<u32> = xr
                .iter()
                .map(|&r| (r ^ 0xff).rotate_left(8 * (r >> 8 & 3)))
                .collect();
            let mut simd = vec![0f32; 2 * xr.len()];
            let mut portable = vec![0f32; 2 * xr.len()];
            // SAFETY: AVX2 and FMA were detected above.
            unsafe { x86::box_muller_slice_avx2(&xr, &xt, &mut simd) };
            box_muller_slice(&xr, &xt, &mut portable);
            for (i, (a, b)) in simd.iter().zip(&portable).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "pair {}", i / 2);
            }
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        println!("not x86: the portable build is the only one");
    }

    /// Standard normal CDF from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7 in erf).
    fn normal_cdf(x: f64) -> f64 {
        let z = x.abs() / core::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736
                    + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        let erf = 1.0 - poly * (-z * z).exp();
        0.5 * (1.0 + erf.copysign(x))
    }

    fn pearson(a: &[f32], b: &[f32]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (
            a.iter().map(|&v| f64::from(v)).sum::<f64>() / n,
            b.iter().map(|&v| f64::from(v)).sum::<f64>() / n,
        );
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(b) {
            let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
            sab += dx * dy;
            saa += dx * dx;
            sbb += dy * dy;
        }
        sab / (saa * sbb).sqrt()
    }

    #[test]
    fn samples_are_standard_normal() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-9);
        assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 2e-7);
        assert!((normal_cdf(-1.0) - 0.158_655_254).abs() < 2e-7);

        let n = 1usize << 22;
        let mut z = vec![0f32; n];
        fill_normal(2024, 0, 0, &mut z);
        let nf = n as f64;
        let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / nf;
        let (mut m2, mut m4) = (0f64, 0f64);
        for &v in &z {
            let d = f64::from(v) - mean;
            m2 += d * d;
            m4 += d * d * d * d;
        }
        let var = m2 / nf;
        let kurtosis = m4 / nf / (var * var);
        println!("n = {n}: mean {mean:.2e}, variance {var:.5}, kurtosis {kurtosis:.4}");
        assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(),
            "variance {var}"
        );
        assert!(
            (kurtosis - 3.0).abs() < 5.0 * (24.0 / nf).sqrt(),
            "kurtosis {kurtosis}"
        );

        // Kolmogorov–Smirnov distance evaluated on a 0.01-wide grid over [-6, 6].
        let mut hist = vec![0u64; 1201];
        for &v in &z {
            let bin = ((f64::from(v) + 6.0) * 100.0).floor().clamp(0.0, 1200.0) as usize;
            hist[bin] += 1;
        }
        let (mut below, mut ks) = (0u64, 0f64);
        for (k, &count) in hist.iter().enumerate().take(1200) {
            below += count;
            let edge = -6.0 + (k + 1) as f64 * 0.01;
            ks = ks.max((below as f64 / nf - normal_cdf(edge)).abs());
        }
        println!(
            "KS distance on the grid: {ks:.2e} (1/sqrt(n) = {:.2e})",
            1.0 / nf.sqrt()
        );
        assert!(ks < 1.5e-3, "KS distance {ks}");

        // Tail mass: P(|Z| > 3) = 2.6998e-3, P(|Z| > 4) = 6.334e-5 (binomial 5σ bounds).
        for (t, p) in [(3.0f32, 2.699_8e-3), (4.0, 6.334e-5)] {
            let count = z.iter().filter(|v| v.abs() > t).count() as f64;
            let sd = (nf * p * (1.0 - p)).sqrt();
            assert!(
                (count - nf * p).abs() < 5.0 * sd,
                "|z| > {t}: {count} vs {}",
                nf * p
            );
        }
        let max = z.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= 5.7683, "max |z| {max}");
    }

    #[test]
    fn lanes_streams_and_seeds_are_uncorrelated() {
        let n = 1usize << 20;
        let bound = 5.0 / (n as f64 / 4.0).sqrt();
        let mut z = vec![0f32; n];
        fill_normal(7, 0, 0, &mut z);
        // Lanes of one block (sharing a Philox block, and pairwise a radius) and neighbours.
        let lane = |k: usize| z.iter().skip(k).step_by(4).copied().collect::<Vec<f32>>();
        let lanes: Vec<Vec<f32>> = (0..4).map(lane).collect();
        let next_block: Vec<f32> = lanes[0][1..].to_vec();
        for a in 0..4 {
            for b in a + 1..4 {
                let r = pearson(&lanes[a], &lanes[b]);
                assert!(r.abs() < bound, "lanes {a},{b}: r = {r}");
            }
            let r = pearson(&lanes[a][..next_block.len()], &next_block);
            assert!(r.abs() < bound, "lane {a} vs next block: r = {r}");
        }
        // Box–Muller makes the two normals of a pair independent, not just uncorrelated: their
        // squares (which share the radius) must be uncorrelated as well.
        let sq = |v: &[f32]| v.iter().map(|x| x * x).collect::<Vec<f32>>();
        let r = pearson(&sq(&lanes[0]), &sq(&lanes[1]));
        assert!(r.abs() < bound, "squares of a pair: r = {r}");

        let bound = 5.0 / (n as f64).sqrt();
        for (seed, stream) in [(7u64, 1u64), (8, 0), (7, 1 << 32), (7 | 1 << 32, 0)] {
            let mut other = vec![0f32; n];
            fill_normal(seed, stream, 0, &mut other);
            let same = z.iter().zip(&other).filter(|(a, b)| a == b).count();
            assert!(
                same < 4,
                "seed {seed} stream {stream}: {same} equal samples"
            );
            let r = pearson(&z, &other);
            assert!(r.abs() < bound, "seed {seed} stream {stream}: r = {r}");
        }
    }
}
