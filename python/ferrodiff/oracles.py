"""Analytic oracles: data whose optimal denoiser is known in closed form.

:class:`GaussianMixture` gives the exact ε-prediction E[ε | x_t] of a mixture of isotropic
Gaussians under any schedule, its class posterior p(k | x_t) and exact samples, so a sampler's
output can be compared with the true distribution (:func:`energy_distance`).
"""

from ferrodiff._core import GaussianMixture, MixtureCallable, energy_distance

__all__ = ["GaussianMixture", "MixtureCallable", "eight_gaussians", "energy_distance"]


def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """The classic 2-D toy: eight equal Gaussians on a circle of `radius`."""
    import math

    means = [
        [radius * math.cos(2 * math.pi * k / 8), radius * math.sin(2 * math.pi * k / 8)] for k in range(8)
    ]
    return GaussianMixture([1.0] * 8, means, [std] * 8)
