"""Training objectives: regression targets, loss weightings and the simple loss with its gradient.

    >>> t = rng.integers(0, 1000, size=B)                                # doctest: +SKIP
    >>> x_t = schedule.q_sample(x0, t, noise)                            # doctest: +SKIP
    >>> target = fd.losses.training_target(schedule, x0, noise, t, "v")  # doctest: +SKIP
    >>> w = fd.losses.loss_weight(schedule, t, "min_snr", "v")           # doctest: +SKIP
    >>> loss, grad = fd.losses.simple_loss(model(x_t, t), target, w)     # doctest: +SKIP

Weightings (SNR = ᾱ/(1-ᾱ)); each is the factor on the MSE of the model's own target so that the
loss is the named weighting of the x0 error:

=================  ==================  ====================  =====================
kind               ε target            x0 target             v target
=================  ==================  ====================  =====================
``uniform``        1                   1                     1
``snr``            1                   SNR                   SNR/(SNR+1)
``min_snr`` (γ)    min(SNR,γ)/SNR      min(SNR,γ)            min(SNR,γ)/(SNR+1)
``truncated_snr``  max(SNR,1)/SNR      max(SNR,1)            max(SNR,1)/(SNR+1)
``vlb``            (1-α)²/(2α(1-ᾱ)σ²)  that · SNR            that · SNR/(SNR+1)
=================  ==================  ====================  =====================

(σ² is the clipped posterior variance, so the ``vlb`` weight is finite at t = 0; every weight
stays finite where ᾱ = 0.)
"""

from ferrodiff._core import TimestepSampler, hybrid_loss, loss_weight, simple_loss, training_target

__all__ = ["TimestepSampler", "hybrid_loss", "loss_weight", "simple_loss", "training_target"]
