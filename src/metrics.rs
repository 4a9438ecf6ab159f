//! Sample-quality metrics on row-major sample matrices [N, D]: the Fréchet distance between
//! Gaussian fits (FID when the rows are Inception features; Heusel et al. 2017) and the unbiased
//! kernel maximum mean discrepancy with Gaussian (RBF) kernels (Gretton et al. 2012).
//!
//! The Fréchet distance needs tr((C1^{1/2} C2 C1^{1/2})^{1/2}). The reference FID code takes
//! scipy's `sqrtm` of the non-symmetric product C1 C2, which can come back complex or inaccurate;
//! here both square roots go through symmetric eigendecompositions (Householder
//! tridiagonalisation, then implicit QL), which stay real, with eigenvalues that rounding pushed
//! below zero clamped at 0.
//!
//! Every result is identical for any number of threads: parallel work is split by rows, and
//! partial sums are added in a fixed order.

use rayon::prelude::*;

use crate::error::Result;
use crate::{shape_error, value_error};

/// Below this many multiply-adds a computation stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Rows of centred data converted to f64 at a time while accumulating a covariance.
const COV_BLOCK_ROWS: usize = 64;
/// Rows of a product computed together, so each row of the right factor is read once per group.
const MATMUL_ROW_GROUP: usize = 8;
/// Width of the column panels that the eigensolver's rotations sweep (see [`to_panels`]).
const PANEL_COLUMNS: usize = 32;
/// Columns of a vector-matrix product vᵀ Q computed by one task.
const REDUCTION_COLUMNS: usize = 64;
/// The median heuristic looks at no more than this many evenly spaced rows of the pooled sample.
pub const MEDIAN_HEURISTIC_MAX_POINTS: usize = 1000;
/// Largest asymmetry |C_ij - C_ji| tolerated in a covariance argument, relative to max |C|.
const SYMMETRY_TOLERANCE: f64 = 1e-5;
/// Implicit QL iterations allowed per eigenvalue (two or three are typical).
const QL_MAX_ITERATIONS: usize = 60;

fn parallel_for(work: usize) -> bool {
    work >= PARALLEL_MIN_WORK && crate::kernels::parallel_allowed()
}

fn check_samples(x: &[f32], n: usize, d: usize, name: &str) -> Result<()> {
    if x.len() != n * d {
        shape_error!(
            "{name} has {} values but N = {n} rows of D = {d} need {}",
            x.len(),
            n * d
        );
    }
    if let Some(at) = x.iter().position(|v| !v.is_finite()) {
        value_error!(
            "{name} contains NaN or Inf (row {}, column {})",
            at / d,
            at % d
        );
    }
    Ok(())
}

/// Mean [D] and unbiased (N - 1) covariance [D, D] of the rows of `x` ([N, D], row-major), in
/// f64. Two passes: the mean first, then sums of products of centred values, so a large common
/// offset costs no accuracy. Needs N >= 2.
pub fn mean_cov(x: &[f32], n: usize, d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if d == 0 {
        value_error!("x rows must have at least one element (D >= 1), got D = 0");
    }
    if n < 2 {
        value_error!("x has {n} row(s) but a covariance needs at least 2");
    }
    check_samples(x, n, d, "x")?;
    let mut mean = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (s, &v) in mean.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    for s in &mut mean {
        *s /= n as f64;
    }

    let mut cov = vec![0.0; d * d];
    let parallel = d >= 64 && parallel_for(n * d * d / 2);
    let mut centred = Vec::with_capacity(COV_BLOCK_ROWS * d);
    for rows in x.chunks(COV_BLOCK_ROWS * d) {
        centred.clear();
        for row in rows.chunks_exact(d) {
            centred.extend(row.iter().zip(&mean).map(|(&v, &mu)| v as f64 - mu));
        }
        add_gram_upper(&centred, d, &mut cov, parallel);
    }
    let scale = 1.0 / (n - 1) as f64;
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] * scale;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    Ok((mean, cov))
}

/// Adds Σ_r row_r row_rᵀ over the rows of `rows` ([R, D]) to the upper triangle of `out`
/// ([D, D]). Each entry accumulates over r in order, whatever the split over threads.
fn add_gram_upper(rows: &[f64], d: usize, out: &mut [f64], parallel: bool) {
    let accumulate = |(i, out_row): (usize, &mut [f64])| {
        for row in rows.chunks_exact(d) {
            let ri = row[i];
            for (o, &rj) in out_row[i..].iter_mut().zip(&row[i..]) {
                *o += ri * rj;
            }
        }
    };
    if parallel {
        out.par_chunks_mut(d).enumerate().for_each(accumulate);
    } else {
        out.chunks_mut(d).enumerate().for_each(accumulate);
    }
}

/// The Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (the squared 2-Wasserstein
/// distance between the Gaussians):
/// ||mu1 - mu2||² + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2}).
///
/// `mu1`, `mu2` are [D]; `cov1`, `cov2` are [D, D], row-major, symmetric positive semi-definite
/// (asymmetry beyond rounding is an error; the symmetric part is used). Eigenvalues that
/// rounding pushed below zero count as 0, and so does a result that rounding pushed below 0.
/// Costs O(D³): under a second at D = 512, about half a minute at D = 2048 on two cores.
pub fn frechet_distance(
    mu1: &[f64],
    cov1: &[f64],
    mu2: &[f64],
    cov2: &[f64],
    d: usize,
) -> Result<f64> {
    if d == 0 {
        value_error!("frechet_distance needs dimension D >= 1, got D = 0");
    }
    for (name, mu) in [("mu1", mu1), ("mu2", mu2)] {
        if mu.len() != d {
            shape_error!(
                "{name} has {} values but the dimension is D = {d}",
                mu.len()
            );
        }
        if mu.iter().any(|v| !v.is_finite()) {
            value_error!("{name} contains NaN or Inf");
        }
    }
    let c1 = symmetric_covariance(cov1, d, "cov1")?;
    let c2 = symmetric_covariance(cov2, d, "cov2")?;
    let mean_term: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    let trace1: f64 = (0..d).map(|i| c1[i * d + i]).sum();
    let trace2: f64 = (0..d).map(|i| c2[i * d + i]).sum();
    let cross = trace_sqrt_product(c1, &c2, d)?;
    let distance = mean_term + trace1 + trace2 - 2.0 * cross;
    if !distance.is_finite() {
        value_error!(
            "frechet_distance is not finite: the covariance entries are too large to square"
        );
    }
    Ok(distance.max(0.0))
}

