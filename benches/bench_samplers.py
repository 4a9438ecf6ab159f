#!/usr/bin/env python3
"""Per-step sampler benchmark: ferrodiff vs numpy, in-place torch, diffusers, and np.copyto.

Not a test: run it by hand and paste the tables into BENCHMARKS.md.

    python3 benches/bench_samplers.py --quick                 # smoke run, a few seconds
    python3 benches/bench_samplers.py --threads 2             # full run, 2 rayon/torch threads
    python3 benches/bench_samplers.py --threads 1 --markdown  # Markdown tables

Every method gets the same inputs (x ~ N(0,1), model_output ~ N(0,1), float32, one timestep of
a linear T=1000 schedule sampled with 50 "leading" steps). Before anything is timed the results
are checked against each other, so the benchmark never times a wrong computation.

Cases, per shape:
  ddim_clip    DDIM eta=0, clip_sample=1.0, results returned as new arrays
  ddim_out     DDIM eta=0, no clip, written into a preallocated `out=` buffer (GB/s reported)
  ddpm_noise   DDPM fixed_small with seeded noise
plus np.copyto(dst, src) as the memory-bandwidth reference and the Gaussian generator alone.

The σ-space samplers (`--only sigma` runs just them) are timed per model evaluation on the
headline shape against ferrodiff's own DDIM.step (the overhead target: no more per step than
DDIM) and against the matching diffusers scheduler's step, each checked equal first.

`--threads N` sets RAYON_NUM_THREADS (ferrodiff) before ferrodiff is imported and
torch.set_num_threads(N); compare thread counts by running the script once per count.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for ferrodiff (RAYON_NUM_THREADS) and torch (default: RAYON_NUM_THREADS or all cores)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fast smoke run: few repeats, skips the 64M-element case"
    )
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    large = p.add_mutually_exclusive_group()
    large.add_argument(
        "--large",
        dest="large",
        action="store_true",
        default=None,
        help="run the 64M-element case (64, 1024, 1024) (default unless --quick; ~2.5 GB of RAM)",
    )
    large.add_argument("--no-large", dest="large", action="store_false", help="skip the 64M-element case")
    p.add_argument("--only", choices=["sigma"], default=None, help="run only the σ-space samplers' table")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds of timed calls per method and shape (default 0.4, --quick 0.05)",
    )
    return p.parse_args(argv)


ARGS = _parse_args()


def _default_threads() -> int:
    env = os.environ.get("RAYON_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


THREADS = ARGS.threads if ARGS.threads is not None else _default_threads()
if THREADS < 1:
    sys.exit("--threads must be >= 1")
# Must happen before ferrodiff (rayon's global pool) and torch (OpenMP) are imported.
os.environ["RAYON_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# torch's OpenMP workers busy-wait after each parallel region by default; in a side-by-side run
# that steals a core from whichever method is timed next (ferrodiff's rayon workers sleep
# instead). Passive waiting keeps the methods from taxing each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

torch.set_num_threads(THREADS)

import ferrodiff as fd

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler

    diffusers.utils.logging.set_verbosity_error()
except ImportError:  # diffusers rows are then left out
    diffusers = None

# ----------------------------------------------------------------------------------------------
# Configuration shared by every method
# ----------------------------------------------------------------------------------------------

T = 1000
STEPS = 50
BETA_START, BETA_END = 1e-4, 0.02
T_BENCH = 480  # a mid-trajectory timestep of the 50-step "leading" list (not the last)
CLIP = 1.0
SEED = 0

SHAPES = [(64, 3, 64, 64), (16, 4, 64, 64), (256, 2)]
LARGE_SHAPE = (64, 1024, 1024)  # 64M elements, 256 MB per float32 array
HEADLINE_SHAPE = (64, 3, 64, 64)
TINY_SHAPE = (256, 2)
GEN_SHAPE = (64, 1024, 256)  # 16M samples for the generator throughput
GEN_SHAPE_QUICK = (16, 1024, 256)

QUICK = ARGS.quick
RUN_LARGE = ARGS.large if ARGS.large is not None else not QUICK
MIN_TIME = ARGS.min_time if ARGS.min_time is not None else (0.05 if QUICK else 0.4)

# Hand-written reference coefficients (float64, from the definitions, not from ferrodiff).
_betas = np.linspace(BETA_START, BETA_END, T, dtype=np.float64)
_abar = np.cumprod(1.0 - _betas)
_stride = T // STEPS
REF_TIMESTEPS = (np.arange(STEPS, dtype=np.int64) * _stride)[::-1]  # 980, 960, ..., 0
T_PREV = T_BENCH - _stride
A, A_PREV = float(_abar[T_BENCH]), float(_abar[T_PREV])
SQRT_A, SQRT_1MA = math.sqrt(A), math.sqrt(1.0 - A)
SQRT_AP, SQRT_1MAP = math.sqrt(A_PREV), math.sqrt(1.0 - A_PREV)
# DDPM (respaced process over the 50-step list): posterior mean coefficients and fixed_small sigma.
BETA_T = 1.0 - A / A_PREV
DDPM_C_X0 = SQRT_AP * BETA_T / (1.0 - A)
DDPM_C_X = math.sqrt(1.0 - BETA_T) * (1.0 - A_PREV) / (1.0 - A)
DDPM_SIGMA = math.sqrt(BETA_T * (1.0 - A_PREV) / (1.0 - A))

# ----------------------------------------------------------------------------------------------
# Implementations of one step
# ----------------------------------------------------------------------------------------------


class Ferrodiff:
    def __init__(self):
        s = fd.Schedule.linear(T, BETA_START, BETA_END)
        self.ddim_clip = fd.DDIM(s, steps=STEPS, eta=0.0, clip_sample=CLIP)
        self.ddim = fd.DDIM(s, steps=STEPS, eta=0.0)
        self.ddpm = fd.DDPM(s, steps=STEPS, variance="fixed_small")
        for smp in (self.ddim_clip, self.ddim, self.ddpm):
            assert np.array_equal(np.asarray(smp.timesteps), REF_TIMESTEPS), smp.timesteps


# numpy: allocating, written as a user would (Python-float scalars keep float32 under NEP 50).
def np_ddim(eps, x, clip=None):
    x0 = (x - SQRT_1MA * eps) / SQRT_A
    if clip is not None:
        x0 = np.clip(x0, -clip, clip)
    prev = SQRT_AP * x0 + SQRT_1MAP * eps
    return prev, x0


def np_ddpm(eps, x, rng=None, noise=None):
    x0 = (x - SQRT_1MA * eps) / SQRT_A
    mean = DDPM_C_X0 * x0 + DDPM_C_X * x
    if noise is None:
        noise = rng.standard_normal(x.shape, dtype=np.float32)
    prev = mean + DDPM_SIGMA * noise
    return prev, x0


class TorchInPlace:
    """Hand-written torch step on preallocated buffers: out= ops and in-place updates."""

    def __init__(self, shape):
        self.x0 = torch.empty(shape, dtype=torch.float32)
        self.prev = torch.empty(shape, dtype=torch.float32)

    def _x0(self, eps, x):
        torch.add(x, eps, alpha=-SQRT_1MA, out=self.x0)
        return self.x0.mul_(1.0 / SQRT_A)

    def ddim(self, eps, x, clip=None, out=None):
        x0 = self._x0(eps, x)
        if clip is not None:
            x0.clamp_(-clip, clip)
        prev = self.prev if out is None else out
        torch.mul(x0, SQRT_AP, out=prev)
        prev.add_(eps, alpha=SQRT_1MAP)
        return prev, x0

    def ddpm(self, eps, x, noise=None):
        x0 = self._x0(eps, x)
        prev = self.prev
        torch.mul(x0, DDPM_C_X0, out=prev)
        prev.add_(x, alpha=DDPM_C_X)
        if noise is None:
            noise = torch.randn_like(x)
        prev.add_(noise, alpha=DDPM_SIGMA)
        return prev, x0


def make_diffusers():
    if diffusers is None:
        return None
    common = {
        "num_train_timesteps": T,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "steps_offset": 0,
        "timestep_spacing": "leading",
    }
    ddim_clip = DDIMScheduler(clip_sample=True, clip_sample_range=CLIP, set_alpha_to_one=True, **common)
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    ddpm = DDPMScheduler(variance_type="fixed_small", clip_sample=False, **common)
    for s in (ddim_clip, ddim, ddpm):
        s.set_timesteps(STEPS)
        assert np.array_equal(s.timesteps.numpy(), REF_TIMESTEPS), s.timesteps
    return {"ddim_clip": ddim_clip, "ddim": ddim, "ddpm": ddpm}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def measure(fns, *, min_time=None, min_reps=5, max_reps=2000, warmup=2, max_time=None):
    """Median seconds per call of each function in `fns`, timed in interleaved rounds.

    Each round takes one timed sample of every function in turn. Contention from other processes
    then hits all the methods of a case alike, so ratios hold up even when absolute times
    wobble. Calls that take well under a millisecond are batched so that one sample spans at
    least ~1 ms; timer resolution and loop overhead then don't matter. The rounds stop after
    max_reps. They also stop once there are min_reps samples and min_time seconds per function
    have passed, or once max_time seconds of timed calls have passed (at least one round).
    Returns [(median seconds per call, timed calls)] in the order of `fns`.
    """
    min_time = MIN_TIME if min_time is None else min_time
    numbers, samples = [], [[] for _ in fns]
    for k, fn in enumerate(fns):
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            if time.perf_counter() - t0 > 1.0:  # a slow call: one warm-up touches everything already
                break
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        if one >= 1e-3:
            numbers.append(1)
            samples[k].append(one)  # after warm-up this call is an ordinary timed sample
        else:
            numbers.append(max(1, int(1e-3 / max(one, 1e-7))))
    gc.collect()
    start = time.perf_counter()
    while True:
        for k, fn in enumerate(fns):
            number = numbers[k]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples[k].append((time.perf_counter() - t0) / number)
        reps = min(len(x) for x in samples)
        elapsed = time.perf_counter() - start
        if reps >= max_reps:
            break
        if reps >= min_reps and elapsed >= min_time * len(fns):
            break
        if max_time is not None and elapsed >= max_time:
            break
    return [(statistics.median(x), len(x) * n) for x, n in zip(samples, numbers)]


def fmt_time(sec, unit):
    return f"{sec * 1e6:.2f}" if unit == "us" else f"{sec * 1e3:.3f}"


# ----------------------------------------------------------------------------------------------
# Benchmark of one shape
# ----------------------------------------------------------------------------------------------


def check_close(name, got, ref, rtol, atol):
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if not np.allclose(got, ref, rtol=rtol, atol=atol):
        err = np.max(np.abs(got.astype(np.float64) - ref))
        raise AssertionError(
            f"{name}: results differ from the reference (max abs diff {err:.3g}); not timing"
        )
    return float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0


def verify(shape, f, th, sched, x, eps, xt, epst, buf):
    """Every method against the float64 numpy reference before timing; returns the max abs error."""
    worst = 0.0
    x64, e64 = x.astype(np.float64), eps.astype(np.float64)

    # DDIM eta=0, clip 1.0
    x0_ref = np.clip((x64 - SQRT_1MA * e64) / SQRT_A, -CLIP, CLIP)
    prev_ref = SQRT_AP * x0_ref + SQRT_1MAP * e64
    r = f.ddim_clip.step(eps, T_BENCH, x)
    worst = max(worst, check_close("ferrodiff DDIM clip prev", r.prev_sample, prev_ref, 1e-5, 1e-5))
    check_close("ferrodiff DDIM clip x0", r.pred_x0, x0_ref, 1e-5, 1e-5)
    check_close("numpy DDIM clip", np_ddim(eps, x, CLIP)[0], prev_ref, 1e-5, 1e-5)
    check_close("torch DDIM clip", th.ddim(epst, xt, CLIP)[0], prev_ref, 1e-5, 1e-5)
    if sched is not None:  # diffusers' schedule is float32: a looser tolerance
        check_close(
            "diffusers DDIM clip",
            sched["ddim_clip"].step(epst, T_BENCH, xt, eta=0.0).prev_sample,
            prev_ref,
            1e-4,
            1e-4,
        )

    # DDIM eta=0, no clip, into out=
    x0_ref = (x64 - SQRT_1MA * e64) / SQRT_A
    prev_ref = SQRT_AP * x0_ref + SQRT_1MAP * e64
    buf.fill(np.nan)
    r = f.ddim.step(eps, T_BENCH, x, out=buf, return_pred_x0=False)
    worst = max(worst, check_close("ferrodiff DDIM out=", buf, prev_ref, 1e-5, 1e-5))
    check_close("ferrodiff DDIM out= returned", r.prev_sample, prev_ref, 1e-5, 1e-5)
    check_close("numpy DDIM", np_ddim(eps, x)[0], prev_ref, 1e-5, 1e-5)
    tout = torch.full(shape, float("nan"))
    th.ddim(epst, xt, out=tout)
    check_close("torch DDIM out=", tout, prev_ref, 1e-5, 1e-5)
    if sched is not None:
        check_close(
            "diffusers DDIM", sched["ddim"].step(epst, T_BENCH, xt, eta=0.0).prev_sample, prev_ref, 1e-4, 1e-4
        )

    # DDPM fixed_small with the same given noise (diffusers draws torch.randn with its generator)
    gen_noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    z = gen_noise.numpy()
    mean_ref = DDPM_C_X0 * x0_ref + DDPM_C_X * x64
    prev_ref = mean_ref + DDPM_SIGMA * z.astype(np.float64)
    r = f.ddpm.step(eps, T_BENCH, x, noise=z)
    worst = max(worst, check_close("ferrodiff DDPM noise=", r.prev_sample, prev_ref, 1e-5, 1e-5))
    check_close("numpy DDPM", np_ddpm(eps, x, noise=z)[0], prev_ref, 1e-5, 1e-5)
    check_close("torch DDPM", th.ddpm(epst, xt, noise=gen_noise)[0], prev_ref, 1e-5, 1e-5)
    if sched is not None:
        out = sched["ddpm"].step(epst, T_BENCH, xt, generator=torch.Generator().manual_seed(SEED))
        check_close("diffusers DDPM", out.prev_sample, prev_ref, 1e-4, 1e-4)
    if x.size > (1 << 22):  # the seeded checks below are the same on the smaller shapes
        return worst
    # seeded ferrodiff noise: deterministic, and (prev - mean)/sigma looks standard normal
    a = f.ddpm.step(eps, T_BENCH, x, seed=SEED).prev_sample
    b = f.ddpm.step(eps, T_BENCH, x, seed=SEED).prev_sample
    assert np.array_equal(a, b), "ferrodiff DDPM seed= is not deterministic"
    zz = (a.astype(np.float64) - mean_ref) / DDPM_SIGMA
    tol = 6.0 / math.sqrt(zz.size)
    assert abs(zz.mean()) < tol and abs(zz.std() - 1.0) < 2 * tol, (zz.mean(), zz.std())
    return worst


def bench_shape(shape, f, sched):
    n = math.prod(shape)
    large = n >= 16 * 2**20
    unit = "us" if n <= 4096 else "ms"
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    xt, epst = torch.from_numpy(x), torch.from_numpy(eps)  # same memory: same inputs
    buf = np.empty(shape, dtype=np.float32)
    th = TorchInPlace(shape)
    tout = torch.empty(shape, dtype=torch.float32)
    dst = np.empty_like(x)

    err = verify(shape, f, th, sched, x, eps, xt, epst, buf)

    if large:  # verify() has already run every method once at this shape: no separate warm-up
        kw = {"min_reps": 3, "max_reps": 3, "warmup": 0, "min_time": 0.0, "max_time": 12.0}
    elif QUICK:
        kw = {"min_reps": 3, "warmup": 1}
    else:
        kw = {}
    np_rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    cases = {
        "ddim_clip": [
            ("ferrodiff DDIM.step", lambda: f.ddim_clip.step(eps, T_BENCH, x)),
            ("numpy (allocating)", lambda: np_ddim(eps, x, CLIP)),
            ("torch in-place", lambda: th.ddim(epst, xt, CLIP)),
        ],
        "ddim_out": [
            (
                "ferrodiff DDIM.step(out=, return_pred_x0=False)",
                lambda: f.ddim.step(eps, T_BENCH, x, out=buf, return_pred_x0=False),
            ),
            ("numpy (allocating)", lambda: np_ddim(eps, x)),
            ("torch in-place (out=)", lambda: th.ddim(epst, xt, out=tout)),
        ],
        "ddpm_noise": [
            ("ferrodiff DDPM.step(seed=)", lambda: f.ddpm.step(eps, T_BENCH, x, seed=SEED)),
            ("numpy (allocating, rng)", lambda: np_ddpm(eps, x, np_rng)),
            ("torch in-place + randn_like", lambda: th.ddpm(epst, xt)),
        ],
    }
    if sched is not None:
        cases["ddim_clip"].append(
            ("diffusers DDIMScheduler.step", lambda: sched["ddim_clip"].step(epst, T_BENCH, xt, eta=0.0))
        )
        cases["ddim_out"].append(
            ("diffusers DDIMScheduler.step", lambda: sched["ddim"].step(epst, T_BENCH, xt, eta=0.0))
        )
        cases["ddpm_noise"].append(
            ("diffusers DDPMScheduler.step", lambda: sched["ddpm"].step(epst, T_BENCH, xt, generator=gen))
        )
    cases["ddim_out"].append(("np.copyto (bandwidth ref)", lambda: np.copyto(dst, x)))

    results = {}  # case -> [(method, seconds, timed calls)]
    for case, methods in cases.items():
        timings = measure([fn for _, fn in methods], **kw)
        results[case] = [(name, t, calls) for (name, _), (t, calls) in zip(methods, timings)]

    return {"shape": shape, "n": n, "unit": unit, "results": results, "verify_err": err}


CASE_TITLES = {
    "ddim_clip": "DDIM eta=0, clip_sample=1.0",
    "ddim_out": "DDIM eta=0, no clip, into out=",
    "ddpm_noise": "DDPM fixed_small + seeded noise",
}


def copy_gbps(res):
    t = {m: t for m, t, _ in res["results"]["ddim_out"]}["np.copyto (bandwidth ref)"]
    return 2 * res["n"] * 4 / t / 1e9


def table_rows(res):
    unit = res["unit"]
    rows = []
    copy_bw = copy_gbps(res)
    for case, entries in res["results"].items():
        t_fd = entries[0][1]
        for method, t, calls in entries:
            bw = ""
            if case == "ddim_out":
                if method.startswith("np.copyto"):
                    bw = f"{copy_bw:.1f} (copy)"
                else:
                    g = 3 * res["n"] * 4 / t / 1e9  # read x, model_output; write out
                    bw = f"{g:.1f} ({100 * g / copy_bw:.0f}% of copy)"
            speed = "-" if method.startswith("np.copyto") else f"{t / t_fd:.2f}x"
            rows.append([CASE_TITLES[case], method, fmt_time(t, unit), bw, speed, str(calls)])
    header = [
        "case",
        "method",
        f"median {'µs' if unit == 'us' else 'ms'}/step",
        "GB/s",
        "ferrodiff speed-up",
        "timed calls",
    ]
    return header, rows


def print_table(title, header, rows, markdown):
    print()
    if markdown:
        print(f"#### {title}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    print(title)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    prev_case = None
    for r in rows:
        cells = list(r)
        if cells[0] == prev_case:
            cells[0] = ""
        else:
            prev_case = cells[0]
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))


# ----------------------------------------------------------------------------------------------
# Gaussian generator
# ----------------------------------------------------------------------------------------------


def bench_generator():
    shape = GEN_SHAPE_QUICK if QUICK else GEN_SHAPE
    n = math.prod(shape)
    z = fd.randn((1 << 20,), SEED)
    assert z.dtype == np.float32 and z.shape == (1 << 20,)
    assert np.array_equal(z, fd.randn((1 << 20,), SEED)), "fd.randn is not deterministic"
    assert abs(float(z.mean())) < 5e-3 and abs(float(z.std()) - 1.0) < 5e-3, (z.mean(), z.std())
    del z
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    # Every generator fills a preallocated buffer: this times the generator, not page faults of a
    # fresh 64 MiB allocation (which the allocating rows below show for reference).
    buf_fd = np.empty(shape, np.float32)
    buf_np = np.empty(shape, np.float32)
    buf_t = torch.empty(shape)
    methods = [
        ("ferrodiff fd.randn(shape, seed, out=)", lambda: fd.randn(shape, SEED, out=buf_fd)),
        (
            "numpy standard_normal(float32, out=)",
            lambda: rng.standard_normal(shape, dtype=np.float32, out=buf_np),
        ),
        ("torch.randn(out=)", lambda: torch.randn(shape, out=buf_t)),
        ("ferrodiff fd.randn(shape, seed) (allocating)", lambda: fd.randn(shape, SEED)),
        ("numpy standard_normal (allocating)", lambda: rng.standard_normal(shape, dtype=np.float32)),
    ]
    timings = measure([fn for _, fn in methods], min_reps=3, warmup=1, min_time=MIN_TIME, max_time=8.0)
    res = [(name, t, calls) for (name, _), (t, calls) in zip(methods, timings)]
    t_fd = res[0][1]
    rows = [[m, f"{n / t / 1e6:.0f}", f"{t * 1e3:.2f}", f"{t / t_fd:.2f}x", str(c)] for m, t, c in res]
    header = ["method", "M samples/s", "ms/call", "ferrodiff speed-up", "timed calls"]
    return shape, n, res, header, rows


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _cpu_snapshot():
    """(system busy CPU seconds, steal seconds) from /proc/stat, this process's CPU seconds, wall time."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / tick  # user nice system irq softirq
        steal = vals[7] / tick if len(vals) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        busy = steal = None
    t = os.times()
    return busy, steal, t.user + t.system, time.perf_counter()


