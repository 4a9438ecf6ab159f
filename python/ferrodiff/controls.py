"""Control images made from images, for ControlNet (Zhang et al. 2023) on small data sets.

Each function maps images [N, C, H, W] in [-1, 1] to control images [N, 1, H, W] in {-1, 1}
(``lowres``: [N, C, H, W] in [-1, 1]), computed per image so that a control never depends on the
batch it comes in:

- :func:`mask`: the coarse shape, the pixels brighter than the image's mean (channels averaged);
- :func:`edges`: the pixels whose central-difference gradient magnitude is above the image's
  median;
- :func:`lowres`: the image block-averaged by ``factor`` and upsampled back (nearest), as a
  super-resolution control.

``make(kind, images)`` picks one by name (``KINDS``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "agreement", "edges", "lowres", "make", "mask"]

KINDS = ("mask", "edges", "lowres")


def _images(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"control images are made from images [N, C, H, W], got shape {x.shape}")
    return x


def _sign(condition: np.ndarray) -> np.ndarray:
    return np.where(condition, 1.0, -1.0).astype(np.float32)


def mask(x) -> np.ndarray:
    """1 where a pixel (mean over channels) is above its image's mean, -1 elsewhere."""
    g = _images(x).mean(1, keepdims=True)
    return _sign(g > g.mean((1, 2, 3), keepdims=True))


def edges(x) -> np.ndarray:
    """1 where the central-difference gradient magnitude (of the channel mean) is above its
    image's median, -1 elsewhere (one-pixel borders have gradient 0)."""
    g = _images(x).mean(1, keepdims=True)
    gy = np.zeros_like(g)
    gx = np.zeros_like(g)
    gy[..., 1:-1, :] = g[..., 2:, :] - g[..., :-2, :]
    gx[..., :, 1:-1] = g[..., :, 2:] - g[..., :, :-2]
    m = np.sqrt(gx**2 + gy**2)
    return _sign(m > np.median(m.reshape(len(m), -1), 1).reshape(-1, 1, 1, 1))


def lowres(x, factor: int = 2) -> np.ndarray:
    """The image averaged over ``factor`` x ``factor`` blocks and repeated back to its size."""
    x = _images(x)
    n, c, h, w = x.shape
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"lowres: factor {factor} must divide the image side ({h}x{w})")
    blocks = x.reshape(n, c, h // factor, factor, w // factor, factor).mean((3, 5))
    return np.repeat(np.repeat(blocks, factor, 2), factor, 3).astype(np.float32)


def make(kind: str, x) -> np.ndarray:
    """The control images of ``kind`` ("mask", "edges" or "lowres") for images ``x``."""
    if kind == "mask":
        return mask(x)
    if kind == "edges":
        return edges(x)
    if kind == "lowres":
        return lowres(x)
    raise ValueError(f"unknown control {kind!r}: choose one of {', '.join(KINDS)}")


def agreement(samples, controls, kind: str) -> float:
    """Mean IoU between binary ``controls`` ({-1, 1}) and the same control of ``kind`` extracted
    from ``samples`` (clipped to [-1, 1])."""
    if kind == "lowres":
        raise ValueError("agreement is an IoU of binary controls (mask, edges), not of lowres")
    n = len(samples)
    a = make(kind, np.clip(samples, -1, 1)).reshape(n, -1) > 0
    b = np.asarray(controls).reshape(n, -1) > 0
    return float(np.mean((a & b).sum(1) / np.maximum((a | b).sum(1), 1)))
