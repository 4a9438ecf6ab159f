//! Fused single-pass kernels over f32 slices, split over the rayon pool, and the
//! counter-based generator that makes their noise independent of how the work is split.

pub mod rng;
pub mod simd;
mod step;

pub use step::{fused_step, threshold_scales, Noise, RowStep};

use rayon::prelude::*;

/// Below this many elements a pass runs on the calling thread: waking the pool costs more
/// than the work (a (256, 2) sampler step must take microseconds).
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;
/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
pub const CHUNK_ELEMENTS: usize = 1 << 14;

static FORKED_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static FORK_GUARD: std::sync::Once = std::sync::Once::new();

#[cfg(unix)]
extern "C" fn mark_forked_child() {
    FORKED_CHILD.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether passes may use the rayon pool. In a process forked from one that already started
/// the pool (a PyTorch DataLoader worker, multiprocessing with fork), the pool's threads do not
/// exist and waiting for them would hang forever: there every pass runs on the calling thread,
/// as Hugging Face tokenizers does.
pub fn parallel_allowed() -> bool {
    FORK_GUARD.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::pthread_atfork(None, None, Some(mark_forked_child));
        }
    });
    !FORKED_CHILD.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f`, which may use rayon (the network kernels, candle's matrix multiply), where rayon's
/// workers exist: on the global pool normally, and in a forked child (a PyTorch DataLoader
/// worker) on a one-thread pool of the child's own, since the parent's workers were not
/// copied and work queued for them would wait forever.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if parallel_allowed() {
        return f();
    }
    child_pool().install(f)
}

/// The forked child's pool, made on first use and remade in a process forked from that child.
fn child_pool() -> std::sync::Arc<rayon::ThreadPool> {
    type Slot = Option<(u32, std::sync::Arc<rayon::ThreadPool>)>;
    static POOL: std::sync::Mutex<Slot> = std::sync::Mutex::new(None);
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some((owner, pool)) if *owner == pid => pool.clone(),
        _ => {
            let pool = std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("could not start a worker thread in the forked process"),
            );
            *slot = Some((pid, pool.clone()));
            pool
        }
    }
}

/// Runs `f(start, out_chunk)` over `out` in chunks (in parallel when large); `start` is the
/// global index of the chunk's first element. Returns the results of every chunk, in order.
pub fn for_each_chunk<T: Send, R: Send>(
    out: &mut [T],
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    if out.len() < PARALLEL_MIN_ELEMENTS || !parallel_allowed() {
        return vec![f(0, out)];
    }
    out.par_chunks_mut(CHUNK_ELEMENTS)
        .enumerate()
        .map(|(i, chunk)| f(i * CHUNK_ELEMENTS, chunk))
        .collect()
}

/// Splits the global range `[start, start + len)` of a batch whose rows hold `row_len`
/// elements into per-row pieces: calls `f(row, start, end)` for each.
#[inline]
pub fn for_each_row_piece(
    start: usize,
    len: usize,
    row_len: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    if row_len == 0 {
        return;
    }
    let end = start + len;
    let mut i = start;
    while i < end {
        let row = i / row_len;
        let row_end = ((row + 1) * row_len).min(end);
        f(row, i, row_end);
        i = row_end;
    }
}

/// `out = a_r · u + b_r · w` where (a_r, b_r) = `rows[r]` and row r holds `row_len` elements.
pub fn affine_rows(rows: &[(f32, f32)], row_len: usize, u: &[f32], w: &[f32], out: &mut [f32]) {
    debug_assert_eq!(u.len(), out.len());
    debug_assert_eq!(w.len(), out.len());
    for_each_chunk(out, |start, chunk| {
        for_each_row_piece(start, chunk.len(), row_len, |row, s, e| {
            let (a, b) = rows[row];
            let o = &mut chunk[s - start..e - start];
            for ((o, &u), &w) in o.iter_mut().zip(&u[s..e]).zip(&w[s..e]) {
                *o = a * u + b * w;
            }
        });
    });
}
