"""ferrodiff: diffusion models with a Rust core.

Noise schedules, the forward process, fused DDPM/DDIM samplers and analytic oracles, on numpy
arrays (float32, batch first) and, through :mod:`ferrodiff.torch`, on PyTorch tensors.

    >>> import ferrodiff as fd
    >>> s = fd.Schedule.linear(1000)
    >>> sampler = fd.DDIM(s, steps=50)
    >>> x = sampler.sample(denoiser, shape=(16, 1, 8, 8), seed=0)   # doctest: +SKIP
"""

import os as _os

# One thread pool (DESIGN.md, "Threads"): candle 0.11 runs its large elementwise ops on a
# spinning pool of its own, next to rayon's pool that runs its matrix multiplies and our
# kernels; with both sized to the cores, two threads per core compete and 2 threads train
# slower than 1. Candle's pool is sized by CANDLE_NUM_THREADS when its first op runs: 1 leaves
# it empty, so every parallel pass runs on rayon's pool. A value the user set is kept.
_os.environ.setdefault("CANDLE_NUM_THREADS", "1")

from ferrodiff import (
    controls,
    datasets,
    distill,
    interop,
    langevin,
    latent,
    likelihood,
    losses,
    metrics,
    nn,
    notebook,
    oracles,
    sample,
)
from ferrodiff._core import (
    ConsistencySampler,
    DDIM,
    DDPM,
    DPMAdaptive,
    DPMSolver,
    DiscreteSampler,
    DynamicThreshold,
    Euler,
    EulerAncestral,
    Heun,
    SigmaSampler,
    SolverState,
    Schedule,
    StepOutput,
    Trainer,
    __version__,
    cosine_log_snr,
    karras_sigmas,
    randn,
    space_timesteps,
    timesteps,
)
from ferrodiff.latent import Cascade, CascadeStage, LatentDiffusion

__all__ = [
    "Cascade",
    "CascadeStage",
    "ConsistencySampler",
    "LatentDiffusion",
    "DDIM",
    "DDPM",
    "DPMAdaptive",
    "DPMSolver",
    "DiscreteSampler",
    "DynamicThreshold",
    "Euler",
    "EulerAncestral",
    "Heun",
    "SigmaSampler",
    "SolverState",
    "Schedule",
    "StepOutput",
    "Trainer",
    "__version__",
    "cosine_log_snr",
    "controls",
    "datasets",
    "distill",
    "interop",
    "karras_sigmas",
    "langevin",
    "latent",
    "likelihood",
    "losses",
    "metrics",
    "nn",
    "notebook",
    "oracles",
    "randn",
    "sample",
    "space_timesteps",
    "timesteps",
]
