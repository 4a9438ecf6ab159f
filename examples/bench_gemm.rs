//! Throughput of the gemm crate (the matrix multiply under our kernels) on the training shapes:
//! the two operand orders of the conv weight gradient, then plain products
//! whole and split into the row blocks our kernels hand each thread:
//!
//!     cargo run --release --example bench_gemm
#[path = "common/mod.rs"]
mod common;
use common::median;
use std::time::Instant;

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

#[allow(clippy::too_many_arguments)]
fn gemm_s(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: &[f32],
    a_cs: isize,
    a_rs: isize,
    b: &[f32],
    b_cs: isize,
    b_rs: isize,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

fn weight_grad_layouts() {
    for (cout, ckk, hw) in [
        (32usize, 288usize, 784usize),
        (64, 576, 196),
        (64, 576, 64),
        (64, 576, 16),
    ] {
        let g: Vec<f32> = (0..cout * hw).map(|i| (i % 7) as f32 * 0.1).collect();
        let cols: Vec<f32> = (0..ckk * hw).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut acc = vec![0f32; cout * ckk];
        let fl = 2.0 * (cout * ckk * hw) as f64;
        let time = |f: &mut dyn FnMut()| {
            let mut ts = vec![];
            for _ in 0..50 {
                let t0 = Instant::now();
                f();
                ts.push(t0.elapsed().as_secs_f64());
            }
            fl / median(ts) / 1e9
        };
        // A: acc[cout, ckk] += g [cout, hw] . cols^T
        let a = time(&mut || {
            gemm_s(
                cout,
                ckk,
                hw,
                &mut acc,
                &g,
                1,
                hw as isize,
                &cols,
                hw as isize,
                1,
            )
        });
        // B: accT[ckk, cout] += cols [ckk, hw] . g^T
        let b = time(&mut || {
            gemm_s(
                ckk,
                cout,
                hw,
                &mut acc,
                &cols,
                1,
                hw as isize,
                &g,
                hw as isize,
                1,
            )
        });
        println!("weight grad cout {cout} ckk {ckk} hw {hw}: A {a:.1} GF/s, B {b:.1} GF/s");
    }
}

fn main() {
    weight_grad_layouts();
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