def _busy_warning(snap0, when):
    """Prints how many cores other processes (and the hypervisor, as steal time) took since
    snap0; warns when they competed with the benchmark."""
    busy1, steal1, own1, wall1 = _cpu_snapshot()
    busy0, steal0, own0, wall0 = snap0
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return
    other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))
    steal = (steal1 - steal0) / (wall1 - wall0)
    if other > 0.25 or steal > 0.25:
        print(
            f"WARNING ({when}): other processes used {other:.2f} of {os.cpu_count()} cores on average "
            f"(steal {steal:.2f}); timings (OpenMP-based torch especially) are unreliable, rerun on an idle machine"
        )
    else:
        print(f"({when}: other processes used {other:.2f} cores on average, steal {steal:.2f})")


# ----------------------------------------------------------------------------------------------
# σ-space samplers
# ----------------------------------------------------------------------------------------------

SIGMA_STEPS = 20


def bench_sigma(shape):
    """Per model call of a whole 20-step run: each σ sampler's hand loop of `.step` (fixed model
    output, seeded or given noise) against ferrodiff's DDIM loop and the matching diffusers
    scheduler's loop, after checking that the two libraries' final samples agree."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
    )

    rng = np.random.default_rng(0)
    cfg = {
        "num_train_timesteps": T,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "linear",
    }
    eps = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    x0 = rng.standard_normal(shape).astype(np.float32)
    epst, noiset = torch.from_numpy(eps), torch.from_numpy(noise)

    def ours_loop(sampler, scale=1.0):
        state = sampler.new_state()
        x = x0 * np.float32(scale)
        for i in range(sampler.num_evaluations):
            x = sampler.step(eps, i, x, state=state, noise=noise).prev_sample
        return x

    def diffusers_loop(d, extra):
        d.set_timesteps(SIGMA_STEPS)
        x = torch.from_numpy(x0) * float(d.init_noise_sigma)
        for t in d.timesteps:
            x = d.step(epst, t, x, **extra).prev_sample
        return x

    ddim = fd.DDIM(fd.Schedule.linear(T, BETA_START, BETA_END), steps=SIGMA_STEPS)

    def ddim_loop():
        x = x0
        for t in ddim.timesteps:
            x = ddim.step(eps, int(t), x, noise=noise).prev_sample
        return x

    d_ddim = DDIMScheduler.from_config(cfg)
    (t_ddim, _), (t_ddim_diff, _) = measure(
        [ddim_loop, lambda: diffusers_loop(d_ddim, {})], min_reps=3, max_time=MIN_TIME * 10
    )
    base = t_ddim / SIGMA_STEPS
    rows = [
        [
            "DDIM (reference)",
            fmt_time(base, "ms"),
            "1.00",
            fmt_time(t_ddim_diff / SIGMA_STEPS, "ms"),
            f"{t_ddim_diff / t_ddim:.1f}x",
        ]
    ]
    cases = [
        ("Euler", fd.Euler, EulerDiscreteScheduler, {}, {}),
        ("EulerAncestral", fd.EulerAncestral, EulerAncestralDiscreteScheduler, {}, {"generator": None}),
        ("Heun", fd.Heun, HeunDiscreteScheduler, {}, {}),
        ("DPMSolver 2M", fd.DPMSolver, DPMSolverMultistepScheduler, {}, {}),
        (
            "DPMSolver SDE 2M",
            fd.DPMSolver,
            DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++"},
            {"variance_noise": noiset},
        ),
        ("DPMSolver 3M", fd.DPMSolver, DPMSolverMultistepScheduler, {"solver_order": 3}, {}),
    ]
    for name, kind, cls, extra_cfg, extra_step in cases:
        c = dict(cfg, **extra_cfg)
        ours = kind.from_diffusers_config(c, steps=SIGMA_STEPS)
        d = cls.from_config(c)
        if name == "Euler" or name == "Heun" or name.startswith("DPMSolver 2M") or name == "DPMSolver 3M":
            # diffusers' DPM-Solver holds α x (x0 + σ z scaled by α = 1/√(σ²+1)): start at x/α
            s0 = float(ours.init_noise_sigma)
            a = ours_loop(ours, s0 if cls is not DPMSolverMultistepScheduler else math.sqrt(s0 * s0 + 1.0))
            b = diffusers_loop(d, extra_step).numpy()
            check_close(f"{name} final sample", a, b, 1e-3, 1e-3)
        calls = ours.num_evaluations
        (t_ours, _), (t_diff, _) = measure(
            [lambda: ours_loop(ours), lambda: diffusers_loop(d, extra_step)],
            min_reps=3,
            max_time=MIN_TIME * 10,
        )
        per = t_ours / calls
        rows.append(
            [
                name,
                fmt_time(per, "ms"),
                f"{per / base:.2f}",
                fmt_time(t_diff / calls, "ms"),
                f"{t_diff / t_ours:.1f}x",
            ]
        )
    return rows


def main():
    wall0 = time.perf_counter()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    print(
        f"ferrodiff {fd.__version__} | numpy {np.__version__} | torch {torch.__version__} | "
        f"diffusers {diffusers.__version__ if diffusers else 'not installed'} | Python {platform.python_version()}"
    )
    core = getattr(fd, "_core", None)
    if core is not None and getattr(core, "__file__", None):
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(core.__file__)))
        print(f"ferrodiff extension: {core.__file__} (built {mtime})")
    print(
        f"CPU: {cpu}, {os.cpu_count()} logical cores | threads: RAYON_NUM_THREADS={THREADS}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"torch.get_num_threads()={torch.get_num_threads()}"
    )
    print(
        f"config: linear schedule T={T} ({BETA_START}..{BETA_END}), {STEPS} leading steps, step at t={T_BENCH} "
        f"(prev {T_PREV}); median of timed calls, >= {MIN_TIME}s per method"
        f"{' (quick)' if QUICK else ''}; 64M case: {'on' if RUN_LARGE else 'skipped'}"
    )
    print(
        "speed-up = (method time) / (ferrodiff time); GB/s counts x + model_output read and out written "
        "(np.copyto: src read + dst written)"
    )

    snap = _cpu_snapshot()
    time.sleep(0.5)
    _busy_warning(snap, "before the run")
    snap = _cpu_snapshot()

    if ARGS.only == "sigma" or diffusers is not None:
        rows = bench_sigma(HEADLINE_SHAPE)
        print_table(
            f"σ-space samplers, shape {HEADLINE_SHAPE}: time per model call over a {SIGMA_STEPS}-step run "
            "(fixed model output), vs ferrodiff's DDIM and the matching diffusers scheduler",
            ["sampler", "ferrodiff ms/call", "÷ DDIM", "diffusers ms/call", "diffusers ÷ ferrodiff"],
            rows,
            ARGS.markdown,
        )
        sys.stdout.flush()
        if ARGS.only == "sigma":
            return
    f = Ferrodiff()
    sched = make_diffusers()
    shapes = SHAPES + ([LARGE_SHAPE] if RUN_LARGE else [])
    all_res = {}
    for shape in shapes:
        res = bench_shape(shape, f, sched)
        all_res[shape] = res
        header, rows = table_rows(res)
        title = (
            f"shape {shape} ({res['n'] / 1e6:.3g}M elements, {res['n'] * 4 / 2**20:.3g} MiB per array); "
            f"verified vs float64 reference, max abs err {res['verify_err']:.2g}"
        )
        print_table(title, header, rows, ARGS.markdown)
        sys.stdout.flush()

    gshape, gn, gres, gheader, grows = bench_generator()
    print_table(
        f"Gaussian generator, shape {gshape} ({gn / 1e6:.3g}M float32 samples per call)",
        gheader,
        grows,
        ARGS.markdown,
    )

    # ---- targets ----
    def t_of(shape, case, prefix):
        if shape not in all_res:
            return None
        for m, t, _ in all_res[shape]["results"][case]:
            if m.startswith(prefix):
                return t
        return None

    targets = []

    def add(name, value, ok, note=""):
        status = "n/a" if ok is None else ("PASS" if ok else "MISS")
        targets.append([name, value, status + (f" ({note})" if note else "")])

    h = HEADLINE_SHAPE
    fd_t, df_t, th_t = (
        t_of(h, "ddim_clip", "ferrodiff"),
        t_of(h, "ddim_clip", "diffusers"),
        t_of(h, "ddim_clip", "torch"),
    )
    if df_t is not None:
        add(f"{h} DDIM eta=0 clip: >= 9x faster than diffusers", f"{df_t / fd_t:.2f}x", df_t / fd_t >= 9.0)
    else:
        add(f"{h} DDIM eta=0 clip: >= 9x faster than diffusers", "-", None, "diffusers not installed")
    add(f"{h} DDIM eta=0 clip: not slower than torch in-place", f"{th_t / fd_t:.2f}x", th_t / fd_t >= 1.0)
    fd_t, df_t = t_of(h, "ddpm_noise", "ferrodiff"), t_of(h, "ddpm_noise", "diffusers")
    if df_t is not None:
        add(f"{h} DDPM + noise: >= 13x faster than diffusers", f"{df_t / fd_t:.2f}x", df_t / fd_t >= 13.0)
    else:
        add(f"{h} DDPM + noise: >= 13x faster than diffusers", "-", None, "diffusers not installed")
    if LARGE_SHAPE in all_res:
        res = all_res[LARGE_SHAPE]
        g = 3 * res["n"] * 4 / t_of(LARGE_SHAPE, "ddim_out", "ferrodiff") / 1e9
        c = copy_gbps(res)
        add(
            "64M DDIM eta=0 no clip out=: >= 80% of np.copyto GB/s",
            f"{g:.1f} GB/s = {100 * g / c:.0f}% of {c:.1f}",
            g / c >= 0.8,
        )
    else:
        add(
            "64M DDIM eta=0 no clip out=: >= 80% of np.copyto GB/s", "-", None, "skipped; run without --quick"
        )
    tiny = t_of(TINY_SHAPE, "ddim_clip", "ferrodiff")
    add(f"{TINY_SHAPE} DDIM.step (eta=0, clip) latency <= 5 µs", f"{tiny * 1e6:.2f} µs", tiny <= 5e-6)
    tiny_ddpm = t_of(TINY_SHAPE, "ddpm_noise", "ferrodiff")
    targets.append([f"{TINY_SHAPE} DDPM.step(seed=) latency (info)", f"{tiny_ddpm * 1e6:.2f} µs", "-"])
    rate = gn / gres[0][1] / 1e6
    note = "" if THREADS == 2 else f"target is for 2 threads; this run used {THREADS}"
    add(
        "fd.randn >= 1000 M samples/s (2 threads)",
        f"{rate:.0f} M/s",
        rate >= 1000 if THREADS == 2 else None,
        note,
    )
    add(
        "fd.randn >= 500 M samples/s (fallback)",
        f"{rate:.0f} M/s",
        rate >= 500 if THREADS == 2 else None,
        note,
    )

    print_table(f"Targets (threads={THREADS})", ["target", "measured", "status"], targets, ARGS.markdown)
    _busy_warning(snap, "during the run")
    print(f"\ntotal wall time {time.perf_counter() - wall0:.1f} s")


if __name__ == "__main__":
    main()
