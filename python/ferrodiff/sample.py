"""Samplers: the discrete ones (DDPM, DDIM) and the σ-space ones (Euler, EulerAncestral, Heun,
DPMSolver), which share the base class :class:`SigmaSampler`.

``from ferrodiff.sample import DDIM`` and ``ferrodiff.DDIM`` are the same class.
"""

from ferrodiff._core import (
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
    StepOutput,
    randn,
)

__all__ = [
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
    "StepOutput",
    "randn",
]
