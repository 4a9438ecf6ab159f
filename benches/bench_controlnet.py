#!/usr/bin/env python3
"""ControlNet on the 8x8 digits: does a ControlNet trained on a frozen class-conditional U-Net
make samples follow a control image? Not a test: run it by hand and paste the table into
BENCHMARKS.md.

    python3 benches/bench_controlnet.py                   # base 2400 steps, ControlNet 1500
    python3 benches/bench_controlnet.py --quick           # a few hundred steps each

The control of a digit is its coarse mask (``fd.controls.mask``: the pixels above the digit's
mean, as {-1, 1}) or its edge map (``fd.controls.edges``: the pixels whose central-difference
gradient magnitude is above the median). The base is the demo's U-Net (``fd.nn.UNet(base_channels=32,
num_classes=10)``) trained on the train split; the ControlNet (``fd.nn.ControlNet.from_unet``)
is trained on pairs (digit, control of that digit) with the base frozen. Samples are drawn for
the held-out digits' controls and labels (DDIM-50, guidance 2) from the base alone and from the
ControlNet; the table gives the mean IoU between each control and the same control extracted
from the sample, and the share of samples the digits classifier reads as their label. The
ControlNet's base is checked bit for bit against the base before training.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import ferrodiff as fd


CONTROLS = {"mask": fd.controls.mask, "edges": fd.controls.edges}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--control", choices=sorted(CONTROLS), default="mask")
    p.add_argument("--base-steps", type=int, default=2400)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.base_steps, args.steps = 300, 200

    train = fd.datasets.digits(split="train", seed=0)
    test = fd.datasets.digits(split="test", seed=0)
    control_of = CONTROLS[args.control]
    schedule = fd.Schedule.cosine(1000)
    common = dict(
        batch_size=64, lr=2e-3, lr_schedule="cosine", warmup_steps=100, prediction="v", seed=args.seed
    )

    start = time.perf_counter()
    base_trainer = fd.Trainer(
        fd.nn.UNet(base_channels=32, num_classes=10, seed=args.seed),
        schedule,
        train.data,
        train.labels,
        class_dropout=0.1,
        total_steps=args.base_steps,
        **common,
    )
    base_trainer.train(args.base_steps, progress=False)
    base = base_trainer.ema_model()
    base_s = time.perf_counter() - start

    start = time.perf_counter()
    controlnet = fd.nn.ControlNet.from_unet(base, seed=args.seed)
    trainer = fd.Trainer(
        controlnet,
        schedule,
        train.data,
        train.labels,
        control=control_of(train.data),
        class_dropout=0.1,
        total_steps=args.steps,
        **common,
    )
    trainer.train(args.steps, progress=False)
    control_s = time.perf_counter() - start
    trained = trainer.ema_model()
    frozen = fd.nn.ControlNet.base_of(trainer.model)
    unchanged = all(np.array_equal(frozen.state_dict()[k], v) for k, v in base.state_dict().items())

    n = len(test.data)
    controls, labels = control_of(test.data), test.labels
    ddim = fd.DDIM(schedule, steps=50, prediction="v")
    kw = dict(labels=labels, guidance_scale=2.0, seed=args.seed)
    x_base = ddim.sample(base, (n, 1, 8, 8), **kw)
    x_control = ddim.sample(trained, (n, 1, 8, 8), control_image=controls, **kw)
    classifier = fd.metrics.digits_classifier()
    rows = {
        "base U-Net alone": x_base,
        "ControlNet": x_control,
        "held-out digits themselves": test.data,
    }
    print(
        f"\ncontrol: {args.control}; base {args.base_steps} steps ({base_s:.0f} s), ControlNet "
        f"{args.steps} steps ({control_s:.0f} s); {n} held-out controls; base unchanged bit for bit: {unchanged}"
    )
    print(f"| samples | IoU of the {args.control} with the control | read as their label |")
    print("|---|---:|---:|")
    for name, x in rows.items():
        agree = fd.controls.agreement(x, controls, args.control)
        accuracy = float(np.mean(classifier.predict_proba(np.clip(x, -1, 1)).argmax(1) == labels))
        print(f"| {name} | {agree:.3f} | {accuracy:.1%} |")


if __name__ == "__main__":
    main()
