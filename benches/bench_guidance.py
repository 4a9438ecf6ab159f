#!/usr/bin/env python3
"""Per-step cost of classifier-free guidance: one batched model call of 2B rows against two of B.

Not a test: run it by hand and paste the table into BENCHMARKS.md.

    python3 benches/bench_guidance.py --quick               # smoke run, a few seconds
    python3 benches/bench_guidance.py --threads 2           # 2 rayon threads
    python3 benches/bench_guidance.py --threads 1 --only mlp

Classifier-free guidance (Ho & Salimans 2022) needs the conditional and the unconditional ε at
every step. ferrodiff stacks the B rows with their labels and the same B rows with the null label
into one call of 2B rows, then combines ε_u + s (ε_c - ε_u) and steps, all in Rust. The naive
alternative is two calls of B rows per step, which costs twice an unguided step. For each model
and batch size, side by side in one run (interleaved rounds, median of the rounds):

  (a) unguided    DDIM(steps=S).sample(model, shape, labels=y): one call of B rows per step
  (b) guided      the same with guidance_scale=4: one call of 2B rows per step
  (c) two calls   2 x (a): what two calls of B rows per step would cost
  model(2B)       a direct `model(x2, t2, y2)` call on the doubled batch, from Python
  model(B)        a direct `model(x, t, y)` call on B rows

and prints (b) / (c) (the target is at most 1.1: guidance should cost no more than the two model
calls it needs) and (b) - model(2B), the per-step work that is not the network (the guidance
combination, the DDIM update, the stacking).

Models (float32, initial weights plus small Gaussian noise, cosine schedule T=1000; the timing
does not depend on the weights):
  mlp   the demo's network: fd.nn.MLP(data_shape=(1, 8, 8), hidden=256, blocks=3,
        time_embed_dim=128, num_classes=10)
  unet  fd.nn.UNet(num_classes=10): 1x8x8, base 32, mult (1, 2), attention at 4

`--threads N` sets RAYON_NUM_THREADS before ferrodiff is imported; rayon's pool is fixed for the
life of a process, so compare thread counts by running the script once per count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

MODEL_NAMES = ("mlp", "unet")
BATCHES = (64, 256)
GUIDANCE_SCALE = 4.0
NUM_CLASSES = 10
SEED = 0


def _parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for ferrodiff (RAYON_NUM_THREADS; default: RAYON_NUM_THREADS or all cores)",
    )
    p.add_argument("--quick", action="store_true", help="fewer sampling steps and rounds")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps per sampling run (default 10)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 5)")
    p.add_argument(
        "--only",
        default=",".join(MODEL_NAMES),
        help=f"comma-separated models to run, from {','.join(MODEL_NAMES)} (default: all)",
    )
    args = p.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in only if m not in MODEL_NAMES]
    if bad or not only:
        p.error(f"--only takes a comma-separated subset of {','.join(MODEL_NAMES)}, got {args.only!r}")
    args.only = [m for m in MODEL_NAMES if m in only]
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    return args


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
# Must happen before ferrodiff is imported (rayon's global pool starts with the first pass).
os.environ["RAYON_NUM_THREADS"] = str(THREADS)

import numpy as np

import ferrodiff as fd


def make_model(name):
    """The model with its initial weights perturbed: the U-Net's zero-initialised output layer
    would otherwise predict ε = 0 for every class, and guidance would change nothing."""
    if name == "mlp":
        model = fd.nn.MLP(
            data_shape=(1, 8, 8), hidden=256, blocks=3, time_embed_dim=128, num_classes=NUM_CLASSES, seed=SEED
        )
    else:
        model = fd.nn.UNet(num_classes=NUM_CLASSES, seed=SEED)
    rng = np.random.default_rng(SEED)
    model.load_state_dict(
        {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in model.state_dict().items()}
    )
    return model


def interleaved(fns, rounds):
    """Median seconds of each function over `rounds` rounds; a round runs every function once, so
    background load hits all of them alike."""
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def run_case(name, model, batch, schedule):
    shape = (batch, 1, 8, 8)
    steps = ARGS.steps
    sampler = fd.DDIM(schedule, steps=steps)
    labels = np.arange(batch) % NUM_CLASSES
    null = np.full(batch, NUM_CLASSES)  # the null class row of the class embedding
    x = fd.randn(shape, seed=SEED)
    t = np.full(batch, int(sampler.timesteps[len(sampler.timesteps) // 2]), dtype=np.int64)
    x2, t2, y2 = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([labels, null])

    def unguided():
        return sampler.sample(model, shape, seed=SEED, labels=labels)

    def guided():
        return sampler.sample(model, shape, seed=SEED, labels=labels, guidance_scale=GUIDANCE_SCALE)

    # The guided run is a different computation from the unguided one, and both are finite.
    a, b = unguided(), guided()
    assert np.isfinite(a).all() and np.isfinite(b).all(), name
    assert not np.array_equal(a, b), f"{name}: guidance_scale={GUIDANCE_SCALE} changed nothing"
    # Warm-up of the direct calls (allocations, caches) before timing.
    model(x2, t2, y2)
    model(x, t, labels)

    # A direct call is much shorter than a sampling run: time several per round.
    calls = max(1, steps // 4)

    def direct_doubled():
        for _ in range(calls):
            model(x2, t2, y2)

    def direct_single():
        for _ in range(calls):
            model(x, t, labels)

    times = interleaved([unguided, guided, direct_doubled, direct_single], ARGS.rounds)
    a_ms, b_ms = times[0] / steps * 1e3, times[1] / steps * 1e3
    return {
        "model": name,
        "batch": batch,
        "a": a_ms,
        "b": b_ms,
        "c": 2 * a_ms,
        "model_2b": times[2] / calls * 1e3,
        "model_b": times[3] / calls * 1e3,
    }


def _cpu_snapshot():
    """(system busy CPU seconds, steal seconds) from /proc/stat, this process's CPU seconds, wall time."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / tick
        steal = vals[7] / tick if len(vals) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        busy = steal = None
    t = os.times()
    return busy, steal, t.user + t.system, time.perf_counter()


