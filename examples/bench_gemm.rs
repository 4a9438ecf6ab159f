//! Throughput of the gemm crate (the matrix multiply under our kernels) on the training shapes,
//! whole and split into the row blocks our kernels hand each thread:
//!
//!     cargo run --release --example bench_gemm
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn main() {
    for (m, k, n) in [
        (1024, 256, 256),
        (256, 1024, 256),
        (4096, 288, 32),
        (256, 256, 256),
        (3136, 288, 64),
        (784, 576, 64),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let fl = 2.0 * (m * n * k) as f64;
        let mut run = |rows: usize| {
            let mut ts = vec![];
            for _ in 0..30 {
                let t0 = Instant::now();
                for r0 in (0..m).step_by(rows) {
                    let r = rows.min(m - r0);
                    gemm_nn(r, n, k, &a[r0 * k..], &b, &mut c[r0 * n..]);
                }
                ts.push(t0.elapsed().as_secs_f64());
            }
            fl / median(ts) / 1e9
        };
        let whole = run(m);
        let b64 = run(64);
        let b256 = run(256);
        println!(
            "{m}x{k}x{n}: whole {whole:.1} GF/s, 64-row blocks {b64:.1}, 256-row blocks {b256:.1}"
        );
    }
}
