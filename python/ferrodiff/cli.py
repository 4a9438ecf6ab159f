"""The ``ferrodiff`` command line.

- ``ferrodiff demo [--out DIR]``: trains the default model on the bundled handwritten digits (about
  two minutes on a 2-core CPU), samples it with DDIM and writes ``samples.png`` (a grid),
  ``samples.npy`` (float32 [N, 1, 8, 8] in [-1, 1]), ``loss.png``, ``metrics.json`` and the run's
  checkpoint (``run/``) into ``./ferrodiff-demo/``.
- ``ferrodiff train --data NAME [--path P] --out RUN``: trains on a dataset of
  :mod:`ferrodiff.datasets`, checkpointing into the run folder; ``--resume RUN`` continues a
  stopped run exactly where it stopped.
  ``--objective consistency-training`` trains a consistency model from the data alone (iCT by
  default, ``--recipe ct`` for the original recipe).
  ``--latent AE`` trains a U-Net on the latents of the autoencoder AE (latent diffusion): the run
  folder also holds ``autoencoder.safetensors``, the autoencoder with the latents' scale factor.
- ``ferrodiff train-autoencoder --data NAME --kind {kl,vq} --out AE``: trains the autoencoder of
  latent diffusion on an image dataset, checkpointing into AE (``--resume`` continues it), and
  writes ``metrics.json``: PSNR of held-out reconstructions, and for VQ the codebook usage.
- ``ferrodiff distill --checkpoint RUN --from-steps 64 --to-steps 4 --out RUN2``: progressive
  distillation of a trained run (``RUN2/steps-N/`` holds the student of each round);
  ``--method consistency`` distils it into a consistency model instead. Rerunning the command
  resumes a stopped distillation exactly.
- ``ferrodiff sample --checkpoint RUN --sampler {ddpm,ddim} --steps S --n N --out FILE.{npy,png}``:
  a distilled student samples with its own step count and grid, a consistency model with
  :class:`ferrodiff.ConsistencySampler` (one step unless ``--steps``); a latent run samples
  latents and decodes them with its autoencoder.
- ``ferrodiff oracle-demo``: samples the eight-Gaussians mixture with its exact denoiser through
  DDPM and DDIM and reports the energy distance of each to the truth.

Every file is written to a temporary file and renamed, so an interrupted command never leaves a
truncated output where a good one was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    """Writes through a temporary file in the same folder, then renames: a failure half-way
    never leaves a truncated file where a previous good one was. ``suffix`` ends the temporary
    file's name (writers that choose the format by extension need the real one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
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


def _save_model(path: Path, model) -> None:
    """``model.save`` to a ``.safetensors`` file, atomically."""
    _atomic_write(path, model.save, suffix=".tmp.safetensors")


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


# The demo's model and training: a class-conditional U-Net (two levels, 16 and 32 channels,
# attention at 4x4; 191k parameters) on the 8x8 digits, sized so training takes about two
# minutes on a 2-core CPU (see BENCHMARKS.md: with the CPU kernels it matches the residual MLP
# that was the demo before on the quality test, and reads as the requested label more often).
# One row in ten is trained with the null label (Ho & Salimans 2022 use 0.1 to 0.2), so the same
# model also predicts the unconditional ε that classifier-free guidance (`guidance_scale=`) needs.
DEMO_MODEL = dict(
    in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,)
)
DEMO_TRAIN = dict(batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=100, class_dropout=0.1)
DEMO_STEPS = 2400
DEMO_SAMPLER_STEPS = 50


def _plot_loss(path: Path, losses: np.ndarray) -> bool:
    try:
        from ferrodiff.notebook import plot_loss, save_figure

        fig = plot_loss(losses, title="training loss")
    except ImportError:
        print(
            "matplotlib is not installed: skipping loss.png (pip install 'ferrodiff[plot]')", file=sys.stderr
        )
        return False
    save_figure(fig, path)
    return True


def _save_samples(path: Path, x: np.ndarray) -> None:
    if path.suffix == ".npy":
        _save_npy(path, x)
    elif path.suffix == ".png":
        from ferrodiff.notebook import image_grid

        if x.ndim == 2 and x.shape[1] == 2:
            from ferrodiff.notebook import save_figure, scatter

            save_figure(scatter(x), path)
        else:
            image_grid(x).save(path)
    else:
        raise ValueError(f"--out must end in .npy or .png, got {path}")


def demo(out: Path, steps: int, n: int, seed: int, progress: bool) -> dict:
    """Trains the demo model on digits, samples it, writes the outputs; returns the metrics."""
    import ferrodiff as fd

    train = fd.datasets.digits(split="train", seed=seed)
    held_out = fd.datasets.digits(split="test", seed=seed)
    schedule = fd.Schedule.cosine(1000)
    model = fd.nn.UNet(num_classes=10, seed=seed, **DEMO_MODEL)
    trainer = fd.Trainer(
        model, schedule, train.data, train.labels, total_steps=steps, seed=seed, **DEMO_TRAIN
    )
    trainer.extra = {"data": "digits", "steps": steps}
    start = time.perf_counter()
    trainer.train(steps, progress=progress)
    train_seconds = time.perf_counter() - start
    trainer.save(out / "run")
    labels = np.arange(n) % 10
    start = time.perf_counter()
    # No clip_sample: with ε kept unclipped (diffusers' default) a clipped x0 at the first,
    # nearly pure-noise steps of the cosine schedule saturates into ±1 patterns.
    x = fd.DDIM(schedule, steps=DEMO_SAMPLER_STEPS).sample(
        trainer, (n, 1, 8, 8), seed=seed, labels=labels, progress=progress
    )
    sample_seconds = time.perf_counter() - start
    x = np.clip(x, -1.0, 1.0)  # the data range; the network's last step can overshoot slightly
    _save_npy(out / "samples.npy", x)
    _save_npy(out / "labels.npy", labels.astype(np.int64))
    fd.notebook.image_grid(x[: min(n, 100)], nrow=10).save(out / "samples.png")
    _plot_loss(out / "loss.png", trainer.losses)
    metrics = {
        "data": "digits (scikit-learn, 8x8)",
        "model": model.config,
        "parameters": model.num_parameters,
        "train_steps": steps,
        "train_seconds": train_seconds,
        "final_loss_mean_last_100": float(np.mean(trainer.losses[-100:])),
        "sampler": f"DDIM {DEMO_SAMPLER_STEPS} steps, eta 0, EMA weights; output clipped to [-1, 1]",
        "samples": n,
        "sample_seconds": sample_seconds,
        "frechet_digits_features_samples_vs_held_out": fd.metrics.frechet_distance(
            fd.metrics.digits_features(x), fd.metrics.digits_features(held_out.data)
        ),
        "frechet_digits_features_train_vs_held_out": fd.metrics.frechet_distance(
            fd.metrics.digits_features(train.data), fd.metrics.digits_features(held_out.data)
        ),
        "seed": seed,
    }
    _save_json(out / "metrics.json", metrics)
    return metrics


