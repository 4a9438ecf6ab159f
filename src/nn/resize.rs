//! Image resizing and the corruptions of a cascade's conditioning image, on host NCHW data:
//! area downsampling, nearest / bilinear upsampling with PyTorch's `align_corners=False`
//! convention (`fd.datasets.resize` is the numpy twin, checked against both), Gaussian blur,
//! and Gaussian noise conditioning augmentation (Ho et al. 2021).

use crate::error::Result;

/// Generator stream of the augmentation noise of conditioning images at sampling time.
pub const AUG_SAMPLE_STREAM: u64 = 0x4155_4700_0000_0000;
/// Generator stream of the augmentation noise in training (plus the step).
pub const AUG_TRAIN_STREAM: u64 = 0x4155_4754_0000_0000;
use crate::kernels::rng::fill_normal;
use crate::{shape_error, value_error};

/// Mean of `factor` x `factor` blocks: [B, C, H, W] → [B, C, H/f, W/f].
pub fn area_down(x: &[f32], shape: [usize; 4], factor: usize) -> Result<Vec<f32>> {
    let [b, c, h, w] = shape;
    if factor == 0 || !h.is_multiple_of(factor) || !w.is_multiple_of(factor) {
        shape_error!("a {h}x{w} image does not divide into {factor}x{factor} blocks");
    }
    let (ho, wo) = (h / factor, w / factor);
    let inv = 1.0 / (factor * factor) as f32;
    let mut out = vec![0f32; b * c * ho * wo];
    for (plane, o) in x.chunks_exact(h * w).zip(out.chunks_exact_mut(ho * wo)) {
        for y in 0..h {
            for xx in 0..w {
                o[(y / factor) * wo + xx / factor] += plane[y * w + xx];
            }
        }
        o.iter_mut().for_each(|v| *v *= inv);
    }
    Ok(out)
}

/// Interpolation weights along one axis, [out][(index, weight)], align_corners=False.
fn axis_weights(input: usize, output: usize, method: Upsample) -> Vec<Vec<(usize, f32)>> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| match method {
            Upsample::Nearest => {
                let i = ((o as f32 * scale).floor() as usize).min(input - 1);
                vec![(i, 1.0)]
            }
            Upsample::Bilinear => {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                let t = src - i0 as f32;
                vec![(i0, 1.0 - t), (i1, t)]
            }
        })
        .collect()
}

/// How a conditioning image is brought to the model's resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsample {
    Nearest,
    Bilinear,
}

impl Upsample {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nearest" => Ok(Upsample::Nearest),
            "bilinear" => Ok(Upsample::Bilinear),
            other => value_error!("upsample must be 'nearest' or 'bilinear', got {other:?}"),
        }
    }
}

/// [B, C, h, w] → [B, C, out_h, out_w] (separable; PyTorch's `interpolate` conventions).
pub fn resize(
    x: &[f32],
    shape: [usize; 4],
    out_h: usize,
    out_w: usize,
    method: Upsample,
) -> Result<Vec<f32>> {
    let [b, c, h, w] = shape;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 || x.len() != b * c * h * w {
        shape_error!(
            "cannot resize {shape:?} ({} values) to {out_h}x{out_w}",
            x.len()
        );
    }
    let wy = axis_weights(h, out_h, method);
    let wx = axis_weights(w, out_w, method);
    let mut out = vec![0f32; b * c * out_h * out_w];
    let mut rows = vec![0f32; out_h * w];
    for (plane, o) in x
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(out_h * out_w))
    {
        for (oy, ws) in wy.iter().enumerate() {
            let dst = &mut rows[oy * w..(oy + 1) * w];
            dst.fill(0.0);
            for &(iy, wt) in ws {
                for (d, &v) in dst.iter_mut().zip(&plane[iy * w..(iy + 1) * w]) {
                    *d += wt * v;
                }
            }
        }
        for oy in 0..out_h {
            let src = &rows[oy * w..(oy + 1) * w];
            for (ox, ws) in wx.iter().enumerate() {
                o[oy * out_w + ox] = ws.iter().map(|&(ix, wt)| wt * src[ix]).sum();
            }
        }
    }
    Ok(out)
}

/// Gaussian blur of each plane with standard deviation `sigma` (pixels), kernel radius
/// ⌈3σ⌉, edges reflected. Row i of the batch uses `sigma[i]` (0: unchanged).
pub fn gaussian_blur(x: &mut [f32], shape: [usize; 4], sigma: &[f32]) -> Result<()> {
    let [b, c, h, w] = shape;
    if sigma.len() != b {
        shape_error!("{} blur widths for a batch of {b}", sigma.len());
    }
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * (n - 1) - i };
            if n == 1 {
                return 0;
            }
        }
        i as usize
    };
    for (item, &s) in x.chunks_exact_mut(c * h * w).zip(sigma) {
        if s <= 0.0 {
            continue;
        }
        let r = (3.0 * s).ceil() as isize;
        let mut k: Vec<f32> = (-r..=r)
            .map(|d| (-(d * d) as f32 / (2.0 * s * s)).exp())
            .collect();
        let total: f32 = k.iter().sum();
        k.iter_mut().for_each(|v| *v /= total);
        for plane in item.chunks_exact_mut(h * w) {
            let src = plane.to_vec();
            let mut tmp = vec![0f32; h * w];
            for y in 0..h {
                for xx in 0..w {
                    tmp[y * w + xx] = k
                        .iter()
                        .enumerate()
                        .map(|(j, &kv)| kv * src[y * w + reflect(xx as isize + j as isize - r, w)])
                        .sum();
                }
            }
            for y in 0..h {
                for xx in 0..w {
                    plane[y * w + xx] = k
                        .iter()
                        .enumerate()
                        .map(|(j, &kv)| kv * tmp[reflect(y as isize + j as isize - r, h) * w + xx])
                        .sum();
                }
            }
        }
    }
    Ok(())
}

/// ᾱ(s) of the augmentation's variance-preserving corruption: cos²(π s / 2), so level 0
/// leaves the image alone and level 1 replaces it by noise.
pub fn aug_alpha_bar(s: f32) -> f32 {
    let c = (std::f32::consts::FRAC_PI_2 * s).cos();
    c * c
}

/// Noise conditioning augmentation: row i of x [B, ...] becomes √ᾱ(sᵢ) x + √(1 − ᾱ(sᵢ)) ε
/// with ε from the generator's (seed, stream).
pub fn augment(x: &mut [f32], rows: usize, levels: &[f32], seed: u64, stream: u64) -> Result<()> {
    if levels.len() != rows || rows == 0 || !x.len().is_multiple_of(rows) {
        shape_error!("{} augmentation levels for {rows} rows", levels.len());
    }
    if let Some(bad) = levels.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        value_error!("augmentation levels must lie in [0, 1], got {bad}");
    }
    let mut noise = vec![0f32; x.len()];
    fill_normal(seed, stream, 0, &mut noise);
    let per = x.len() / rows;
    for ((row, n), &s) in x
        .chunks_exact_mut(per)
        .zip(noise.chunks_exact(per))
        .zip(levels)
    {
        let a = aug_alpha_bar(s);
        let (sa, sn) = (a.sqrt(), (1.0 - a).max(0.0).sqrt());
        for (v, &e) in row.iter_mut().zip(n) {
            *v = sa * *v + sn * e;
        }
    }
    Ok(())
}
