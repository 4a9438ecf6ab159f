"""Latent diffusion (Rombach et al. 2022) and cascaded generation (Ho et al. 2021).

:class:`LatentDiffusion` runs diffusion in the latent space of a trained autoencoder
(:func:`ferrodiff.nn.AutoencoderKL` or :func:`ferrodiff.nn.VQModel`)::

    >>> import ferrodiff as fd
    >>> ae = fd.nn.AutoencoderKL()                                          # doctest: +SKIP
    >>> fd.Trainer(ae, None, images, objective="autoencoder").train(2000)   # doctest: +SKIP
    >>> ld = fd.LatentDiffusion(ae, fd.nn.UNet(in_channels=4, image_size=7, channel_mult=(1,)),
    ...                         fd.Schedule.cosine(1000))                   # doctest: +SKIP
    >>> ld.train(images, labels, steps=3000)                                # doctest: +SKIP
    >>> digits = ld.sample(fd.DDIM(ld.schedule, steps=50), 64, labels=...)  # doctest: +SKIP

The training images are encoded once (posterior means) and the latents cached; the scale
factor is 1 / std of those latents, as LDM computes it, and is stored in the autoencoder's
configuration (``autoencoder.scaling_factor``) so saved pipelines decode the same way.
Every sampler works (labels, classifier-free guidance, cross-attention contexts, SDEdit with
``image=`` and inpainting with ``mask=``, both given in pixel space).

:class:`Cascade` samples a base model and then one super-resolution stage after another; each
stage is a U-Net built with ``cond_channels`` (and ``aug_embed``), trained with
``objective="super_resolution"``, and conditioned on the previous stage's samples corrupted at
its noise-augmentation level.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferrodiff._core import DDIM, DDPM, Model, Schedule, Trainer

__all__ = ["Cascade", "CascadeStage", "LatentDiffusion"]

_PIPELINE_FILE = "latent_diffusion.json"


def _is_autoencoder(model: Any) -> bool:
    return isinstance(model, Model) and model.config.get("type") == "autoencoder"


def _resize_mask(mask: np.ndarray, side: tuple[int, int]) -> np.ndarray:
    """A pixel-space mask [N or 1, 1 or C, H, W] at latent resolution: the mean of each block
    (so a latent is kept only as far as its block is)."""
    from ferrodiff.datasets import resize

    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4:
        raise ValueError(f"mask must be [H, W], [N, H, W] or [N, C, H, W], got shape {m.shape}")
    m = m.mean(axis=1, keepdims=True)
    return resize(m, side, method="area")


class LatentDiffusion:
    """Diffusion in the latent space of an autoencoder.

    Args:
        autoencoder: a trained :func:`~ferrodiff.nn.AutoencoderKL` or :func:`~ferrodiff.nn.VQModel`.
        denoiser: a denoiser (e.g. a U-Net) whose samples have the autoencoder's latent shape
            ``autoencoder.latent_shape()``; trained by :meth:`train` or given trained.
        schedule: the diffusion schedule of ``denoiser``.
        scaling_factor: multiply latents by this before diffusion; ``None`` (default) keeps the
            autoencoder's own when it is not 1 and otherwise computes 1 / std of the latents of
            the images :meth:`train` (or :meth:`fit_scaling_factor`) first sees.

    Raises:
        TypeError: ``autoencoder`` is not an autoencoder model, or ``denoiser`` is.
        ValueError: the denoiser's sample shape is not the autoencoder's latent shape.
    """

    def __init__(self, autoencoder: Model, denoiser: Model, schedule: Schedule, *, scaling_factor=None):
        if not _is_autoencoder(autoencoder):
            raise TypeError(
                "autoencoder must be an fd.nn.AutoencoderKL or fd.nn.VQModel model, "
                f"got {type(autoencoder).__name__}"
                + (f" {autoencoder!r}" if isinstance(autoencoder, Model) else "")
            )
        if _is_autoencoder(denoiser):
            raise TypeError("denoiser is an autoencoder: pass the latent denoiser (e.g. fd.nn.UNet)")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be an fd.Schedule, got {type(schedule).__name__}")
        latent = list(autoencoder.latent_shape())
        if isinstance(denoiser, Model) and list(denoiser.data_shape) != latent:
            raise ValueError(
                f"the denoiser takes samples of shape {list(denoiser.data_shape)} but the autoencoder's "
                f"latents have shape {latent}: build it with in_channels={latent[0]}, image_size={latent[1]} "
                "(a denoiser trained for another autoencoder does not fit)"
            )
        if scaling_factor is not None:
            autoencoder = autoencoder.with_scaling_factor(float(scaling_factor))
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.schedule = schedule
        self._scale_fixed = scaling_factor is not None or autoencoder.scaling_factor != 1.0

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.scaling_factor)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape())

    def __repr__(self) -> str:
        return (
            f"ferrodiff.LatentDiffusion({self.autoencoder!r}, {self.denoiser!r}, "
            f"latent_shape={list(self.latent_shape)}, scaling_factor={self.scaling_factor:.5g})"
        )

    # -- latents ------------------------------------------------------------------------------
    def _set_scale_from(self, z: np.ndarray) -> float:
        std = float(np.std(z))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"the latents of these images have standard deviation {std}: cannot scale them")
        self.autoencoder = self.autoencoder.with_scaling_factor(1.0 / std)
        self._scale_fixed = True
        return self.scaling_factor

    def fit_scaling_factor(self, images) -> float:
        """Sets the scale factor to 1 / std of the latents of ``images`` (LDM's rule) and returns it."""
        return self._set_scale_from(self.autoencoder.encode(images))

    def encode(self, images, *, sample: bool = False, seed: int = 0) -> np.ndarray:
        """Scaled latents of ``images`` [N, C, H, W] in [-1, 1] (posterior means; ``sample=True``
        draws from a KL posterior)."""
        return self.autoencoder.encode(images, sample=sample, seed=seed) * np.float32(self.scaling_factor)

    def decode(self, latents) -> np.ndarray:
        """Images from scaled latents [N, *latent_shape] (a VQ autoencoder quantises them)."""
        z = np.asarray(latents, dtype=np.float32)
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(z.shape)} but this pipeline decodes [N, {', '.join(map(str, self.latent_shape))}]"
            )
        return self.autoencoder.decode(z / np.float32(self.scaling_factor))

    # -- training -----------------------------------------------------------------------------
    def trainer(self, images, labels=None, **trainer_kwargs) -> Trainer:
        """An :class:`ferrodiff.Trainer` of the denoiser on the cached, scaled latents of ``images``
        (any Trainer keyword: ``batch_size``, ``lr``, ``class_dropout``, ``context``, ...)."""
        if not isinstance(self.denoiser, Model):
            raise TypeError("trainer() trains a ferrodiff denoiser; this pipeline holds an external one")
        # The training images are encoded once: the same latents set the scale and are trained on.
        z = self.autoencoder.encode(images)
        if not self._scale_fixed:
            self._set_scale_from(z)
        z *= np.float32(self.scaling_factor)
        return Trainer(self.denoiser, self.schedule, z, labels, **trainer_kwargs)

    def train(
        self, images, labels=None, *, steps: int, progress: bool = True, callback=None, **trainer_kwargs
    ):
        """Trains the denoiser on the latents of ``images`` for ``steps`` steps, then holds its EMA
        weights as :attr:`denoiser`; returns the trainer (losses, checkpoints, resume)."""
        t = self.trainer(images, labels, **trainer_kwargs)
        t.train(steps, progress=progress, callback=callback)
        self.denoiser = t.ema_model()
        return t

    # -- sampling -----------------------------------------------------------------------------
    def sample(
        self,
        sampler,
        n: int,
        *,
        image=None,
        mask=None,
        return_latents: bool = False,
        **sample_kwargs,
    ):
        """Samples ``n`` latents with ``sampler`` (any ferrodiff sampler; keywords such as
        ``labels``, ``guidance_scale``, ``context``, ``seed``, ``strength`` pass through) and
        decodes them. ``image`` (SDEdit / inpainting source) and ``mask`` (1 = keep) are in pixel
        space and are taken to latent space here. Returns images, or ``(images, latents)``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        kw = dict(sample_kwargs)
        if mask is not None:
            kw["mask"] = _resize_mask(mask, self.latent_shape[1:])
        if image is not None:
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 4 or len(image) != int(n):
                raise ValueError(
                    f"image must be [n = {int(n)}, C, H, W] (one source image per sample), got shape {image.shape}"
                )
            z = sampler.sample(self.denoiser, image=self.encode(image), **kw)
        else:
            z = sampler.sample(self.denoiser, (int(n), *self.latent_shape), **kw)
        x = self.decode(z)
        return (x, z) if return_latents else x

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Writes ``autoencoder.safetensors``, ``denoiser.safetensors`` and ``latent_diffusion.json``
        (the schedule) into ``folder``; each file is written whole or not at all."""
        if not isinstance(self.denoiser, Model):
            raise TypeError("save() needs a ferrodiff denoiser")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.autoencoder.save(out / "autoencoder.safetensors")
        self.denoiser.save(out / "denoiser.safetensors")
        meta = {"schedule": self.schedule.to_dict(), "scaling_factor": self.scaling_factor}
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, out / _PIPELINE_FILE)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LatentDiffusion:
        """Reads a folder written by :meth:`save`."""
        folder = Path(folder)
        path = folder / _PIPELINE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {_PIPELINE_FILE} (not a saved LatentDiffusion)")
        meta = json.loads(path.read_text())
        ae = Model.load(folder / "autoencoder.safetensors")
        den = Model.load(folder / "denoiser.safetensors")
        return cls(ae, den, Schedule.from_dict(meta["schedule"]), scaling_factor=meta["scaling_factor"])


