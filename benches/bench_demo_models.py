#!/usr/bin/env python3
"""Which model the demo can afford: train a class-conditional U-Net on the digits for a fixed
time budget with the demo's recipe, then judge 100 DDIM-50 samples as `tests/test_quality.py`
does (scikit-learn's calibrated SVC trained on the train split). Not a test: run it by hand.

    RAYON_NUM_THREADS=2 python benches/bench_demo_models.py --budget 150 --batch 64 --base 16

Prints one JSON line: parameters, ms per step (timed on 10 steps first), the steps that fit the
budget, training and sampling seconds, the confident fraction (max probability >= 0.9) of the
samples and of real held-out digits, their ratio, and how many samples read as their label.
"""

import argparse
import json
import time

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC

import ferrodiff as fd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=150.0, help="training seconds (default 150)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--base", type=int, default=16, help="the U-Net's base channels")
    args = p.parse_args()
    train = fd.datasets.digits(split="train", seed=0)
    test = fd.datasets.digits(split="test", seed=0)
    schedule = fd.Schedule.cosine(1000)

    def unet():
        return fd.nn.UNet(
            in_channels=1,
            image_size=8,
            base_channels=args.base,
            channel_mult=(1, 2),
            attention_resolutions=(4,),
            num_classes=10,
            seed=0,
        )

    probe = fd.Trainer(unet(), schedule, train.data, train.labels, batch_size=args.batch, seed=0)
    probe.train(3, progress=False)
    t0 = time.perf_counter()
    probe.train(10, progress=False)
    per_step = (time.perf_counter() - t0) / 10
    steps = int(args.budget / per_step)
    model = unet()
    trainer = fd.Trainer(
        model,
        schedule,
        train.data,
        train.labels,
        batch_size=args.batch,
        lr=1e-3,
        lr_schedule="cosine",
        warmup_steps=100,
        class_dropout=0.1,
        total_steps=steps,
        seed=0,
    )
    t0 = time.perf_counter()
    trainer.train(steps, progress=False)
    train_s = time.perf_counter() - t0
    labels = np.arange(100) % 10
    t0 = time.perf_counter()
    x = fd.DDIM(schedule, steps=50).sample(trainer, (100, 1, 8, 8), seed=0, labels=labels, progress=False)
    sample_s = time.perf_counter() - t0
    x = np.clip(x, -1, 1).reshape(len(x), -1)
    clf = CalibratedClassifierCV(SVC(random_state=0), ensemble=False).fit(
        train.data.reshape(len(train.data), -1), train.labels
    )

    def confident(v):
        return float((clf.predict_proba(v.reshape(len(v), -1)).max(1) >= 0.9).mean())

    real, generated = confident(test.data), confident(x)
    print(
        json.dumps(
            {
                "parameters": model.num_parameters,
                "batch": args.batch,
                "base_channels": args.base,
                "ms_per_step": per_step * 1e3,
                "steps": steps,
                "train_seconds": train_s,
                "sample_seconds": sample_s,
                "real_confident": real,
                "generated_confident": generated,
                "ratio": generated / real,
                "read_as_label": float((clf.predict(x) == labels).mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