/// The Fréchet distance between the Gaussian fits (mean, unbiased covariance) of the rows of `x`
/// ([N, D]) and of `y` ([M, D]); N and M are the lengths divided by `d`, and both must be >= 2.
pub fn frechet_distance_samples(x: &[f32], y: &[f32], d: usize) -> Result<f64> {
    if d == 0 {
        value_error!("frechet_distance needs rows of at least one element (D >= 1), got D = 0");
    }
    for (name, s) in [("x", x), ("y", y)] {
        if s.len() % d != 0 {
            shape_error!(
                "{name} has {} values, which is not a whole number of rows of D = {d}",
                s.len()
            );
        }
        if s.len() / d < 2 {
            value_error!(
                "frechet_distance fits a covariance to {name}, which needs at least 2 rows, got {}",
                s.len() / d
            );
        }
    }
    let (mu1, cov1) = mean_cov(x, x.len() / d, d)?;
    let (mu2, cov2) = mean_cov(y, y.len() / d, d)?;
    frechet_distance(&mu1, &cov1, &mu2, &cov2, d)
}

/// Checks a covariance argument ([D, D]: finite, symmetric up to rounding, non-negative
/// variances) and returns its symmetric part.
fn symmetric_covariance(cov: &[f64], d: usize, name: &str) -> Result<Vec<f64>> {
    if cov.len() != d * d {
        shape_error!(
            "{name} has {} values but a D x D covariance with D = {d} needs {}",
            cov.len(),
            d * d
        );
    }
    if cov.iter().any(|v| !v.is_finite()) {
        value_error!("{name} contains NaN or Inf");
    }
    let largest = cov.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tolerance = SYMMETRY_TOLERANCE * largest;
    let mut sym = cov.to_vec();
    for i in 0..d {
        if cov[i * d + i] < -tolerance {
            value_error!(
                "{name} is not a covariance: its diagonal entry {i} is negative ({})",
                cov[i * d + i]
            );
        }
        for j in i + 1..d {
            let (a, b) = (cov[i * d + j], cov[j * d + i]);
            if (a - b).abs() > tolerance {
                value_error!(
                    "{name} is not symmetric: entry ({i}, {j}) is {a} but entry ({j}, {i}) is {b}"
                );
            }
            let mid = 0.5 * (a + b);
            sym[i * d + j] = mid;
            sym[j * d + i] = mid;
        }
    }
    Ok(sym)
}

/// tr((C1^{1/2} C2 C1^{1/2})^{1/2}) for symmetric positive semi-definite C1, C2 ([D, D]).
///
/// With C1 = V Λ Vᵀ and W = V Λ^{1/2}, C1^{1/2} C2 C1^{1/2} = V (Wᵀ C2 W) Vᵀ, so the trace is
/// Σ sqrt(eig(Wᵀ C2 W)), and Wᵀ C2 W is symmetric.
fn trace_sqrt_product(c1: Vec<f64>, c2: &[f64], d: usize) -> Result<f64> {
    let (lambda, mut wt) = symmetric_eigen(c1, d)?;
    for (row, l) in wt.chunks_exact_mut(d).zip(&lambda) {
        let root = l.max(0.0).sqrt();
        for v in row {
            *v *= root;
        }
    }
    let c2_w = matmul(c2, &transpose(&wt, d), d);
    let mut m = matmul(&wt, &c2_w, d);
    for i in 0..d {
        for j in i + 1..d {
            let mid = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = mid;
            m[j * d + i] = mid;
        }
    }
    let mu = symmetric_eigenvalues(m, d)?;
    Ok(mu.iter().map(|&l| l.max(0.0).sqrt()).sum())
}

fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for (i, row) in a.chunks_exact(n).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * n + i] = v;
        }
    }
    t
}

/// A B for square row-major A, B ([n, n]). Each entry sums over k in order.
fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    let group = |(g, c_rows): (usize, &mut [f64])| {
        let first = g * MATMUL_ROW_GROUP;
        for (k, b_row) in b.chunks_exact(n).enumerate() {
            for (r, c_row) in c_rows.chunks_exact_mut(n).enumerate() {
                let a_ik = a[(first + r) * n + k];
                for (cj, &bj) in c_row.iter_mut().zip(b_row) {
                    *cj += a_ik * bj;
                }
            }
        }
    };
    if parallel_for(n * n * n) {
        c.par_chunks_mut(MATMUL_ROW_GROUP * n)
            .enumerate()
            .for_each(group);
    } else {
        c.chunks_mut(MATMUL_ROW_GROUP * n)
            .enumerate()
            .for_each(group);
    }
    c
}

/// Eigenvalues and eigenvectors of the symmetric matrix `a` ([n, n], row-major): returns the
/// eigenvalues (unordered) and Vᵀ ([n, n], row-major) whose row j is the unit eigenvector of
/// eigenvalue j.
fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut diag, mut off, reflectors) = tridiagonalize(&mut a, n);
    let mut panels = to_panels(&accumulate_reflectors(&reflectors, n), n);
    tridiagonal_ql(&mut diag, &mut off, Some(&mut panels))?;
    Ok((diag, from_panels(&panels, n)))
}