def oracle_demo(out: Path, n: int, seed: int, progress: bool) -> dict:
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


# The autoencoder of a latent run, with its latents' scale factor, beside the checkpoint.
LATENT_AUTOENCODER_FILE = "autoencoder.safetensors"

TOYS = ("swissroll", "moons", "eight_gaussians", "checkerboard", "circles")


def _load_data(name: str, path: str | None, conditional: bool):
    import ferrodiff as fd

    ds = fd.datasets.load(name, path)
    labels = ds.labels if conditional else None
    return ds, labels


def _build_model(kind: str, ds, conditional: bool, hidden: int, channels: int, seed: int):
    import ferrodiff as fd

    num_classes = ds.num_classes if conditional else 0
    shape = tuple(ds.shape)
    if kind == "auto":
        kind = "mlp" if len(shape) == 1 or int(np.prod(shape)) <= 64 else "unet"
    if kind == "mlp":
        return fd.nn.MLP(data_shape=shape, hidden=hidden, num_classes=num_classes, seed=seed)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(
            f"--model {kind} needs square images [C, H, W], the data has samples of shape {shape}"
        )
    if kind == "dit":
        # DiT-XS with 2x2 patches (1x1 for an odd side).
        patch = 2 if shape[1] % 2 == 0 else 1
        return fd.nn.DiT(
            in_channels=shape[0], image_size=shape[1], patch_size=patch, num_classes=num_classes, seed=seed
        )
    return _unet(shape, num_classes, channels, seed)


