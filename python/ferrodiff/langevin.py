"""Score-based sampling and training: Langevin dynamics and denoising score matching.

:func:`sgld` runs stochastic gradient Langevin dynamics (Welling & Teh 2011) with a score
``score_fn(x) = ∇log p(x)``; :func:`annealed` runs annealed Langevin dynamics over a descending
noise ladder (Song & Ermon 2019, NCSN Algorithm 1) with a noise-conditional score
``score_fn(x, sigma)``; :func:`geometric_sigmas` builds that ladder (NCSN: 10 levels from 1 to
0.01); :func:`dsm_loss` is NCSN's denoising score-matching loss with its gradient.

    >>> sigmas = fd.langevin.geometric_sigmas(1.0, 0.01, 10)
    >>> x = fd.langevin.annealed(score_fn, sigmas, shape=(1000, 2), seed=0)    # doctest: +SKIP
    >>> x_noisy = x0 + sigma[:, None] * z                                      # doctest: +SKIP
    >>> loss, grad = fd.langevin.dsm_loss(model(x_noisy, sigma), x_noisy, x0, sigma)  # doctest: +SKIP

The noise of every iteration is a pure function of (seed, iteration, element index), so results
are identical for any number of threads. A model trained for ε-prediction gives the score
``-eps / sqrt(1 - alphas_cumprod[t])`` (VP) or ``-eps / sigma`` (VE).
"""

from ferrodiff._core import annealed, dsm_loss, geometric_sigmas, sgld

__all__ = ["annealed", "dsm_loss", "geometric_sigmas", "sgld"]
