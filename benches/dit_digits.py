#!/usr/bin/env python3
"""A class-conditional DiT on the bundled 8x8 digits, judged by the library's digit classifier.

Not a test: run it by hand (a few minutes on 2 cores) and paste the result into BENCHMARKS.md.

    python3 benches/dit_digits.py                      # DiT-XS/2, 3000 steps, CFG s = 1 and 4
    python3 benches/dit_digits.py --steps 6000 --scales 1,2,4

Trains fd.nn.DiT (patch 2: 16 tokens; by default DiT-XS, depth 4, width 128, 4 heads) on the
train split of fd.datasets.digits() with the demo's recipe (cosine schedule T = 1000, batch 64,
AdamW lr 1e-3 with cosine decay and 100 warm-up steps, label dropout 0.1 so the null class learns
the unconditional model, EMA weights for sampling), then draws 30 samples per digit with DDIM-50
(eta 0) at each classifier-free guidance scale s (diffusers' convention: s = 1 is the plain
conditional model), clips them to the data range and reports the share that
fd.metrics.digits_classifier() reads as the digit asked for, with the Fréchet distance of their
digits features to the held-out split.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import ferrodiff as fd

PER_CLASS = 30
SAMPLER_STEPS = 50


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--variant", default="DiT-XS/2", help="DiT size and patch (default DiT-XS/2)")
    p.add_argument("--scales", default="1,4", help="guidance scales s, comma-separated (default 1,4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    scales = [float(s) for s in args.scales.split(",")]

    train = fd.datasets.digits(split="train", seed=args.seed)
    held_out = fd.datasets.digits(split="test", seed=args.seed)
    schedule = fd.Schedule.cosine(1000)
    model = fd.nn.DiT(variant=args.variant, num_classes=10, seed=args.seed)
    trainer = fd.Trainer(
        model,
        schedule,
        train.data,
        train.labels,
        batch_size=64,
        lr=1e-3,
        lr_schedule="cosine",
        warmup_steps=100,
        total_steps=args.steps,
        class_dropout=0.1,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    trainer.train(args.steps, progress=False)
    train_seconds = time.perf_counter() - t0

    classifier = fd.metrics.digits_classifier()
    labels = np.arange(10 * PER_CLASS) % 10
    sampler = fd.DDIM(schedule, steps=SAMPLER_STEPS)
    results = {}
    for s in scales:
        t0 = time.perf_counter()
        x = sampler.sample(trainer, (len(labels), 1, 8, 8), seed=args.seed, labels=labels, guidance_scale=s)
        seconds = time.perf_counter() - t0
        x = np.clip(x, -1.0, 1.0)
        read = classifier.predict_proba(x.reshape(len(x), -1)).argmax(1)
        results[s] = {
            "accuracy": float((read == labels).mean()),
            "frechet_vs_held_out": float(
                fd.metrics.frechet_distance(
                    fd.metrics.digits_features(x), fd.metrics.digits_features(held_out.data)
                )
            ),
            "sample_seconds": round(seconds, 2),
        }
    report = {
        "model": model.config,
        "parameters": model.num_parameters,
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "final_loss_mean_last_100": float(np.mean(trainer.losses[-100:])),
        "sampler": f"DDIM {SAMPLER_STEPS} steps, eta 0, EMA weights, {PER_CLASS} samples per digit, clipped to [-1, 1]",
        "classifier_accuracy_on_real_test_split_(it_trains_on_all_digits)": float(
            (
                classifier.predict_proba(held_out.data.reshape(len(held_out.data), -1)).argmax(1)
                == held_out.labels
            ).mean()
        ),
        "per_guidance_scale": results,
        "seed": args.seed,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
