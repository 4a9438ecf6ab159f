"""Samplers: the discrete ones (DDPM, DDIM) and the σ-space ones (Euler, EulerAncestral, Heun,
DPMSolver), which share the base class :class:`SigmaSampler`, and :class:`ConsistencySampler`
for consistency models.

``from ferrodiff.sample import DDIM`` and ``ferrodiff.DDIM`` are the same class.
"""

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
    StepOutput,
    randn,
)

__all__ = [
    "ConsistencySampler",
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
