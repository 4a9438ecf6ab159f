"""Losses side by side: ferrodiff vs the same expressions in numpy and in torch (not a test).

    python benches/bench_losses.py [--threads N] [--markdown]

Cases on (64, 3, 32, 32): the simple loss with its gradient (ferrodiff's fused loss + gradient;
numpy's two expressions; torch forward + backward through autograd) and the variational bound's
term at random timesteps (`vb_terms_bpd`, fixed_small; numpy and torch with OpenAI's formulas).
Every method is checked against ferrodiff's result before it is timed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
parser.add_argument("--markdown", action="store_true")
parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per method")
args = parser.parse_args()
os.environ["RAYON_NUM_THREADS"] = str(args.threads)
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

import ferrodiff as fd
from ferrodiff import likelihood, losses

try:
    import torch

    torch.set_num_threads(args.threads)
except ImportError:  # torch is optional here
    torch = None

SHAPE = (64, 3, 32, 32)
LN2 = math.log(2.0)


def timeit(fn, min_time):
    fn()
    times = []
    end = time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def numpy_simple(o, y):
    d = o - y
    return (d * d).reshape(len(o), -1).mean(1), 2 * d / (d[0].size)


def numpy_vb(s, x0, xt, t, eps):
    ab = s.alphas_cumprod[t][:, None, None, None]
    x0_hat = np.clip((xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
    c1 = s.posterior_mean_coef1[t][:, None, None, None]
    c2 = s.posterior_mean_coef2[t][:, None, None, None]
    lv = s.posterior_log_variance_clipped[t][:, None, None, None]
    kl = 0.5 * ((c1 * x0 + c2 * xt - (c1 * x0_hat + c2 * xt)) ** 2 * np.exp(-lv))
    return kl.reshape(len(x0), -1).mean(1) / LN2


def torch_vb(tabs, x0, xt, t, eps):
    ab, c1, c2, lv = (a[t].view(-1, 1, 1, 1) for a in tabs)
    x0_hat = ((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    kl = 0.5 * (
        -1.0
        + lv
        - lv
        + torch.exp(lv - lv)
        + (c1 * x0 + c2 * xt - (c1 * x0_hat + c2 * xt)) ** 2 * torch.exp(-lv)
    )
    return kl.flatten(1).mean(1) / LN2


def main():
    rng = np.random.default_rng(0)
    s = fd.Schedule.linear(1000)
    o = rng.standard_normal(SHAPE).astype(np.float32)
    y = rng.standard_normal(SHAPE).astype(np.float32)
    x0 = np.clip(rng.standard_normal(SHAPE) * 0.5, -1, 1).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    t = rng.integers(1, 1000, SHAPE[0])
    xt = s.q_sample(x0, t, z)
    eps = (z + 0.1 * rng.standard_normal(SHAPE)).astype(np.float32)

    rows = []
    ref_loss, ref_grad = losses.simple_loss(o, y)
    nl, ng = numpy_simple(o, y)
    np.testing.assert_allclose(nl, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(ng, ref_grad, rtol=1e-4, atol=1e-8)
    cases = {
        "simple loss + gradient": [
            ("ferrodiff simple_loss", lambda: losses.simple_loss(o, y)),
            ("numpy", lambda: numpy_simple(o, y)),
        ]
    }
    ref_vb = likelihood.vb_terms_bpd(s, x0, xt, t, eps)
    np.testing.assert_allclose(
        numpy_vb(s, x0.astype(np.float64), xt.astype(np.float64), t, eps.astype(np.float64)),
        ref_vb,
        rtol=1e-3,
        atol=1e-7,
    )
    cases["vb_terms_bpd (fixed_small)"] = [
        ("ferrodiff vb_terms_bpd", lambda: likelihood.vb_terms_bpd(s, x0, xt, t, eps)),
        ("numpy (float64 tables)", lambda: numpy_vb(s, x0, xt, t, eps)),
    ]
    if torch is not None:
        ot = torch.from_numpy(o.copy()).requires_grad_(True)
        yt = torch.from_numpy(y)

        def torch_simple():
            ot.grad = None
            loss = ((ot - yt) ** 2).flatten(1).mean(1)
            loss.sum().backward()
            return loss, ot.grad

        tl, tg = torch_simple()
        np.testing.assert_allclose(tl.detach().numpy(), ref_loss, rtol=1e-4)
        np.testing.assert_allclose(tg.numpy(), ref_grad, rtol=1e-4, atol=1e-8)
        cases["simple loss + gradient"].append(("torch autograd", torch_simple))
        tabs = [
            torch.tensor(a, dtype=torch.float32)
            for a in (
                s.alphas_cumprod,
                s.posterior_mean_coef1,
                s.posterior_mean_coef2,
                s.posterior_log_variance_clipped,
            )
        ]
        tx0, txt, teps, tt = (torch.from_numpy(a) for a in (x0, xt, eps, t))
        with torch.no_grad():
            np.testing.assert_allclose(
                torch_vb(tabs, tx0, txt, tt, teps).numpy(), ref_vb, rtol=2e-2, atol=1e-6
            )

        def tvb():
            with torch.no_grad():
                return torch_vb(tabs, tx0, txt, tt, teps)

        cases["vb_terms_bpd (fixed_small)"].append(("torch (float32)", tvb))
    for case, methods in cases.items():
        timings = [(name, timeit(fn, args.min_time)) for name, fn in methods]
        base = timings[0][1]
        for name, sec in timings:
            rows.append((case, name, f"{sec * 1e3:.3f}", f"{sec / base:.2f}x"))
    header = ("case", "method", "median ms", "ferrodiff speed-up")
    print(
        f"shape {SHAPE}, threads {args.threads}, numpy {np.__version__}"
        + (f", torch {torch.__version__}" if torch else "")
    )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---|---:|---:|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for r in (header, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