def _unet(shape: tuple[int, ...], num_classes: int, channels: int, seed: int):
    """The command line's U-Net for samples [C, S, S]: two levels up to 16x16, three above, fewer
    where S does not halve that often (one level, channel_mult (1,), for an odd S such as the
    7x7 latents of a three-level autoencoder on 28x28 images); attention at the lowest level."""
    import ferrodiff as fd

    side = shape[1]
    levels = 2 if side <= 16 else 3
    while levels > 1 and side % 2 ** (levels - 1):
        levels -= 1
    return fd.nn.UNet(
        in_channels=shape[0],
        image_size=side,
        base_channels=channels,
        channel_mult=(1, 2, 2)[:levels],
        attention_resolutions=(side // 2 ** (levels - 1),),
        num_classes=num_classes,
        seed=seed,
    )


def _first(array, limit: int | None):
    """The first ``limit`` rows of ``array`` (all of them when ``limit`` is None)."""
    if array is None or limit is None:
        return array
    return array[:limit]


def _require_images(ds, name: str) -> None:
    if ds.data.ndim != 4:
        raise ValueError(
            f"--data {name}: an autoencoder needs images [N, C, H, W], but {name} has samples of "
            f"shape {tuple(ds.shape)} (use digits, mnist, fashion_mnist, cifar10 or folder)"
        )


def _load_autoencoder(path):
    """The autoencoder at ``path`` (a ``train-autoencoder`` run folder, EMA weights, or a
    ``.safetensors`` file), refusing any other model."""
    import ferrodiff as fd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no autoencoder there (expected a run folder of ferrodiff train-autoencoder "
            "or a .safetensors file)"
        )
    model = fd.nn.Model.load(path)
    kind = model.config.get("type")
    if kind != "autoencoder":
        raise ValueError(
            f"--latent {path}: expected an autoencoder (ferrodiff train-autoencoder) but it holds a "
            f"{kind} model"
        )
    return model


def _latent_trainer(args, ds, images, labels, schedule, out: Path, trainer_kwargs):
    """A trainer of a latent U-Net on the scaled latents of ``images`` under the autoencoder
    ``args.latent``, whose copy with the scale factor (1 / std of those latents unless the
    autoencoder has one) it writes to ``out``; returns the trainer and that copy."""
    import ferrodiff as fd

    ae = _load_autoencoder(args.latent)
    if ds.data.ndim != 4 or list(ae.data_shape) != list(ds.shape):
        raise ValueError(
            f"the autoencoder {args.latent} takes images of shape {list(ae.data_shape)} but "
            f"{args.data} has samples of shape {list(ds.shape)}"
        )
    latent_shape = tuple(ae.latent_shape())
    num_classes = ds.num_classes if args.conditional else 0
    denoiser = _unet(latent_shape, num_classes, args.channels, args.seed)
    pipeline = fd.LatentDiffusion(ae, denoiser, schedule)
    if ae.scaling_factor == 1.0:
        pipeline.fit_scaling_factor(images)
    saved = out / LATENT_AUTOENCODER_FILE
    _save_model(saved, pipeline.autoencoder)
    # Train on the latents as scaled by the saved file, the one `sample` decodes with; the
    # pipeline keeps its cache of the unscaled latents, so the images are encoded once.
    pipeline.autoencoder = fd.nn.Model.load(saved)
    trainer = pipeline.trainer(images, labels, **trainer_kwargs)
    return trainer, pipeline.autoencoder


def train_command(args) -> int:
    import ferrodiff as fd

    if args.resume:
        run = Path(args.resume)
        info_path = run / "config.json"
        if not info_path.exists():
            raise FileNotFoundError(
                f"{info_path}: no run to resume (expected a folder written by ferrodiff train)"
            )
        extra = json.loads(info_path.read_text())["extra"]
        if extra.get("command") == "train-autoencoder":
            raise ValueError(
                f"{run} is an autoencoder run: continue it with "
                f"ferrodiff train-autoencoder --out {run} --resume"
            )
        ds, labels = _load_data(extra["data"], extra.get("path"), extra.get("conditional", False))
        data, labels = _first(ds.data, extra.get("limit")), _first(labels, extra.get("limit"))
        latent = extra.get("latent")
        if latent:
            ae = fd.nn.Model.load(run / latent["autoencoder"])
            data = ae.encode(data) * np.float32(ae.scaling_factor)  # as LatentDiffusion.encode
        trainer = fd.Trainer.resume(run, data, labels)
        total = int(extra["steps"])
        out = run
        print(f"resuming {run} at step {trainer.step} of {total}")
    else:
        out = Path(args.out)
        if args.latent and args.model in ("mlp", "dit"):
            raise ValueError(
                f"--latent trains a U-Net on the autoencoder's latents: --model {args.model} does not apply"
            )
        if args.latent and args.objective != "diffusion":
            raise ValueError(
                f"--latent trains a diffusion model; --objective {args.objective} is not supported with it"
            )
        ds, labels = _load_data(args.data, args.path, args.conditional)
        images, labels = _first(ds.data, args.limit), _first(labels, args.limit)
        schedule = (
            fd.Schedule.cosine(args.timesteps)
            if args.schedule == "cosine"
            else fd.Schedule.linear(args.timesteps)
        )
        objective = args.objective.replace("-", "_")
        options = {"recipe": args.recipe} if objective == "consistency_training" else None
        trainer_kwargs = dict(
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=min(args.warmup_steps, max(args.steps - 1, 0)),
            total_steps=args.steps,
            class_dropout=args.label_dropout if args.conditional else 0.0,
            seed=args.seed,
            objective=objective,
            objective_options=options,
        )
        total = args.steps
        extra = {
            "data": args.data,
            "path": args.path,
            "conditional": args.conditional,
            "steps": total,
            "limit": args.limit,
        }
        if args.latent:
            trainer, ae = _latent_trainer(args, ds, images, labels, schedule, out, trainer_kwargs)
            extra["latent"] = {
                "scaling_factor": float(ae.scaling_factor),
                "autoencoder": LATENT_AUTOENCODER_FILE,
                "image_shape": list(ds.shape),
                "source": str(args.latent),
            }
        else:
            model = _build_model(args.model, ds, args.conditional, args.hidden, args.channels, args.seed)
            trainer = fd.Trainer(
                model,
                None if objective == "consistency_training" else schedule,
                images,
                labels,
                **trainer_kwargs,
            )
        trainer.extra = extra
    remaining = max(total - trainer.step, 0)
    if args.max_steps_this_run is not None:
        remaining = min(remaining, args.max_steps_this_run)
    every = args.checkpoint_every or max(total // 10, 1)
    trainer.train(remaining, progress=not args.no_progress, checkpoint=out, checkpoint_every=every)
    _save_npy(out / "losses.npy", np.asarray(trainer.losses))
    _plot_loss(out / "loss.png", trainer.losses)
    print(f"step {trainer.step}/{total}: checkpoint in {out}/checkpoint.safetensors")
    return 0


# Loaders with a held-out split="test" (the autoencoder is evaluated there); any other image
# dataset holds out its last HELD_OUT_FRACTION of images instead.
_HELD_OUT_SPLITS = ("digits", "mnist", "fashion_mnist", "cifar10")
HELD_OUT_FRACTION = 0.1
AUTOENCODER_DEFAULTS = dict(layers_per_block=1, mid_block_add_attention=True)
# GroupNorm of LDM's autoencoders has 32 groups at 128+ channels; 8 suits the small widths here.
MAX_NORM_GROUPS = 8


def _autoencoder_data(name: str, path, limit: int | None):
    """(training images, held-out images, a description of the held-out set) of an image dataset."""
    import ferrodiff as fd
    from ferrodiff.datasets import _ALIASES

    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in _HELD_OUT_SPLITS:
        train = fd.datasets.load(name, path, split="train")
        _require_images(train, name)
        test = fd.datasets.load(name, path, split="test").data
        # A single file given as --path has no split: the "test" split is the same images.
        if test.shape != train.data.shape or not np.array_equal(test, train.data):
            return _first(train.data, limit), test, f"{key} split 'test'"
        images = train.data
    else:
        ds = fd.datasets.load(name, path)
        _require_images(ds, name)
        images = ds.data
    n_held_out = int(len(images) * HELD_OUT_FRACTION) if len(images) >= 20 else 0
    if n_held_out == 0:
        return _first(images, limit), images, "none: the training images (too few to hold any out)"
    kept = images[: len(images) - n_held_out]
    return _first(kept, limit), images[len(kept) :], f"the last {n_held_out} images of {key}"


def _channels_arg(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ValueError(f"--channels must be comma-separated positive widths, e.g. 32,64,64, got {text!r}")
    return widths


def _build_autoencoder(args, image_shape: tuple[int, ...]):
    import ferrodiff as fd

    widths = _channels_arg(args.channels)
    if image_shape[1] != image_shape[2]:
        raise ValueError(f"--data {args.data}: the autoencoder needs square images, got {list(image_shape)}")
    common = dict(
        in_channels=image_shape[0],
        image_size=image_shape[1],
        block_out_channels=widths,
        latent_channels=args.latent_channels,
        # The largest group count up to 8 that divides every width.
        norm_num_groups=math.gcd(MAX_NORM_GROUPS, *widths),
        seed=args.seed,
        **AUTOENCODER_DEFAULTS,
    )
    if args.kind == "vq":
        return fd.nn.VQModel(num_vq_embeddings=args.codebook_size, **common)
    return fd.nn.AutoencoderKL(**common)


def _autoencoder_options(args) -> dict:
    adversarial = {}
    if args.disc_weight > 0:
        adversarial = {
            "disc_weight": args.disc_weight,
            "disc_start": args.disc_start,
            "disc_layers": args.disc_layers,
        }
    if args.kind == "vq":
        return {
            "reconstruction": args.reconstruction,
            "commitment": args.commitment,
            "codebook_update": args.codebook_update,
            "dead_code_threshold": args.dead_code_threshold,
            **adversarial,
        }
    return {"reconstruction": args.reconstruction, "kl_weight": args.kl_weight, **adversarial}


def _evaluate_autoencoder(model, images: np.ndarray) -> dict:
    """PSNR of the reconstructions of ``images`` (clipped to the data range [-1, 1]), and for a
    VQ autoencoder how they use the codebook."""
    import ferrodiff as fd

    reconstructions = np.clip(model.reconstruct(images), -1.0, 1.0)
    metrics = {"psnr_db": fd.metrics.psnr(reconstructions, images)}
    if model.config.get("kind") == "vq":
        metrics.update(model.codebook_usage(images))
    return metrics


def train_autoencoder_command(args) -> int:
    """Trains a KL or VQ autoencoder on an image dataset, checkpointing into ``args.out``; then
    writes ``metrics.json`` (held-out reconstruction PSNR; codebook usage for VQ)."""
    import ferrodiff as fd

    out = Path(args.out)
    if args.resume:
        info_path = out / "config.json"
        if not info_path.exists():
            raise FileNotFoundError(
                f"{info_path}: no run to resume (expected a folder written by ferrodiff train-autoencoder)"
            )
        extra = json.loads(info_path.read_text())["extra"] or {}
        if extra.get("command") != "train-autoencoder":
            raise ValueError(
                f"{out} was not written by ferrodiff train-autoencoder: resume it with its own command"
            )
        images, held_out, held_out_name = _autoencoder_data(
            extra["data"], extra.get("path"), extra.get("limit")
        )
        trainer = fd.Trainer.resume(out, images)
        print(f"resuming {out} at step {trainer.step} of {extra['steps']}")
    else:
        images, held_out, held_out_name = _autoencoder_data(args.data, args.path, args.limit)
        model = _build_autoencoder(args, tuple(images.shape[1:]))
        trainer = fd.Trainer(
            model,
            None,
            images,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule="cosine",
            warmup_steps=min(args.warmup_steps, max(args.steps - 1, 0)),
            total_steps=args.steps,
            seed=args.seed,
            objective="autoencoder",
            objective_options=_autoencoder_options(args),
        )
        extra = {
            "command": "train-autoencoder",
            "data": args.data,
            "path": args.path,
            "kind": args.kind,
            "steps": args.steps,
            "limit": args.limit,
        }
        trainer.extra = extra
    total = int(extra["steps"])
    remaining = max(total - trainer.step, 0)
    if args.max_steps_this_run is not None:
        remaining = min(remaining, args.max_steps_this_run)
    every = args.checkpoint_every or max(total // 10, 1)
    start = time.perf_counter()
    trainer.train(remaining, progress=not args.no_progress, checkpoint=out, checkpoint_every=every)
    train_seconds = time.perf_counter() - start
    losses = np.asarray(trainer.losses)
    _save_npy(out / "losses.npy", losses)
    _plot_loss(out / "loss.png", losses)

    # The EMA weights: what fd.nn.Model.load(out) and `train --latent out` use.
    model = trainer.ema_model()
    latent_shape = list(model.latent_shape())
    metrics = {
        "data": extra["data"],
        "kind": extra["kind"],
        "model": model.config,
        "parameters": model.num_parameters,
        "latent_shape": latent_shape,
        "downsampling_factor": int(images.shape[-1]) // latent_shape[-1],
        "step": int(trainer.step),
        "steps": total,
        "train_images": int(len(images)),
        "train_seconds_this_run": train_seconds,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])) if len(losses) else None,
        "held_out": held_out_name,
        "held_out_images": int(len(held_out)),
        "weights": "ema",
        **_evaluate_autoencoder(model, held_out),
    }
    _save_json(out / "metrics.json", metrics)
    summary = f"held-out PSNR {metrics['psnr_db']:.2f} dB"
    if extra["kind"] == "vq":
        summary += (
            f", {metrics['codes_used']}/{metrics['num_codes']} codes used, "
            f"perplexity {metrics['perplexity']:.1f}"
        )
    print(
        f"{extra['kind']} autoencoder, step {trainer.step}/{total}: latents "
        f"{'x'.join(map(str, latent_shape))}, {summary}; checkpoint and metrics.json in {out}"
    )
    return 0


def _schedule_arg(args):
    import ferrodiff as fd

    if getattr(args, "schedule_from", None):
        return fd.Schedule.from_checkpoint(Path(args.schedule_from))
    if args.schedule == "cosine":
        return fd.Schedule.cosine(args.timesteps)
    return fd.Schedule.linear(args.timesteps)


def train_classifier_command(args) -> int:
    """Trains a noisy classifier f(y | x_t, t) for classifier guidance; holds out 10 % of the
    data (seeded) and reports its accuracy there at a few noise levels."""
    import ferrodiff as fd

    out = Path(args.out)
    ds = fd.datasets.load(args.data, args.path)
    if ds.labels is None or ds.num_classes < 2:
        raise ValueError(f"dataset {args.data!r} has no class labels to train a classifier on")
    schedule = _schedule_arg(args)
    hidden = [int(h) for h in args.hidden.split(",") if h.strip()]
    if not hidden:
        raise ValueError("--hidden must be comma-separated widths, e.g. 256,256")
    n = len(ds.data)
    order = np.random.default_rng(args.seed).permutation(n)
    n_test = max(n // 10, 1) if n >= 20 else 0
    test, train = order[:n_test], order[n_test:]
    in_dim = int(np.prod(ds.shape))
    clf = fd.nn.Classifier(in_dim, hidden, ds.num_classes, seed=args.seed, time_embed_dim=args.time_embed_dim)
    losses = clf.fit(
        ds.data[train],
        ds.labels[train],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        schedule=schedule,
    )
    out.mkdir(parents=True, exist_ok=True)
    clf.save(out)
    metrics = {
        "data": args.data,
        "steps": args.steps,
        "final_loss": float(np.mean(losses[-50:])),
        "train_samples": int(len(train)),
        "test_samples": int(n_test),
        "test_accuracy": {},
    }
    if n_test:
        x0, y = ds.data[test], ds.labels[test]
        for frac in (0.0, 0.25, 0.5, 0.75):
            t = int(frac * (len(schedule) - 1))
            xt = schedule.q_sample(x0, np.full(n_test, t), fd.randn(x0.shape, args.seed + 1 + t))
            acc = float(np.mean(np.argmax(clf.predict_proba(xt, t), axis=1) == y))
            metrics["test_accuracy"][str(t)] = acc
    _save_json(out / "metrics.json", metrics)
    _plot_loss(out / "loss.png", losses)
    accs = ", ".join(f"t={t}: {a:.1%}" for t, a in metrics["test_accuracy"].items())
    print(f"wrote {out}/classifier.safetensors ({args.steps} steps); held-out accuracy {accs}")
    return 0


def sample_command(args) -> int:
    import ferrodiff as fd

    run = Path(args.checkpoint)
    model = fd.nn.Model.load(run, ema=not args.no_ema)
    schedule = fd.Schedule.from_checkpoint(run)
    train_info = _run_train_config(run)
    objective = train_info.get("objective") or {}
    if model.config.get("type") == "autoencoder":
        raise ValueError(
            f"{args.checkpoint} is an autoencoder, not a diffusion model: train one on its latents "
            f"with ferrodiff train --latent {args.checkpoint} and sample that run"
        )
    autoencoder = _run_autoencoder(run)
    classifier = None
    if args.classifier is not None and autoencoder is not None:
        raise ValueError(
            f"{args.checkpoint} is a latent diffusion run: --classifier guides models of the images "
            "themselves, not of latents"
        )
    if args.classifier is not None:
        classifier = fd.nn.Classifier.load(Path(args.classifier))
        trained_on = classifier.schedule
        if trained_on is not None and (
            len(trained_on) != len(schedule)
            or not np.allclose(trained_on.alphas_cumprod, schedule.alphas_cumprod, rtol=1e-6, atol=1e-12)
        ):
            raise ValueError(
                f"the classifier {args.classifier} was trained on another noise schedule than the model "
                f"{args.checkpoint}: train it with --schedule-from {args.checkpoint}"
            )
    elif args.classifier_scale is not None:
        raise ValueError("--classifier-scale needs --classifier CLF")
    kind = objective.get("kind", "diffusion")
    if kind in ("consistency_training", "consistency_distillation"):
        if classifier is not None:
            raise ValueError(
                "--classifier guides diffusion models; a consistency model has no score to guide"
            )
        p = objective.get("params", {})
        sampler = fd.ConsistencySampler(
            steps=args.steps or 1,
            **{k: p[k] for k in ("sigma_min", "sigma_max", "sigma_data", "rho") if k in p},
        )
        what = f"consistency sampling, {sampler.steps} step(s)"
    elif kind == "progressive_distillation" and args.steps is None:
        n = int(objective["student_steps"])
        prediction = train_info.get("prediction", "v")
        sampler = fd.distill.student_sampler(schedule, n, objective.get("sigma_max", 80.0), prediction)
        what = f"distilled student, {n} DDIM steps"
    elif args.sampler == "ddim":
        sampler = fd.DDIM(
            schedule,
            steps=args.steps or 50,
            eta=args.eta,
            clip_sample=args.clip,
            prediction=train_info.get("prediction", "epsilon"),
        )
        what = f"ddim {args.steps or 50} steps"
    else:
        sampler = fd.DDPM(
            schedule,
            steps=args.steps or 50,
            clip_sample=args.clip,
            prediction=train_info.get("prediction", "epsilon"),
        )
        what = f"ddpm {args.steps or 50} steps"
    shape = (args.n, *model.data_shape)
    if model.config.get("type") == "control_net":
        extra_info = _run_config(run).get("extra") or {}
        if args.control is not None:
            control = np.load(args.control).astype(np.float32)
        else:
            _, _, held_out, _ = _controlnet_data(extra_info)
            control = fd.controls.make(extra_info.get("control", "mask"), held_out)
        if len(control) < args.n:
            control = np.resize(control, (args.n, *control.shape[1:]))
        model = model.with_control(control[: args.n])
        what += f", controlled by {args.control or 'the held-out controls'}"
    elif args.control is not None:
        raise ValueError("--control goes with a ControlNet run (ferrodiff train-controlnet)")
    labels = None
    if args.labels is not None:
        wanted = [int(v) for v in args.labels.split(",") if v.strip()]
        if not wanted:
            raise ValueError("--labels must be a comma-separated list of class indices, e.g. 0,1,2")
        labels = np.resize(np.array(wanted), args.n)  # repeats to fill N
    elif model.num_classes > 0:
        labels = np.arange(args.n) % model.num_classes
    elif classifier is not None:
        labels = np.arange(args.n) % classifier.num_classes
    if args.guidance_scale is not None and labels is None:
        raise ValueError("--guidance-scale needs a class-conditional checkpoint (or --labels)")
    extra = {}
    if classifier is not None:
        extra = dict(
            classifier=classifier,
            classifier_scale=1.0 if args.classifier_scale is None else args.classifier_scale,
        )
    x = sampler.sample(
        model,
        shape,
        seed=args.seed,
        labels=labels,
        guidance_scale=args.guidance_scale,
        progress=not args.no_progress,
        **extra,
    )
    if autoencoder is not None:
        x = fd.LatentDiffusion(autoencoder, model, schedule).decode(x)
        what += ", latents decoded by the run's autoencoder"
    _save_samples(Path(args.out), x)
    print(f"wrote {args.out} ({args.n} samples, {what})")
    return 0


def _controlnet_data(extra: dict):
    """(training images, labels or None, held-out images, held-out labels or None) of the data a
    base run was trained on."""
    name, path, conditional = extra["data"], extra.get("path"), extra.get("conditional", False)
    images, held_out, _ = _autoencoder_data(name, path, extra.get("limit"))
    import ferrodiff as fd
    from ferrodiff.datasets import _ALIASES

    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    labels = held_labels = None
    if conditional:
        if key not in _HELD_OUT_SPLITS:
            raise ValueError(f"a conditional ControlNet needs a dataset with a test split, not {name}")
        labels = _first(fd.datasets.load(name, path, split="train").labels, extra.get("limit"))
        held_labels = fd.datasets.load(name, path, split="test").labels
    return images, labels, held_out, held_labels


def _control_iou(samples: np.ndarray, controls: np.ndarray, kind: str) -> float | None:
    """Mean IoU of the samples' controls with ``controls`` (None for the non-binary lowres)."""
    import ferrodiff as fd

    return None if kind == "lowres" else fd.controls.agreement(samples, controls, kind)


def train_controlnet_command(args) -> int:
    """Trains a ControlNet on a trained run (frozen) with controls made from its data; writes
    the run folder and metrics.json (agreement of samples with held-out controls, against the
    base alone)."""
    import ferrodiff as fd

    base_run = Path(args.checkpoint)
    base_extra = _run_config(base_run).get("extra") or {}
    if base_extra.get("command", "train") != "train" or "data" not in base_extra:
        raise ValueError(
            f"--checkpoint {base_run}: expected a run folder of ferrodiff train (its data set is "
            "read from the run's config.json)"
        )
    if base_extra.get("latent"):
        raise ValueError("a ControlNet on a latent diffusion run is not supported by the command line")
    base = fd.nn.Model.load(base_run)
    if base.config.get("type") != "unet":
        raise ValueError(
            f"--checkpoint {base_run}: a ControlNet needs a U-Net run, this is a {base.config.get('type')}"
        )
    schedule = fd.Schedule.from_checkpoint(base_run)
    prediction = _run_train_config(base_run).get("prediction", "epsilon")
    images, labels, held_out, held_labels = _controlnet_data(base_extra)
    controls = fd.controls.make(args.control, images)
    channels = controls.shape[1]
    controlnet = fd.nn.ControlNet.from_unet(base, conditioning_channels=channels, seed=args.seed)
    trainer = fd.Trainer(
        controlnet,
        schedule,
        images,
        labels,
        control=controls,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule="cosine",
        warmup_steps=min(100, max(args.steps - 1, 0)),
        total_steps=args.steps,
        class_dropout=0.1 if labels is not None else 0.0,
        prediction=prediction,
        seed=args.seed,
    )
    trainer.extra = {
        "command": "train-controlnet",
        "control": args.control,
        "base": str(base_run),
        **{k: base_extra.get(k) for k in ("data", "path", "conditional", "limit")},
    }
    out = Path(args.out)
    trainer.train(
        args.steps, progress=not args.no_progress, checkpoint=out, checkpoint_every=max(args.steps // 10, 1)
    )
    _save_npy(out / "losses.npy", np.asarray(trainer.losses))
    n = min(args.eval, len(held_out))
    metrics: dict = {"control": args.control, "steps": trainer.step}
    if n > 0:
        sampler = fd.DDIM(schedule, steps=20, prediction=prediction)
        kw = dict(seed=args.seed)
        if held_labels is not None:
            kw.update(labels=held_labels[:n], guidance_scale=2.0)
        x_control = sampler.sample(
            trainer.ema_model(),
            (n, *base.data_shape),
            control_image=fd.controls.make(args.control, held_out[:n]),
            **kw,
        )
        x_base = sampler.sample(base, (n, *base.data_shape), **kw)
        wanted = fd.controls.make(args.control, held_out[:n])
        metrics.update(
            held_out=n,
            iou_controlnet=_control_iou(x_control, wanted, args.control),
            iou_base=_control_iou(x_base, wanted, args.control),
            mse_to_control_controlnet=float(
                np.mean((fd.controls.make(args.control, np.clip(x_control, -1, 1)) - wanted) ** 2)
            ),
            mse_to_control_base=float(
                np.mean((fd.controls.make(args.control, np.clip(x_base, -1, 1)) - wanted) ** 2)
            ),
        )
    _save_json(out / "metrics.json", metrics)
    print(f"ControlNet ({args.control}) on {base_run}: {trainer.step} steps, checkpoint in {out}; {metrics}")
    return 0


def _run_config(run: Path) -> dict:
    """A run folder's config.json ({} if none); ``run`` may also be a file inside the folder."""
    info = run / "config.json" if run.is_dir() else run.parent / "config.json"
    if not info.exists():
        return {}
    return json.loads(info.read_text())


def _run_autoencoder(run: Path):
    """The autoencoder of a latent run (``train --latent``), or None for a run on the data itself."""
    import ferrodiff as fd

    folder = run if run.is_dir() else run.parent
    latent = (_run_config(run).get("extra") or {}).get("latent")
    path = folder / (latent or {}).get("autoencoder", LATENT_AUTOENCODER_FILE)
    if latent is None and not path.exists():
        return None
    if not path.exists():
        raise FileNotFoundError(f"{path}: {run} samples latents but its autoencoder is missing")
    return fd.nn.Model.load(path)


def _run_train_config(run: Path) -> dict:
    """The training settings recorded in a run folder's config.json ({} if none)."""
    return _run_config(run).get("train", {}) or {}


def distill_command(args) -> int:
    """Distils a trained run: progressively (halving its DDIM steps per round) or into a
    consistency model; rerunning the same command resumes a stopped distillation."""
    import ferrodiff as fd

    run = Path(args.checkpoint)
    info_path = run / "config.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: not a run folder written by ferrodiff train or demo")
    info = json.loads(info_path.read_text())
    extra = info.get("extra") or {}
    if extra.get("data") is None:
        raise ValueError(f"{run} does not record its dataset: distil it from Python with fd.distill")
    if extra.get("latent"):
        raise ValueError(
            f"{run} is a latent diffusion run: distil it from Python with fd.distill on its latents"
        )
    if extra.get("command") == "train-autoencoder":
        raise ValueError(f"{run} is an autoencoder, not a diffusion model: there is nothing to distil")
    schedule = fd.Schedule.from_checkpoint(run)
    teacher = fd.nn.Model.load(run)
    conditional = teacher.num_classes > 0
    ds, labels = _load_data(extra["data"], extra.get("path"), conditional)
    out = Path(args.out)
    progress = not args.no_progress
    if args.method == "progressive":
        res = fd.distill.progressive(
            run,
            schedule,
            ds.data,
            labels,
            from_steps=args.from_steps,
            to_steps=args.to_steps,
            steps_per_round=args.steps_per_round,
            prediction=args.prediction,
            guidance=args.guidance,
            batch_size=args.batch_size,
            lr=args.lr,
            class_dropout=args.label_dropout if conditional else 0.0,
            seed=args.seed,
            out=out,
            progress=progress,
        )
        for r in res.rounds:
            print(f"  {r['steps']} steps: loss {r['loss']:.4f} -> {r['folder']}")
        print(f"student of {res.steps} steps in {out}/steps-{res.steps}")
        return 0
    trainer = None
    if (out / "checkpoint.safetensors").exists():
        trainer = fd.Trainer.resume(out, ds.data, labels)
        print(f"resuming {out} at step {trainer.step} of {args.steps}")
    if trainer is None:
        trainer = fd.Trainer(
            fd.distill._copy_model(teacher),
            schedule,
            ds.data,
            labels,
            batch_size=args.batch_size,
            lr=args.lr,
            total_steps=args.steps,
            class_dropout=args.label_dropout if conditional else 0.0,
            seed=args.seed,
            objective="consistency_distillation",
            objective_options={
                "teacher_prediction": info["train"]["prediction"],
                "num_scales": args.num_scales,
                "solver": args.solver,
                "guidance": args.guidance,
            },
            teacher=teacher,
        )
        trainer.extra = {**extra, "steps": args.steps, "distilled_from": str(run)}
    remaining = max(args.steps - trainer.step, 0)
    every = max(args.steps // 10, 1)
    trainer.train(remaining, progress=progress, checkpoint=out, checkpoint_every=every)
    _save_npy(out / "losses.npy", np.asarray(trainer.losses))
    print(f"consistency model in {out} (sample it: ferrodiff sample --checkpoint {out} --out x.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferrodiff", description="Diffusion models with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small model on handwritten digits, sample it, plot it")
    d.add_argument(
        "--out", type=Path, default=Path("ferrodiff-demo"), help="output folder (default ./ferrodiff-demo)"
    )
    d.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default {DEMO_STEPS})")
    d.add_argument("--n", type=int, default=100, help="samples to draw, at least 64 (default 100)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    o = sub.add_parser("oracle-demo", help="sample a 2-D Gaussian mixture with its exact denoiser")
    o.add_argument("--out", type=Path, default=Path("ferrodiff-oracle-demo"))
    o.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a denoiser on a dataset; checkpoints into --out")
    t.add_argument("--data", help="dataset: " + ", ".join(_dataset_names()))
    t.add_argument("--path", help="file or folder of the dataset (mnist, fashion_mnist, cifar10, folder)")
    t.add_argument("--out", help="run folder (checkpoint.safetensors, config.json, loss.png)")
    t.add_argument("--resume", help="continue the run in this folder where it stopped")
    t.add_argument("--model", choices=["auto", "mlp", "unet", "dit"], default="auto")
    t.add_argument(
        "--latent",
        metavar="AE",
        help="latent diffusion: train a U-Net on the latents of this autoencoder (a run folder of "
        "ferrodiff train-autoencoder or a .safetensors file); the run folder gets "
        f"{LATENT_AUTOENCODER_FILE}, the autoencoder with the latents' scale factor",
    )
    t.add_argument(
        "--limit", type=int, default=None, help="train on the first N samples only (for quick runs)"
    )
    t.add_argument("--conditional", action="store_true", help="condition on the dataset's labels")
    t.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="with --conditional: probability of training a row with the null label, for "
        "classifier-free guidance (default 0.1)",
    )
    t.add_argument("--steps", type=int, default=5000, help="total training steps (default 5000)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"], default="cosine")
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--hidden", type=int, default=256, help="MLP width (default 256)")
    t.add_argument("--channels", type=int, default=32, help="U-Net base channels (default 32)")
    t.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    t.add_argument("--timesteps", type=int, default=1000)
    t.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (default: steps/10)"
    )
    t.add_argument(
        "--max-steps-this-run",
        type=int,
        default=None,
        help="stop after this many steps in this invocation (checkpointed; continue with --resume)",
    )
    t.add_argument(
        "--objective",
        choices=["diffusion", "consistency-training"],
        default="diffusion",
        help="what to train: a diffusion model (default) or a consistency model from the data alone",
    )
    t.add_argument("--recipe", choices=["ict", "ct"], default="ict", help="consistency-training recipe")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")

    a = sub.add_parser(
        "train-autoencoder",
        help="train the KL or VQ autoencoder of latent diffusion on images; checkpoints into --out",
        description="Trains an autoencoder (Rombach et al. 2022) on an image dataset, checkpointing "
        "into --out (so fd.nn.Model.load(OUT) and ferrodiff train --latent OUT use it), and writes "
        "metrics.json: the PSNR of held-out reconstructions (the dataset's test split, or its last "
        "10% of images) and, for VQ, the codes used and the perplexity.",
    )
    a.add_argument("--data", help="image dataset: digits, mnist, fashion_mnist, cifar10, folder")
    a.add_argument("--path", help="file or folder of the dataset (mnist, fashion_mnist, cifar10, folder)")
    a.add_argument(
        "--out", required=True, help="run folder (checkpoint.safetensors, config.json, metrics.json)"
    )
    a.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out where it stopped (its recorded settings)",
    )
    a.add_argument(
        "--kind",
        choices=["kl", "vq"],
        default="kl",
        help="kl: AutoencoderKL (Gaussian posterior); vq: VQModel (codebook) (default kl)",
    )
    a.add_argument("--steps", type=int, default=2000, help="total training steps (default 2000)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    a.add_argument("--warmup-steps", type=int, default=100)
    a.add_argument(
        "--channels",
        default="32,64,64",
        help="widths of the levels, comma-separated; each level after the first halves the image "
        "(default 32,64,64: 28x28 -> 7x7)",
    )
    a.add_argument("--latent-channels", type=int, default=4, help="channels of the latents (default 4)")
    a.add_argument(
        "--reconstruction", choices=["l1", "l2"], default="l1", help="reconstruction loss (default l1)"
    )
    a.add_argument("--kl-weight", type=float, default=1e-6, help="kl: weight of the KL term (default 1e-6)")
    a.add_argument("--codebook-size", type=int, default=256, help="vq: codebook entries K (default 256)")
    a.add_argument("--commitment", type=float, default=0.25, help="vq: commitment weight beta (default 0.25)")
    a.add_argument(
        "--codebook-update",
        choices=["loss", "ema"],
        default="loss",
        help="vq: learn the codebook by its loss or by exponential moving averages (default loss)",
    )
    a.add_argument(
        "--dead-code-threshold",
        type=float,
        default=0.0,
        help="vq: restart codes whose moving-average use (assignments per batch) falls below this "
        "(0: never; default 0)",
    )
    a.add_argument(
        "--disc-weight",
        type=float,
        default=0.0,
        help="weight of the adversarial term of a patch discriminator with the hinge loss, scaled by "
        "LDM's adaptive weight (0: no discriminator; LDM uses 0.5; default 0)",
    )
    a.add_argument(
        "--disc-start", type=int, default=0, help="step from which the discriminator trains (default 0)"
    )
    a.add_argument(
        "--disc-layers",
        type=int,
        default=2,
        help="stride-2 stages of the discriminator (2 suits 28x28 images; LDM uses 3; default 2)",
    )
    a.add_argument(
        "--limit", type=int, default=None, help="train on the first N training images only (for quick runs)"
    )
    a.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (default: steps/10)"
    )
    a.add_argument(
        "--max-steps-this-run",
        type=int,
        default=None,
        help="stop after this many steps in this invocation (checkpointed; continue with --resume)",
    )
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-progress", action="store_true")

    di = sub.add_parser("distill", help="distil a trained run into a few-step student or a consistency model")
    di.add_argument("--checkpoint", required=True, help="the teacher's run folder")
    di.add_argument("--out", required=True, help="output folder (rerun to resume)")
    di.add_argument("--method", choices=["progressive", "consistency"], default="progressive")
    di.add_argument("--from-steps", type=int, default=64, help="teacher's DDIM steps (progressive)")
    di.add_argument("--to-steps", type=int, default=4, help="student's DDIM steps (progressive)")
    di.add_argument("--steps-per-round", type=int, default=400, help="training steps per halving")
    di.add_argument(
        "--prediction",
        choices=["v", "x0", "epsilon"],
        default="v",
        help="the student's output (default v)",
    )
    di.add_argument("--steps", type=int, default=2000, help="training steps (consistency)")
    di.add_argument("--num-scales", type=int, default=18, help="Karras grid points N (consistency)")
    di.add_argument("--solver", choices=["heun", "euler", "ddim"], default="heun", help="teacher ODE step")
    di.add_argument(
        "--guidance", type=float, default=None, help="distil the teacher's guidance at this scale"
    )
    di.add_argument("--label-dropout", type=float, default=0.1)
    di.add_argument("--batch-size", type=int, default=64)
    di.add_argument("--lr", type=float, default=3e-4)
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sample", help="sample a trained checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default 50; a distilled student's own; 1 for a consistency model)",
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--clip", type=float, default=None, help="clip predicted x0 to [-CLIP, CLIP]")
    s.add_argument("--n", type=int, default=64)
    s.add_argument(
        "--labels",
        default=None,
        help="classes to sample, e.g. 0,1,2 (repeated to fill --n; default: all classes)",
    )
    s.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale s (1: plain conditional; s = 1 + w of Ho & Salimans)",
    )
    s.add_argument(
        "--classifier",
        default=None,
        help="classifier guidance with this noisy classifier (from ferrodiff train-classifier)",
    )
    s.add_argument(
        "--classifier-scale",
        type=float,
        default=None,
        help="classifier guidance scale s: the mean moves by s Σ ∇ log f(y | x_t) (default 1)",
    )
    s.add_argument(
        "--control",
        default=None,
        help="ControlNet runs: control images FILE.npy [N, C, H, W] (default: the controls of the "
        "held-out split of the run's data)",
    )
    s.add_argument("--out", required=True, help="FILE.npy or FILE.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--no-progress", action="store_true")

    cn = sub.add_parser(
        "train-controlnet",
        help="train a ControlNet on a trained U-Net run (frozen), with controls made from its data",
    )
    cn.add_argument("--checkpoint", required=True, help="the base run folder (ferrodiff train)")
    cn.add_argument("--control", choices=["mask", "edges", "lowres"], required=True, help="the control")
    cn.add_argument("--out", required=True, help="run folder to write")
    cn.add_argument("--steps", type=int, default=1500)
    cn.add_argument("--batch-size", type=int, default=64)
    cn.add_argument("--lr", type=float, default=2e-3)
    cn.add_argument(
        "--eval", type=int, default=100, help="held-out controls to sample for metrics.json (0: none)"
    )
    cn.add_argument("--seed", type=int, default=0)
    cn.add_argument("--no-progress", action="store_true")

    c = sub.add_parser(
        "train-classifier", help="train a noisy classifier f(y | x_t, t) for classifier guidance"
    )
    c.add_argument("--data", required=True, help="dataset with labels: " + ", ".join(_dataset_names()))
    c.add_argument("--path", help="file or folder of the dataset (mnist, fashion_mnist, cifar10, folder)")
    c.add_argument("--out", required=True, help="folder for classifier.safetensors, metrics.json, loss.png")
    c.add_argument(
        "--schedule-from",
        default=None,
        help="copy the noise schedule of this run (the model the classifier will guide)",
    )
    c.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    c.add_argument("--timesteps", type=int, default=1000)
    c.add_argument("--hidden", default="256,256", help="hidden widths (default 256,256)")
    c.add_argument("--time-embed-dim", type=int, default=64)
    c.add_argument("--steps", type=int, default=3000)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.n < 64:
                parser.error("--n must be at least 64")
            if args.steps < 1:
                parser.error("--steps must be at least 1")
            m = demo(args.out, args.steps, args.n, args.seed, not args.no_progress)
            print(f"wrote {args.out}/: samples.png, samples.npy, loss.png, metrics.json, run/")
            print(
                f"  trained {m['train_steps']} steps in {m['train_seconds']:.0f} s; "
                f"sampled {m['samples']} digits in {m['sample_seconds']:.1f} s"
            )
        elif args.command == "oracle-demo":
            if args.n < 2:
                parser.error("--n must be at least 2")
            r = oracle_demo(args.out, args.n, args.seed, not args.no_progress)
            for k in ("ddpm_1000", "ddim_50"):
                print(
                    f"  {k}: energy distance to the truth {r[k]['energy_distance']:.4f} ({r[k]['seconds']:.2f} s)"
                )
            print(f"  noise floor (two true samples): {r['noise_floor_energy_distance']:.4f}")
        elif args.command == "train":
            if not args.resume and (not args.data or not args.out):
                parser.error("train needs --data and --out (or --resume RUN)")
            if args.limit is not None and args.limit < 1:
                parser.error("--limit must be at least 1")
            return train_command(args)
        elif args.command == "train-autoencoder":
            if not args.resume and not args.data:
                parser.error("train-autoencoder needs --data (or --resume)")
            if args.steps < 1 or args.batch_size < 1:
                parser.error("--steps and --batch-size must be at least 1")
            if args.limit is not None and args.limit < 1:
                parser.error("--limit must be at least 1")
            return train_autoencoder_command(args)
        elif args.command == "train-classifier":
            if args.steps < 1:
                parser.error("--steps must be at least 1")
            if args.time_embed_dim < 2 or args.time_embed_dim % 2:
                parser.error("--time-embed-dim must be even and at least 2")
            return train_classifier_command(args)
        elif args.command == "distill":
            if args.steps < 1 or args.steps_per_round < 1:
                parser.error("--steps and --steps-per-round must be at least 1")
            return distill_command(args)
        elif args.command == "train-controlnet":
            if args.steps < 1 or args.batch_size < 1:
                parser.error("--steps and --batch-size must be at least 1")
            return train_controlnet_command(args)
        elif args.command == "sample":
            if Path(args.out).suffix not in (".npy", ".png"):
                parser.error("--out must end in .npy or .png")
            return sample_command(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"ferrodiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _dataset_names() -> tuple[str, ...]:
    from ferrodiff.datasets import NAMES

    return NAMES


if __name__ == "__main__":
    sys.exit(main())
