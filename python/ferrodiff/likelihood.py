"""The variational bound in bits per dimension, with OpenAI's conventions (Ho et al. 2020,
Nichol & Dhariwal 2021): Gaussian KL terms for t > 0, a discretized Gaussian decoder at t = 0,
and the prior term KL(q(x_T | x0) || N(0, I)).

:func:`bits_per_dim` runs the whole bound for any denoiser (the seed's Figure 6 metric);
:func:`ode_bits_per_dim` the exact likelihood of the probability-flow ODE (Song et al. 2021,
the survey's "DDPM (cont flow)" row).
"""

from __future__ import annotations

import numpy as np

from ferrodiff._core import BitsPerDim, bits_per_dim, ode_bits_per_dim, prior_bpd, vb_terms_bpd
from ferrodiff._core import _approx_standard_normal_cdf as _cdf
from ferrodiff._core import _discretized_gaussian_log_likelihood as _dgll
from ferrodiff._core import _normal_kl

__all__ = [
    "BitsPerDim",
    "approx_standard_normal_cdf",
    "bits_per_dim",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "ode_bits_per_dim",
    "prior_bpd",
    "vb_terms_bpd",
]


def _broadcast(*arrays):
    out = np.broadcast_arrays(*[np.asarray(a, dtype=np.float64) for a in arrays])
    return out[0].shape, [np.ascontiguousarray(a).ravel() for a in out]


def normal_kl(mean1, logvar1, mean2, logvar2) -> np.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (float64)."""
    shape, flat = _broadcast(mean1, logvar1, mean2, logvar2)
    return _normal_kl(*flat).reshape(shape)


def approx_standard_normal_cdf(x) -> np.ndarray:
    """0.5 (1 + tanh(sqrt(2/π) (x + 0.044715 x³))), elementwise (float64)."""
    shape, (flat,) = _broadcast(x)
    return _cdf(flat).reshape(shape)


def discretized_gaussian_log_likelihood(x, means, log_scales, bins: int = 256) -> np.ndarray:
    """log P(x) of data on a grid of `bins` levels in [-1, 1] (256 for 8-bit images) under a
    Gaussian with `means` and `log_scales` (half the log variance), integrated over each bin;
    the edge bins extend to ±∞. Elementwise, in nats (float64)."""
    shape, flat = _broadcast(x, means, log_scales)
    return _dgll(*flat, bins).reshape(shape)