/// Zᵀ for Z ([n, n], row-major), stored as panels of up to [`PANEL_COLUMNS`] columns of Zᵀ,
/// each panel [n, width] contiguous: a rotation of columns (i, i+1) of Z is then two contiguous
/// runs in every panel (vectorisable), and panels rotate in parallel.
fn to_panels(z: &[f64], n: usize) -> Vec<f64> {
    let mut panels = vec![0.0; n * n];
    for (p, panel) in panels.chunks_mut(PANEL_COLUMNS * n).enumerate() {
        let (first, width) = (p * PANEL_COLUMNS, panel.len() / n);
        for (j, run) in panel.chunks_exact_mut(width).enumerate() {
            for (k, zt) in run.iter_mut().enumerate() {
                *zt = z[(first + k) * n + j];
            }
        }
    }
    panels
}

/// Zᵀ ([n, n], row-major) from its panels.
fn from_panels(panels: &[f64], n: usize) -> Vec<f64> {
    let mut zt = vec![0.0; n * n];
    for (p, panel) in panels.chunks(PANEL_COLUMNS * n).enumerate() {
        let (first, width) = (p * PANEL_COLUMNS, panel.len() / n);
        for (j, run) in panel.chunks_exact(width).enumerate() {
            zt[j * n + first..j * n + first + width].copy_from_slice(run);
        }
    }
    zt
}

/// Eigenvalues (unordered) of the symmetric matrix `a` ([n, n], row-major).
fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    let (mut diag, mut off, _) = tridiagonalize(&mut a, n);
    tridiagonal_ql(&mut diag, &mut off, None)?;
    Ok(diag)
}

/// A Householder reflector H = I - beta v vᵀ acting on coordinates first.. of an n-vector.
struct Reflector {
    first: usize,
    beta: f64,
    v: Vec<f64>,
}

/// Householder reduction of the symmetric `a` ([n, n], row-major; overwritten) to the
/// tridiagonal T = Qᵀ A Q with Q = H_0 H_1 ... H_{n-3} (Golub & Van Loan, Matrix Computations,
/// algorithm 8.3.1). Returns T's diagonal, its off-diagonal (off[i] = T[i][i+1]; off[n-1] = 0)
/// and the reflectors.
fn tridiagonalize(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<Reflector>) {
    let mut off = vec![0.0; n];
    let mut reflectors = Vec::with_capacity(n.saturating_sub(2));
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        let first = k + 1;
        let m = n - first;
        // x = A[k+1.., k], read from row k by symmetry.
        let mut v = a[k * n + first..(k + 1) * n].to_vec();
        let alpha = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if alpha == 0.0 {
            continue;
        }
        // v = x + sign(x0) alpha e1 (no cancellation), so H x = -sign(x0) alpha e1 and
        // vᵀv = 2 alpha (alpha + |x0|).
        let sign = if v[0] >= 0.0 { 1.0 } else { -1.0 };
        let beta = 1.0 / (alpha * (alpha + v[0].abs()));
        v[0] += sign * alpha;
        off[k] = -sign * alpha;

        // A22 <- H A22 H = A22 - v wᵀ - w vᵀ with p = beta A22 v, w = p - (beta pᵀv / 2) v.
        let parallel = parallel_for(m * m);
        let p = &mut p[..m];
        let a22: &[f64] = &a[first * n..];
        let row_times_v =
            |(i, pi): (usize, &mut f64)| *pi = beta * dot(&a22[i * n + first..(i + 1) * n], &v);
        if parallel {
            p.par_iter_mut().enumerate().for_each(row_times_v);
        } else {
            p.iter_mut().enumerate().for_each(row_times_v);
        }
        let half = 0.5 * beta * dot(p, &v);
        for (pi, vi) in p.iter_mut().zip(&v) {
            *pi -= half * vi;
        }
        let w: &[f64] = p;
        let update = |(i, row): (usize, &mut [f64])| {
            let (vi, wi) = (v[i], w[i]);
            for ((x, &vj), &wj) in row[first..].iter_mut().zip(&v).zip(w) {
                *x -= vi * wj + wi * vj;
            }
        };
        if parallel {
            a[first * n..]
                .par_chunks_mut(n)
                .enumerate()
                .for_each(update);
        } else {
            a[first * n..].chunks_mut(n).enumerate().for_each(update);
        }
        reflectors.push(Reflector { first, beta, v });
    }
    if n >= 2 {
        off[n - 2] = a[(n - 2) * n + n - 1];
    }
    let diag = (0..n).map(|i| a[i * n + i]).collect();
    (diag, off, reflectors)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Q = H_0 H_1 ... H_{n-3} ([n, n], row-major), built from the right end: H_k acts on rows
/// k+1.. of the partial product, which is the identity outside rows and columns k+1...
fn accumulate_reflectors(reflectors: &[Reflector], n: usize) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        q[i * n + i] = 1.0;
    }
    let mut u = vec![0.0; n];
    for h in reflectors.iter().rev() {
        let first = h.first;
        let parallel = parallel_for((n - first) * (n - first));
        // uᵀ = vᵀ Q[first.., first..], each entry summed over rows in order.
        let u = &mut u[first..];
        let q_sub: &[f64] = &q[first * n..];
        let columns = |(c, u_chunk): (usize, &mut [f64])| {
            u_chunk.fill(0.0);
            let start = first + c * REDUCTION_COLUMNS;
            for (row, &vi) in q_sub.chunks_exact(n).zip(&h.v) {
                for (uj, &qj) in u_chunk.iter_mut().zip(&row[start..]) {
                    *uj += vi * qj;
                }
            }
        };
        if parallel {
            u.par_chunks_mut(REDUCTION_COLUMNS)
                .enumerate()
                .for_each(columns);
        } else {
            u.chunks_mut(REDUCTION_COLUMNS)
                .enumerate()
                .for_each(columns);
        }
        let u: &[f64] = u;
        let update = |(row, &vi): (&mut [f64], &f64)| {
            let scale = h.beta * vi;
            for (x, &uj) in row[first..].iter_mut().zip(u) {
                *x -= scale * uj;
            }
        };
        if parallel {
            q[first * n..]
                .par_chunks_mut(n)
                .zip(h.v.par_iter())
                .for_each(update);
        } else {
            q[first * n..]
                .chunks_mut(n)
                .zip(h.v.iter())
                .for_each(update);
        }
    }
    q
}

