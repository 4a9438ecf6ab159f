"""The ``ferrodiff`` command line.

``ferrodiff demo [--out DIR]``: samples the eight-Gaussians mixture with its exact denoiser
(:mod:`ferrodiff.oracles`) through DDPM (1000 steps) and DDIM (50 steps), and writes a scatter
plot, the samples and the energy distance of each sampler to the truth into ``./ferrodiff-demo/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file in the same folder, then renames: a failure half-way
    never leaves a truncated file where a previous good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(path, write)


def _scatter(path: Path, panels: list[tuple[str, np.ndarray]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: skipping the scatter plot (pip install 'ferrodiff[plot]')",
            file=sys.stderr,
        )
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def demo(out: Path, n: int, seed: int, progress: bool) -> dict:
    import ferrodiff as fd

    mixture = fd.oracles.eight_gaussians()
    schedule = fd.Schedule.linear(1000)
    denoiser = mixture.denoiser(schedule)
    truth = mixture.sample(n, seed=seed + 1)
    floor_sample = mixture.sample(n, seed=seed + 2)
    results = {}
    panels = [("truth", truth)]
    for name, sampler in [
        ("ddpm_1000", fd.DDPM(schedule)),
        ("ddim_50", fd.DDIM(schedule, steps=50)),
    ]:
        start = time.perf_counter()
        x = sampler.sample(denoiser, (n, 2), seed=seed, progress=progress)
        elapsed = time.perf_counter() - start
        dist = fd.oracles.energy_distance(x, truth)
        results[name] = {"energy_distance": dist, "seconds": elapsed, "steps": int(sampler.steps)}
        _save_npy(out / f"samples_{name}.npy", x)
        panels.append((f"{name}: energy distance {dist:.4f}", x))
    results["noise_floor_energy_distance"] = fd.oracles.energy_distance(floor_sample, truth)
    results["n"] = n
    results["seed"] = seed
    _save_json(out / "metrics.json", results)
    _scatter(out / "scatter.png", panels)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrodiff", description="Diffusion models with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sample a 2-D Gaussian mixture with its exact denoiser (DDPM and DDIM)")
    d.add_argument(
        "--out", type=Path, default=Path("ferrodiff-demo"), help="output folder (default ./ferrodiff-demo)"
    )
    d.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.n < 2:
            parser.error("--n must be at least 2")
        r = demo(args.out, args.n, args.seed, not args.no_progress)
        print(f"wrote {args.out}/: scatter.png, samples_ddpm_1000.npy, samples_ddim_50.npy, metrics.json")
        for k in ("ddpm_1000", "ddim_50"):
            print(
                f"  {k}: energy distance to the truth {r[k]['energy_distance']:.4f} ({r[k]['seconds']:.2f} s)"
            )
        print(f"  noise floor (two true samples): {r['noise_floor_energy_distance']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