def _other_load(snap0):
    """(cores used by other processes, steal) on average since snap0, or None."""
    busy1, steal1, own1, wall1 = _cpu_snapshot()
    busy0, steal0, own0, wall0 = snap0
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))
    return other, (steal1 - steal0) / (wall1 - wall0)


def fmt(ms):
    size = abs(ms)  # (b) - model(2B) can come out negative on a busy machine
    return f"{ms:.3f}" if size < 1 else f"{ms:.2f}" if size < 100 else f"{ms:.0f}"


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
    print(f"ferrodiff {fd.__version__} | numpy {np.__version__} | Python {platform.python_version()}")
    print(
        f"CPU: {cpu}, {os.cpu_count()} logical cores | RAYON_NUM_THREADS={THREADS} | "
        f"DDIM-{ARGS.steps}, {ARGS.rounds} rounds, guidance_scale={GUIDANCE_SCALE}"
        f"{' | --quick' if ARGS.quick else ''}"
    )
    snap = _cpu_snapshot()
    schedule = fd.Schedule.cosine(1000)
    results = []
    for name in ARGS.only:
        model = make_model(name)
        print(f"  {name}: {model.num_parameters:,} parameters")
        for batch in BATCHES:
            case_snap = _cpu_snapshot()
            r = run_case(name, model, batch, schedule)
            load = _other_load(case_snap)
            r["other"] = None if load is None else load[0]
            results.append(r)
            busy = "" if load is None else f"; other processes {load[0]:.2f} cores"
            print(
                f"  {name} B={batch}: unguided {fmt(r['a'])} ms/step, guided {fmt(r['b'])} ms/step, "
                f"ratio {r['b'] / r['c']:.2f}{busy}"
            )
            sys.stdout.flush()

    print(f"\n#### threads={THREADS}, float32, ms per sampling step{' (quick)' if ARGS.quick else ''}\n")
    print(
        "| model | B | (a) unguided | (b) guided, 1 call of 2B | (c) 2 calls of B = 2a | (b)/(c) "
        "| model(2B) | model(B) | (b) - model(2B) | other load (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        other = "-" if r["other"] is None else f"{r['other']:.2f}"
        print(
            f"| {r['model']} | {r['batch']} | {fmt(r['a'])} | {fmt(r['b'])} | {fmt(r['c'])} "
            f"| {r['b'] / r['c']:.2f} | {fmt(r['model_2b'])} | {fmt(r['model_b'])} "
            f"| {fmt(r['b'] - r['model_2b'])} | {other} |"
        )
    print()
    load = _other_load(snap)
    if load is not None:
        other, steal = load
        flag = "WARNING: timings unreliable, " if other > 0.25 or steal > 0.25 else ""
        print(f"({flag}during the run: other processes used {other:.2f} cores on average, steal {steal:.2f})")
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")


if __name__ == "__main__":
    main()