/// Diagonalises the symmetric tridiagonal (diag, off) in place by implicit QL with shifts
/// (Wilkinson & Reinsch, Handbook for Automatic Computation II, tql2): `diag` becomes the
/// eigenvalues. If `z` (panels of Zᵀ, see [`to_panels`]) is given, every rotation is applied to
/// the columns of Z, so Z = Q on entry becomes the eigenvectors of Q T Qᵀ (column j <-> diag[j]).
fn tridiagonal_ql(diag: &mut [f64], off: &mut [f64], mut z: Option<&mut [f64]>) -> Result<()> {
    let n = diag.len();
    let mut rotations: Vec<(usize, f64, f64)> = Vec::with_capacity(n);
    for l in 0..n {
        let mut iterations = 0;
        loop {
            // The first negligible off-diagonal at or after l splits off an unreduced block l..=m.
            let mut m = l;
            while m + 1 < n {
                let scale = diag[m].abs() + diag[m + 1].abs();
                if off[m].abs() <= f64::EPSILON * scale {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iterations += 1;
            if iterations > QL_MAX_ITERATIONS {
                value_error!(
                    "the symmetric eigensolver did not converge after {QL_MAX_ITERATIONS} iterations for eigenvalue {l}"
                );
            }
            // Shift from the leading 2x2 block, then chase the bulge from m up to l.
            let mut g = (diag[l + 1] - diag[l]) / (2.0 * off[l]);
            let mut r = g.hypot(1.0);
            g = diag[m] - diag[l] + off[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut underflow = false;
            rotations.clear();
            for i in (l..m).rev() {
                let f = s * off[i];
                let b = c * off[i];
                r = f.hypot(g);
                off[i + 1] = r;
                if r == 0.0 {
                    diag[i + 1] -= p;
                    off[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = diag[i + 1] - p;
                r = (diag[i] - g) * s + 2.0 * c * b;
                p = s * r;
                diag[i + 1] = g + p;
                g = c * r - b;
                rotations.push((i, c, s));
            }
            if let Some(z) = z.as_deref_mut() {
                apply_rotations(z, n, &rotations);
            }
            if !underflow {
                diag[l] -= p;
                off[l] = g;
                off[m] = 0.0;
            }
        }
    }
    Ok(())
}

/// Applies the plane rotations (i, c, s), in order, to columns (i, i+1) of Z, held as panels of
/// Zᵀ (rows (i, i+1) of each panel).
fn apply_rotations(panels: &mut [f64], n: usize, rotations: &[(usize, f64, f64)]) {
    let rotate_panel = |panel: &mut [f64]| {
        let width = panel.len() / n;
        for &(i, c, s) in rotations {
            let (upper, lower) = panel.split_at_mut((i + 1) * width);
            let row_i = &mut upper[i * width..];
            for (a, b) in row_i.iter_mut().zip(&mut lower[..width]) {
                let f = *b;
                *b = s * *a + c * f;
                *a = c * *a - s * f;
            }
        }
    };
    if parallel_for(n * rotations.len() * 6) {
        panels
            .par_chunks_mut(PANEL_COLUMNS * n)
            .for_each(rotate_panel);
    } else {
        panels.chunks_mut(PANEL_COLUMNS * n).for_each(rotate_panel);
    }
}

/// Unbiased estimate of the squared maximum mean discrepancy between the distributions of the
/// rows of `x` ([N, D]) and `y` ([M, D]), with the kernel k(a, b) = Σ_h exp(-||a - b||² / (2h²))
/// summed over `bandwidths`:
/// MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)
/// (Gretton et al. 2012, eq. 3). Being unbiased, it scatters around 0 (and can be slightly
/// negative) for two samples of one distribution. Needs N, M >= 2.
///
/// With `bandwidths` empty, one bandwidth is chosen by the median heuristic,
/// [`median_heuristic_bandwidth`]. Costs O((N + M)² D).
pub fn mmd_rbf(
    x: &[f32],
    y: &[f32],
    n: usize,
    m: usize,
    d: usize,
    bandwidths: &[f64],
) -> Result<f64> {
    if d == 0 {
        value_error!("mmd needs rows of at least one element (D >= 1), got D = 0");
    }
    if n < 2 || m < 2 {
        value_error!("mmd needs at least 2 rows in each sample, got N = {n} and M = {m}");
    }
    check_samples(x, n, d, "x")?;
    check_samples(y, m, d, "y")?;
    if let Some(h) = bandwidths.iter().find(|h| !(h.is_finite() && **h > 0.0)) {
        value_error!("bandwidths must be positive and finite, got {h} in {bandwidths:?}");
    }
    let chosen;
    let bandwidths = if bandwidths.is_empty() {
        chosen = [median_heuristic_bandwidth(x, y, n, m, d)?];
        &chosen[..]
    } else {
        bandwidths
    };
    let gammas: Vec<f64> = bandwidths.iter().map(|h| 0.5 / (h * h)).collect();
    let kernel = |a: &[f32], b: &[f32]| -> f64 {
        let sq = squared_distance(a, b);
        gammas.iter().map(|g| (-g * sq).exp()).sum()
    };
    let parallel = parallel_for((n + m) * (n + m) * d * bandwidths.len());
    // Mean of k over distinct pairs: each unordered pair once (j > i), counted twice.
    let within = |s: &[f32], count: usize| -> f64 {
        let row_sum = |i: usize| -> f64 {
            let a = &s[i * d..(i + 1) * d];
            s[(i + 1) * d..].chunks_exact(d).map(|b| kernel(a, b)).sum()
        };
        2.0 * ordered_sum(count, parallel, row_sum) / (count * (count - 1)) as f64
    };
    let kxx = within(x, n);
    let kyy = within(y, m);
    let cross_row_sum = |i: usize| -> f64 {
        let a = &x[i * d..(i + 1) * d];
        y.chunks_exact(d).map(|b| kernel(a, b)).sum()
    };
    let kxy = ordered_sum(n, parallel, cross_row_sum) / (n * m) as f64;
    Ok(kxx + kyy - 2.0 * kxy)
}

/// Σ_{i < count} term(i), added in order of i whether or not the terms ran in parallel.
fn ordered_sum(count: usize, parallel: bool, term: impl Fn(usize) -> f64 + Sync + Send) -> f64 {
    if parallel {
        let terms: Vec<f64> = (0..count).into_par_iter().map(term).collect();
        terms.iter().sum()
    } else {
        (0..count).map(term).sum()
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
        .sum()
}

/// The median heuristic bandwidth (Gretton et al. 2012): the median Euclidean distance between
/// distinct rows of the pooled sample [x; y] (x: [N, D], y: [M, D]), the mean of the two middle
/// distances when their number is even (as `numpy.median`). Above
/// [`MEDIAN_HEURISTIC_MAX_POINTS`] pooled rows, only that many evenly spaced rows of the pooled
/// sample are used: row floor(t (N + M) / K) for t < K.
pub fn median_heuristic_bandwidth(
    x: &[f32],
    y: &[f32],
    n: usize,
    m: usize,
    d: usize,
) -> Result<f64> {
    if d == 0 {
        value_error!("the median heuristic needs rows of at least one element (D >= 1)");
    }
    check_samples(x, n, d, "x")?;
    check_samples(y, m, d, "y")?;
    let pooled = n + m;
    if pooled < 2 {
        value_error!("the median heuristic needs at least 2 rows in all, got {pooled}");
    }
    let count = pooled.min(MEDIAN_HEURISTIC_MAX_POINTS);
    let points: Vec<&[f32]> = (0..count)
        .map(|t| {
            let p = t * pooled / count;
            if p < n {
                &x[p * d..(p + 1) * d]
            } else {
                &y[(p - n) * d..(p - n + 1) * d]
            }
        })
        .collect();
    let row_distances = |i: usize| -> Vec<f64> {
        points[i + 1..]
            .iter()
            .map(|b| squared_distance(points[i], b).sqrt())
            .collect()
    };
    let mut distances: Vec<f64> = if parallel_for(count * count * d / 2) {
        (0..count)
            .into_par_iter()
            .flat_map_iter(row_distances)
            .collect()
    } else {
        (0..count).flat_map(row_distances).collect()
    };
    let median = median(&mut distances);
    if median <= 0.0 {
        value_error!(
            "the median heuristic gives bandwidth 0 (at least half of the pairwise distances of the pooled sample are 0); pass bandwidths explicitly"
        );
    }
    Ok(median)
}

/// The median of a non-empty slice (reordered), as `numpy.median`.
fn median(values: &mut [f64]) -> f64 {
    let len = values.len();
    let (below, upper, _) = values.select_nth_unstable_by(len / 2, f64::total_cmp);
    let upper = *upper;
    if len % 2 == 1 {
        upper
    } else {
        let lower = below.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        0.5 * (lower + upper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 and Box–Muller: test data without depending on the crate's generator.
    struct TestRng(u64);

    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u1, u2) = (self.uniform(), self.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
        fn normals(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.normal()).collect()
        }
    }

    fn gaussian_sample(rng: &mut TestRng, n: usize, d: usize, shift: f64) -> Vec<f32> {
        (0..n * d).map(|_| (rng.normal() + shift) as f32).collect()
    }

    fn naive_matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                c[i * n + j] = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
            }
        }
        c
    }

    /// A random symmetric positive definite matrix A Aᵀ / n + floor I.
    fn random_spd(rng: &mut TestRng, n: usize, floor: f64) -> Vec<f64> {
        let a = rng.normals(n * n);
        let mut c = naive_matmul(&a, &transpose(&a, n), n);
        for (i, v) in c.iter_mut().enumerate() {
            *v /= n as f64;
            if i % (n + 1) == 0 {
                *v += floor;
            }
        }
        c
    }

    /// A random orthogonal matrix: Gram–Schmidt on the rows of a Gaussian matrix.
    fn random_orthogonal(rng: &mut TestRng, n: usize) -> Vec<f64> {
        let mut q = rng.normals(n * n);
        for i in 0..n {
            for j in 0..i {
                let proj = dot(&q[i * n..(i + 1) * n], &q[j * n..(j + 1) * n]);
                for k in 0..n {
                    q[i * n + k] -= proj * q[j * n + k];
                }
            }
            let norm = dot(&q[i * n..(i + 1) * n], &q[i * n..(i + 1) * n]).sqrt();
            for k in 0..n {
                q[i * n + k] /= norm;
            }
        }
        q
    }

    /// Q diag(values) Qᵀ.
    fn with_eigenvalues(q: &[f64], values: &[f64], n: usize) -> Vec<f64> {
        let mut scaled = q.to_vec();
        for row in scaled.chunks_exact_mut(n) {
            for (v, l) in row.iter_mut().zip(values) {
                *v *= l;
            }
        }
        naive_matmul(&scaled, &transpose(q, n), n)
    }

    /// Inverse by Gauss–Jordan elimination with partial pivoting.
    fn inverse(a: &[f64], n: usize) -> Vec<f64> {
        let mut m = a.to_vec();
        let mut inv = vec![0.0; n * n];
        for i in 0..n {
            inv[i * n + i] = 1.0;
        }
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&r, &s| m[r * n + col].abs().total_cmp(&m[s * n + col].abs()))
                .unwrap();
            for k in 0..n {
                m.swap(col * n + k, pivot * n + k);
                inv.swap(col * n + k, pivot * n + k);
            }
            let p = m[col * n + col];
            for k in 0..n {
                m[col * n + k] /= p;
                inv[col * n + k] /= p;
            }
            for r in 0..n {
                if r != col {
                    let f = m[r * n + col];
                    for k in 0..n {
                        m[r * n + k] -= f * m[col * n + k];
                        inv[r * n + k] -= f * inv[col * n + k];
                    }
                }
            }
        }
        inv
    }

    /// tr(sqrtm(C1 C2)) by the Denman–Beavers iteration, which uses no eigendecomposition.
    /// C1 C2 is similar to C1^{1/2} C2 C1^{1/2}, so the trace is the same.
    fn trace_sqrtm_denman_beavers(c1: &[f64], c2: &[f64], n: usize) -> f64 {
        let mut y = naive_matmul(c1, c2, n);
        let mut z = vec![0.0; n * n];
        for i in 0..n {
            z[i * n + i] = 1.0;
        }
        for _ in 0..100 {
            let (y_inv, z_inv) = (inverse(&y, n), inverse(&z, n));
            let next_y: Vec<f64> = y.iter().zip(&z_inv).map(|(a, b)| 0.5 * (a + b)).collect();
            let next_z: Vec<f64> = z.iter().zip(&y_inv).map(|(a, b)| 0.5 * (a + b)).collect();
            let change: f64 = next_y.iter().zip(&y).map(|(a, b)| (a - b).abs()).sum();
            y = next_y;
            z = next_z;
            if change < 1e-15 {
                break;
            }
        }
        (0..n).map(|i| y[i * n + i]).sum()
    }

    fn check_eigendecomposition(a: &[f64], n: usize) {
        let (values, vt) = symmetric_eigen(a.to_vec(), n).unwrap();
        let v = transpose(&vt, n);
        let scale = a.iter().fold(1e-300f64, |m, x| m.max(x.abs()));
        let vtv = naive_matmul(&transpose(&v, n), &v, n);
        let rebuilt = with_eigenvalues(&v, &values, n);
        for i in 0..n {
            for j in 0..n {
                let identity = if i == j { 1.0 } else { 0.0 };
                assert!((vtv[i * n + j] - identity).abs() < 1e-12 * n as f64);
                assert!((rebuilt[i * n + j] - a[i * n + j]).abs() < 1e-12 * scale * n as f64);
            }
        }
        let mut only_values = symmetric_eigenvalues(a.to_vec(), n).unwrap();
        let mut values = values;
        only_values.sort_by(f64::total_cmp);
        values.sort_by(f64::total_cmp);
        for (p, q) in only_values.iter().zip(&values) {
            assert!((p - q).abs() < 1e-12 * scale * n as f64);
        }
    }

    #[test]
    fn test_symmetric_eigen_reconstructs_the_matrix_with_orthonormal_vectors() {
        let mut rng = TestRng(1);
        for n in [1, 2, 3, 7, 40, 260] {
            let a = random_spd(&mut rng, n, 0.0);
            // Make it indefinite, too.
            let shifted: Vec<f64> = a
                .iter()
                .enumerate()
                .map(|(i, v)| if i % (n + 1) == 0 { v - 0.5 } else { *v })
                .collect();
            check_eigendecomposition(&shifted, n);
        }
    }

    #[test]
    fn test_symmetric_eigen_handles_diagonal_repeated_and_zero_matrices() {
        check_eigendecomposition(&[3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0], 3);
        check_eigendecomposition(&[0.0; 16], 4);
        let mut rng = TestRng(2);
        let q = random_orthogonal(&mut rng, 6);
        let a = with_eigenvalues(&q, &[2.0, 2.0, 2.0, 1.0, 1.0, 0.0], 6);
        check_eigendecomposition(&a, 6);
        let (values, _) = symmetric_eigen(a, 6).unwrap();
        let mut values = values;
        values.sort_by(f64::total_cmp);
        for (got, want) in values.iter().zip([0.0, 1.0, 1.0, 2.0, 2.0, 2.0]) {
            assert!((got - want).abs() < 1e-13, "{values:?}");
        }
    }

    #[test]
    fn test_mean_cov_matches_the_definition_and_survives_a_large_offset() {
        let mut rng = TestRng(3);
        let (n, d) = (300, 5);
        let x = gaussian_sample(&mut rng, n, d, 0.0);
        let (mean, cov) = mean_cov(&x, n, d).unwrap();
        for j in 0..d {
            let m: f64 = (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64;
            assert!((mean[j] - m).abs() < 1e-12);
            for k in 0..d {
                let c: f64 = (0..n)
                    .map(|i| (x[i * d + j] as f64 - m) * (x[i * d + k] as f64 - mean[k]))
                    .sum::<f64>()
                    / (n - 1) as f64;
                assert!((cov[j * d + k] - c).abs() < 1e-12);
                assert_eq!(cov[j * d + k], cov[k * d + j]);
            }
        }
        // 1e4 + a spread of 2^-9 is exact in f32, so the covariance must be exact too.
        let offset: Vec<f32> = [0.0f32, 1.0, 2.0, 3.0]
            .iter()
            .map(|v| 1e4 + v / 512.0)
            .collect();
        let (mean, cov) = mean_cov(&offset, 4, 1).unwrap();
        assert!((mean[0] - (1e4 + 1.5 / 512.0)).abs() < 1e-9);
        let want = (2.25 + 0.25 + 0.25 + 2.25) / 3.0 / 512.0 / 512.0;
        assert!((cov[0] - want).abs() < 1e-15, "{} vs {want}", cov[0]);
    }

    #[test]
    fn test_mean_cov_large_dimension_matches_small_blocks() {
        // D >= 64 and enough rows to take the parallel path and several row blocks.
        let mut rng = TestRng(4);
        let (n, d) = (200, 70);
        let x = gaussian_sample(&mut rng, n, d, 1.0);
        let (_, cov) = mean_cov(&x, n, d).unwrap();
        let mut worst: f64 = 0.0;
        for j in 0..d {
            for k in 0..d {
                let (mj, mk) = (
                    (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64,
                    (0..n).map(|i| x[i * d + k] as f64).sum::<f64>() / n as f64,
                );
                let c: f64 = (0..n)
                    .map(|i| (x[i * d + j] as f64 - mj) * (x[i * d + k] as f64 - mk))
                    .sum::<f64>()
                    / (n - 1) as f64;
                worst = worst.max((cov[j * d + k] - c).abs());
            }
        }
        assert!(worst < 1e-12, "{worst}");
    }

    #[test]
    fn test_frechet_of_identical_gaussians_is_zero() {
        let mut rng = TestRng(5);
        for d in [1, 4, 30] {
            let mu = rng.normals(d);
            let c = random_spd(&mut rng, d, 0.1);
            let fd = frechet_distance(&mu, &c, &mu, &c, d).unwrap();
            assert!(fd.abs() < 1e-10, "D = {d}: {fd}");
        }
    }

    #[test]
    fn test_frechet_of_diagonal_covariances_is_the_closed_form() {
        let a = [1.0, 4.0, 0.25, 9.0];
        let b = [2.0, 1.0, 0.25, 16.0];
        let (mu1, mu2) = ([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 3.0]);
        let diagonal = |v: &[f64]| -> Vec<f64> {
            let mut c = vec![0.0; 16];
            for (i, x) in v.iter().enumerate() {
                c[i * 5] = *x;
            }
            c
        };
        let fd = frechet_distance(&mu1, &diagonal(&a), &mu2, &diagonal(&b), 4).unwrap();
        let want: f64 = 1.0
            + 4.0
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        assert!((fd - want).abs() < 1e-12 * want, "{fd} vs {want}");
    }

    #[test]
    fn test_frechet_of_commuting_covariances_is_the_closed_form() {
        let mut rng = TestRng(6);
        let d = 8;
        let q = random_orthogonal(&mut rng, d);
        let a: Vec<f64> = (0..d).map(|_| rng.uniform() * 3.0 + 0.1).collect();
        let b: Vec<f64> = (0..d).map(|_| rng.uniform() * 3.0 + 0.1).collect();
        let (c1, c2) = (with_eigenvalues(&q, &a, d), with_eigenvalues(&q, &b, d));
        let mu = vec![0.5; d];
        let fd = frechet_distance(&mu, &c1, &mu, &c2, d).unwrap();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum();
        assert!((fd - want).abs() < 1e-11 * want.max(1.0), "{fd} vs {want}");
    }

    #[test]
    fn test_frechet_of_non_commuting_covariances_matches_denman_beavers() {
        let mut rng = TestRng(7);
        let d = 5;
        for _ in 0..5 {
            let (c1, c2) = (random_spd(&mut rng, d, 0.2), random_spd(&mut rng, d, 0.2));
            let (mu1, mu2) = (rng.normals(d), rng.normals(d));
            let cross = trace_sqrtm_denman_beavers(&c1, &c2, d);
            let trace = |c: &[f64]| (0..d).map(|i| c[i * d + i]).sum::<f64>();
            let mean_term: f64 = mu1.iter().zip(&mu2).map(|(a, b)| (a - b).powi(2)).sum();
            let want = mean_term + trace(&c1) + trace(&c2) - 2.0 * cross;
            let fd = frechet_distance(&mu1, &c1, &mu2, &c2, d).unwrap();
            let scale = trace(&c1) + trace(&c2) + mean_term;
            assert!(
                (fd - want).abs() < 1e-9 * scale,
                "{fd} vs {want} (scale {scale})"
            );
            let got_cross = trace_sqrt_product(c1.clone(), &c2, d).unwrap();
            assert!(
                (got_cross - cross).abs() < 1e-11 * cross,
                "{got_cross} vs {cross}"
            );
        }
    }

    #[test]
    fn test_frechet_is_symmetric() {
        let mut rng = TestRng(8);
        for d in [3, 20, 150] {
            let (c1, c2) = (random_spd(&mut rng, d, 0.05), random_spd(&mut rng, d, 0.05));
            let (mu1, mu2) = (rng.normals(d), rng.normals(d));
            let ab = frechet_distance(&mu1, &c1, &mu2, &c2, d).unwrap();
            let ba = frechet_distance(&mu2, &c2, &mu1, &c1, d).unwrap();
            assert!((ab - ba).abs() < 1e-10 * ab, "D = {d}: {ab} vs {ba}");
        }
    }

    #[test]
    fn test_frechet_accepts_singular_covariances() {
        // Rank-deficient C1 (more dimensions than samples, as with small FID sets).
        let mut rng = TestRng(9);
        let (n, d) = (4, 10);
        let x = gaussian_sample(&mut rng, n, d, 0.0);
        let y = gaussian_sample(&mut rng, 50, d, 0.0);
        let fd = frechet_distance_samples(&x, &y, d).unwrap();
        assert!(fd.is_finite() && fd > 0.0);
        let same = frechet_distance_samples(&x, &x, d).unwrap();
        // sqrt of rounding-level eigenvalues bounds the accuracy for a singular C1.
        assert!(same.abs() < 1e-6, "{same}");
    }

    #[test]
    fn test_frechet_samples_matches_frechet_of_fitted_stats() {
        let mut rng = TestRng(10);
        let d = 6;
        let x = gaussian_sample(&mut rng, 100, d, 0.0);
        let y = gaussian_sample(&mut rng, 80, d, 0.3);
        let (mu1, c1) = mean_cov(&x, 100, d).unwrap();
        let (mu2, c2) = mean_cov(&y, 80, d).unwrap();
        let want = frechet_distance(&mu1, &c1, &mu2, &c2, d).unwrap();
        assert_eq!(frechet_distance_samples(&x, &y, d).unwrap(), want);
        assert!(want > 0.3);
    }

    #[test]
    fn test_bad_arguments_are_errors() {
        let c = [1.0, 0.0, 0.0, 1.0];
        let mu = [0.0, 0.0];
        assert!(frechet_distance(&mu, &c, &mu, &c, 0).is_err());
        assert!(frechet_distance(&mu[..1], &c, &mu, &c, 2).is_err());
        assert!(frechet_distance(&mu, &c[..3], &mu, &c, 2).is_err());
        assert!(frechet_distance(&mu, &c, &[0.0, f64::NAN], &c, 2).is_err());
        assert!(frechet_distance(&mu, &c, &mu, &[1.0, f64::INFINITY, 0.0, 1.0], 2).is_err());
        let err = frechet_distance(&mu, &[1.0, 0.5, 0.0, 1.0], &mu, &c, 2).unwrap_err();
        assert!(err.to_string().contains("cov1 is not symmetric"), "{err}");
        assert!(frechet_distance(&mu, &c, &mu, &[-1.0, 0.0, 0.0, 1.0], 2).is_err());

        let x = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert!(mean_cov(&x, 1, 6).is_err());
        assert!(mean_cov(&x, 2, 2).is_err());
        assert!(mean_cov(&x, 3, 0).is_err());
        assert!(mean_cov(&[0.0, f32::NAN, 1.0, 2.0], 2, 2).is_err());
        assert!(frechet_distance_samples(&x, &x[..5], 2).is_err());
        assert!(frechet_distance_samples(&x, &x[..2], 2).is_err());
        assert!(frechet_distance_samples(&x, &x, 0).is_err());

        assert!(mmd_rbf(&x, &x, 3, 3, 2, &[0.0]).is_err());
        assert!(mmd_rbf(&x, &x, 3, 3, 2, &[f64::NAN]).is_err());
        assert!(mmd_rbf(&x, &x, 3, 2, 2, &[1.0]).is_err());
        assert!(mmd_rbf(&x, &x[..2], 3, 1, 2, &[1.0]).is_err());
        assert!(mmd_rbf(&x, &x, 3, 3, 0, &[1.0]).is_err());
        let ties = [1.0f32; 6];
        let err = mmd_rbf(&ties, &ties, 3, 3, 2, &[]).unwrap_err();
        assert!(err.to_string().contains("bandwidth 0"), "{err}");
    }

    #[test]
    fn test_mmd_matches_a_hand_computed_example() {
        // x = {0, 1}, y = {0, 2} in one dimension, h = 1: k(a, b) = exp(-(a - b)² / 2).
        let k = |t: f64| (-t * t / 2.0).exp();
        let want = k(1.0) + k(2.0) - 2.0 * (k(0.0) + k(2.0) + k(1.0) + k(1.0)) / 4.0;
        let got = mmd_rbf(&[0.0, 1.0], &[0.0, 2.0], 2, 2, 1, &[1.0]).unwrap();
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
        // Two bandwidths: the kernels add, so the estimates add.
        let k2 = |t: f64| (-t * t / 8.0).exp();
        let want2 = k2(1.0) + k2(2.0) - 2.0 * (k2(0.0) + k2(2.0) + k2(1.0) + k2(1.0)) / 4.0;
        let got2 = mmd_rbf(&[0.0, 1.0], &[0.0, 2.0], 2, 2, 1, &[1.0, 2.0]).unwrap();
        assert!((got2 - want - want2).abs() < 1e-15);
    }

    #[test]
    fn test_mmd_of_two_samples_of_one_distribution_is_near_zero() {
        let mut rng = TestRng(11);
        let (n, d) = (400, 3);
        let x = gaussian_sample(&mut rng, n, d, 0.0);
        let y = gaussian_sample(&mut rng, n, d, 0.0);
        for bandwidths in [&[][..], &[0.5, 1.0, 2.0][..]] {
            let v = mmd_rbf(&x, &y, n, n, d, bandwidths).unwrap();
            assert!(v.abs() < 5e-3, "{v}");
        }
    }

    #[test]
    fn test_mmd_grows_with_the_shift_between_gaussians() {
        let mut rng = TestRng(12);
        let (n, d) = (300, 2);
        let x = gaussian_sample(&mut rng, n, d, 0.0);
        let mut last = 0.0;
        for shift in [0.25, 0.5, 1.0, 2.0] {
            let y = gaussian_sample(&mut rng, n, d, shift);
            let v = mmd_rbf(&x, &y, n, n, d, &[1.0]).unwrap();
            assert!(v > last, "shift {shift}: {v} <= {last}");
            last = v;
        }
        let y = gaussian_sample(&mut rng, n, d, 1.0);
        assert!(mmd_rbf(&x, &y, n, n, d, &[]).unwrap() > 0.05);
    }

    #[test]
    fn test_median_heuristic_is_the_median_pairwise_distance() {
        // Pooled 1-D points {0, 1, 3} ∪ {6}: distances 1, 3, 6, 2, 5, 3 -> median (3 + 3) / 2.
        let h = median_heuristic_bandwidth(&[0.0, 1.0, 3.0], &[6.0], 3, 1, 1).unwrap();
        assert_eq!(h, 3.0);
        // Odd count: {0, 1, 4}: distances 1, 4, 3 -> 3.
        let h = median_heuristic_bandwidth(&[0.0, 1.0], &[4.0], 2, 1, 1).unwrap();
        assert_eq!(h, 3.0);
    }

    #[test]
    fn test_results_do_not_depend_on_the_thread_count() {
        let mut rng = TestRng(13);
        let (n, d) = (300, 40);
        let x = gaussian_sample(&mut rng, n, d, 0.0);
        let y = gaussian_sample(&mut rng, n, d, 0.1);
        // D = 260 takes the parallel paths of the eigensolver, too.
        let dim = 260;
        let (c1, c2) = (
            random_spd(&mut rng, dim, 0.01),
            random_spd(&mut rng, dim, 0.01),
        );
        let mu = vec![0.0; dim];
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    (
                        mmd_rbf(&x, &y, n, n, d, &[]).unwrap(),
                        frechet_distance_samples(&x, &y, d).unwrap(),
                        frechet_distance(&mu, &c1, &mu, &c2, dim).unwrap(),
                    )
                })
        };
        let (one, four) = (run(1), run(4));
        assert_eq!(one.0.to_bits(), four.0.to_bits());
        assert_eq!(one.1.to_bits(), four.1.to_bits());
        assert_eq!(one.2.to_bits(), four.2.to_bits());
    }
}