@dataclass
class CascadeStage:
    """One stage of a :class:`Cascade`.

    Args:
        model: the stage's denoiser (the base: any model, or a :class:`LatentDiffusion`; later
            stages: super-resolution U-Nets built with ``cond_channels``).
        sampler: the stage's sampler (e.g. ``fd.DDIM(schedule, steps=50)``).
        aug_level: super-resolution stages: the noise-augmentation level s in [0, 1] the
            conditioning image is corrupted at (0: none).
        truncate: super-resolution stages: condition on the previous stage's sample stopped at
            level ``aug_level`` of its own (DDPM / DDIM) sampler instead of on its finished sample
            corrupted afresh (Ho et al. 2021's truncated conditioning augmentation).
        guidance_scale: classifier-free guidance of this stage (None: none).
        upsample: how the conditioning image is brought to the stage's resolution.
    """

    model: Any
    sampler: Any
    aug_level: float = 0.0
    truncate: bool = False
    guidance_scale: float | None = None
    upsample: str = "bilinear"


class Cascade:
    """Cascaded generation: a base stage, then super-resolution stages (Ho et al. 2021; Imagen).

    ``fd.Cascade([base, sr1, ...])`` with :class:`CascadeStage` entries (a bare ``(model,
    sampler)`` pair also works). :meth:`sample` draws from the base, then super-resolves stage by
    stage, each stage conditioned on the previous one's output with noise conditioning
    augmentation at the stage's ``aug_level``.
    """

    def __init__(self, stages: Sequence[CascadeStage | tuple]):
        stages = [s if isinstance(s, CascadeStage) else CascadeStage(*s) for s in stages]
        if len(stages) < 2:
            raise ValueError("a cascade needs a base stage and at least one super-resolution stage")
        for i, s in enumerate(stages[1:], start=1):
            if not isinstance(s.model, Model) or not s.model.config.get("cond_channels"):
                raise ValueError(
                    f"stage {i} must be a super-resolution U-Net (fd.nn.UNet(..., cond_channels=C, aug_embed=True))"
                )
            if not 0.0 <= float(s.aug_level) <= 1.0:
                raise ValueError(f"stage {i}: aug_level must lie in [0, 1], got {s.aug_level}")
            if s.aug_level and not s.model.config.get("aug_embed"):
                raise ValueError(
                    f"stage {i}: aug_level {s.aug_level} needs a model built with aug_embed=True"
                )
            if s.truncate and not isinstance(stages[i - 1].sampler, (DDPM, DDIM)):
                raise ValueError(f"stage {i}: truncate=True needs a DDPM or DDIM sampler in stage {i - 1}")
        self.stages = stages

    def __repr__(self) -> str:
        return f"ferrodiff.Cascade({len(self.stages)} stages)"

    @staticmethod
    def _shape(stage: CascadeStage) -> tuple[int, ...]:
        if isinstance(stage.model, LatentDiffusion):
            return tuple(stage.model.autoencoder.data_shape)
        return tuple(stage.model.data_shape)

    def _run(self, stage: CascadeStage, model, n: int, labels, seed: int, stop_level: float | None, progress):
        kw: dict[str, Any] = {"seed": seed, "progress": progress}
        if labels is not None:
            kw["labels"] = labels
        if stage.guidance_scale is not None:
            kw["guidance_scale"] = stage.guidance_scale
        if isinstance(model, LatentDiffusion):
            if stop_level is not None:
                raise ValueError(
                    "truncated conditioning on a latent base stage is not supported: use truncate=False"
                )
            return model.sample(stage.sampler, n, **kw), 0.0
        shape = (n, *self._shape(stage))
        if stop_level is None:
            return stage.sampler.sample(model, shape, **kw), 0.0
        # Truncation: stop the reverse process once it reaches the timestep whose cosine-VP
        # augmentation level matches, i.e. ᾱ_t of the stage's schedule equal to cos²(π s / 2).
        return _sample_until(stage.sampler, model, shape, stop_level, kw)

    def sample(self, n: int, *, labels=None, seed: int = 0, return_all: bool = False, progress: bool = False):
        """``n`` samples of the last stage's resolution (``return_all=True``: every stage's).

        ``labels`` go to every class-conditional stage. Stage i draws with seed ``seed + i``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        outs = []
        x = None
        level = 0.0
        for i, stage in enumerate(self.stages):
            model = stage.model
            if i > 0:
                if not stage.truncate:
                    level = float(stage.aug_level)
                model = model.with_low_res(
                    x, level, seed=seed + 1000 + i, add_noise=not stage.truncate, upsample=stage.upsample
                )
            cond = labels if _conditional(stage.model) else None
            following = self.stages[i + 1] if i + 1 < len(self.stages) else None
            stop = float(following.aug_level) if following is not None and following.truncate else None
            x, level = self._run(stage, model, int(n), cond, seed + i, stop, progress)
            outs.append(x)
        return outs if return_all else outs[-1]


def _conditional(model) -> bool:
    if isinstance(model, LatentDiffusion):
        model = model.denoiser
    return isinstance(model, Model) and model.num_classes > 0


class _Stop(Exception):
    pass


def _sample_until(sampler, model, shape, level: float, kw: dict):
    """Runs a DDPM / DDIM sampler until x is at the first of its timesteps whose ᾱ reaches the
    cosine augmentation's ᾱ(level) = cos²(π level / 2), and returns (that x, the augmentation
    level of its actual ᾱ), or the finished sample and 0 when no such timestep comes first."""
    if level <= 0.0:
        return sampler.sample(model, shape, **kw), 0.0
    schedule = sampler.schedule
    ab = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    target = float(np.cos(np.pi * level / 2.0) ** 2)
    t_stop = int(np.argmin(np.abs(ab - target)))
    timesteps = [int(t) for t in sampler.timesteps]
    captured: list[tuple[np.ndarray, float]] = []

    def callback(i, t, x, pred_x0):
        nxt = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if 0 <= nxt <= t_stop:
            actual = float(2.0 / np.pi * np.arccos(np.sqrt(min(1.0, max(0.0, ab[nxt])))))
            captured.append((np.array(x, copy=True), min(1.0, actual)))
            raise _Stop

    try:
        out = sampler.sample(model, shape, callback=callback, **kw)
    except _Stop:
        return captured[0]
    return out, 0.0
