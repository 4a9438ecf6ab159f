#!/usr/bin/env python3
"""The patch discriminator's effect on a KL autoencoder (f = 4) of 28x28 MNIST digits: held-out
reconstruction PSNR and the Fréchet distance of the reconstructions' classifier features to the
real held-out digits, with and without the adversarial term, trained side by side.

Not a test: run it by hand and paste the table into BENCHMARKS.md.

    python3 benches/bench_adversarial_autoencoder.py                  # 1500 steps each
    python3 benches/bench_adversarial_autoencoder.py --steps 300      # quicker

Both autoencoders are notebook 06's (widths 16/32/32, 4 latent channels, L1 + 1e-6 KL, batch 32,
lr 1e-3 cosine, EMA 0.999) from the same seed; the adversarial one adds LDM's hinge-loss patch
discriminator (disc_weight 0.5, adaptive weight) from step ``--disc-start`` with 2 stride-2
stages (28 → 7, 5x5 logits of 34x34-pixel patches). The trainers alternate in chunks of 50 steps,
so the per-step times compare under the same machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import ferrodiff as fd

CHUNK = 50


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--disc-start", type=int, default=500)
    p.add_argument("--disc-channels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train = fd.datasets.mnist(split="train")
    held_out = fd.datasets.mnist(split="test")
    options = {
        "plain": {"reconstruction": "l1", "kl_weight": 1e-6},
        "adversarial": {
            "reconstruction": "l1",
            "kl_weight": 1e-6,
            "disc_weight": 0.5,
            "disc_start": args.disc_start,
            "disc_layers": 2,
            "disc_channels": args.disc_channels,
        },
    }
    trainers, times = {}, {}
    for name, objective_options in options.items():
        model = fd.nn.AutoencoderKL(
            image_size=28,
            block_out_channels=(16, 32, 32),
            latent_channels=4,
            norm_num_groups=8,
            seed=args.seed,
        )
        trainers[name] = fd.Trainer(
            model,
            None,
            train.data,
            batch_size=32,
            lr=1e-3,
            lr_schedule="cosine",
            total_steps=args.steps,
            warmup_steps=min(50, args.steps // 2),
            ema_decay=0.999,
            seed=args.seed,
            objective="autoencoder",
            objective_options=objective_options,
        )
        times[name] = []
    done = 0
    while done < args.steps:
        k = min(CHUNK, args.steps - done)
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train(k, progress=False)
            times[name].append((time.perf_counter() - start) / k * 1e3)
        done += k
        m = trainers["adversarial"].objective_metrics
        print(
            f"{done}/{args.steps}: disc loss {m.get('disc_loss')}, weight {m.get('adversarial_weight')}",
            flush=True,
        )

    features = fd.metrics.mnist_features
    real = features(held_out.data)
    print(f"\n{args.steps} steps of batch 32; held-out: {len(held_out.data)} digits")
    print("| autoencoder | ms / step | PSNR (dB) | Fréchet distance of reconstructions |")
    print("|---|---:|---:|---:|")
    for name, trainer in trainers.items():
        model = trainer.ema_model()
        r = np.clip(model.reconstruct(held_out.data), -1.0, 1.0)
        psnr = fd.metrics.psnr(r, held_out.data)
        fid = fd.metrics.frechet_distance(features(r), real)
        print(f"| {name} | {statistics.median(times[name]):.1f} | {psnr:.2f} | {fid:.2f} |")


if __name__ == "__main__":
    main()
