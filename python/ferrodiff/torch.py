"""PyTorch adapter: ferrodiff samplers on torch tensors, with a ``torch.nn.Module`` (or any
callable on tensors) as the denoiser.

torch is imported only when one of these functions runs. CPU float32 contiguous tensors cross
into Rust without a copy (``tensor.numpy()`` / ``torch.from_numpy``); any other dtype or device
is copied to CPU float32 and the result copied back to the input's dtype and device. That copy
is the documented cost until the GPU path exists.

    >>> import ferrodiff as fd, ferrodiff.torch as fdt
    >>> sampler = fd.DDIM(fd.Schedule.linear(1000), steps=50)
    >>> x = fdt.sample(sampler, unet, (4, 3, 32, 32), device="cuda")   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ferrodiff._core import StepOutput

__all__ = ["as_numpy_denoiser", "from_numpy", "sample", "step", "to_numpy"]


def to_numpy(tensor: Any) -> np.ndarray:
    """A float32 numpy view of a CPU float32 contiguous tensor (no copy), else a CPU float32 copy."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    t = tensor.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(device="cpu", dtype=torch.float32).contiguous()
    return t.numpy()


def from_numpy(array: np.ndarray, like: Any = None, *, dtype: Any = None, device: Any = None) -> Any:
    """A tensor sharing memory with a float32 numpy array, moved to `like`'s (or the given)
    dtype and device when they differ."""
    import torch

    t = torch.from_numpy(array)
    if like is not None:
        dtype = like.dtype if dtype is None else dtype
        device = like.device if device is None else device
    if dtype is not None or device is not None:
        t = t.to(
            device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype
        )
    return t


def _timesteps(t: Any) -> Any:
    import torch

    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            raise TypeError(f"t must be integer timesteps, got a tensor of dtype {t.dtype}")
        t = t.detach().cpu()
        return int(t) if t.ndim == 0 else t.to(torch.int64).numpy()
    return t


def step(
    sampler: Any,
    model_output: Any,
    t: Any,
    x: Any,
    *,
    noise: Any = None,
    seed: int | None = None,
    check_finite: bool = True,
) -> StepOutput:
    """``sampler.step`` on tensors: returns a StepOutput whose ``prev_sample`` and ``pred_x0``
    are tensors with x's dtype and device."""
    res = sampler.step(
        to_numpy(model_output),
        _timesteps(t),
        to_numpy(x),
        noise=None if noise is None else to_numpy(noise),
        seed=seed,
        check_finite=check_finite,
    )
    return StepOutput(from_numpy(res.prev_sample, x), from_numpy(res.pred_x0, x))


def as_numpy_denoiser(
    model: Callable[..., Any], *, dtype: Any = None, device: Any = None
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Wraps a torch denoiser ``model(x, t)`` (an ``nn.Module`` or any callable on tensors)
    as ``f(x: ndarray, t: ndarray) -> ndarray`` for ferrodiff's samplers. The model runs under
    ``torch.no_grad()`` on `device` in `dtype` (defaults: the module's first parameter's, else
    CPU float32). Outputs with a ``.sample`` field (diffusers' UNet outputs) or tuples are
    unwrapped."""
    import torch

    if dtype is None or device is None:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        if params:
            dtype = params[0].dtype if dtype is None else dtype
            device = params[0].device if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)

    def call(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        xt = from_numpy(x, dtype=dtype, device=device)
        tt = torch.from_numpy(t).to(device)
        with torch.no_grad():
            out = model(xt, tt)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the torch denoiser must return a tensor, got {type(out).__name__}")
        return to_numpy(out)

    return call


def sample(
    sampler: Any,
    denoiser: Callable[..., Any],
    shape: Sequence[int] | None = None,
    *,
    x_T: Any = None,
    seed: int | None = 0,
    progress: bool = False,
    callback: Callable[..., Any] | None = None,
    dtype: Any = None,
    device: Any = None,
    check_finite: bool = True,
) -> Any:
    """``sampler.sample`` with a torch denoiser; returns a tensor on `device` in `dtype`
    (defaults: x_T's, else the module's parameters', else CPU float32)."""
    import torch

    if x_T is not None:
        dtype = x_T.dtype if dtype is None else dtype
        device = x_T.device if device is None else device
    f = as_numpy_denoiser(denoiser, dtype=dtype, device=device)
    x = sampler.sample(
        f,
        None if shape is None else tuple(shape),
        x_T=None if x_T is None else to_numpy(x_T),
        seed=seed,
        progress=progress,
        callback=callback,
        check_finite=check_finite,
    )
    if dtype is None or device is None:
        params = list(denoiser.parameters()) if isinstance(denoiser, torch.nn.Module) else []
        if params:
            dtype = params[0].dtype if dtype is None else dtype
            device = params[0].device if device is None else device
    return from_numpy(x, dtype=dtype, device=device)


def _diffusion_loss_function():
    import torch

    class _SimpleLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, model_output, target, weights):
            from ferrodiff._core import simple_loss

            w = None if weights is None else weights.detach().cpu().double().numpy()
            losses, grad = simple_loss(to_numpy(model_output), to_numpy(target), w)
            ctx.save_for_backward(from_numpy(grad, model_output))
            return torch.from_numpy(losses).to(device=model_output.device, dtype=model_output.dtype)

        @staticmethod
        def backward(ctx, grad_losses):
            (grad,) = ctx.saved_tensors
            shape = (-1,) + (1,) * (grad.ndim - 1)
            return grad * grad_losses.reshape(shape).to(grad.dtype), None, None

    return _SimpleLoss


class DiffusionLoss:
    """The simple diffusion loss as a differentiable torch function, computed by ferrodiff:
    ``loss = DiffusionLoss()(model_output, target, weights=None)`` returns the per-sample
    weighted mean squared error [B]; ``reduction="mean"`` (default) averages it. The gradient
    with respect to `model_output` comes from ferrodiff's fused kernel; `target` and `weights`
    receive none. torch is imported when the first instance is made."""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self._fn = _diffusion_loss_function()

    def __call__(self, model_output: Any, target: Any, weights: Any = None) -> Any:
        losses = self._fn.apply(model_output, target, weights)
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses
