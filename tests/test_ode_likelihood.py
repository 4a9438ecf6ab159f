"""Likelihood through the probability-flow ODE (Song et al. 2021): exact for the mixture oracle,
Hutchinson's estimator through candle's autograd for models, by differences for callables."""

import math

import ferrodiff as fd
import numpy as np
import pytest


def mixture_log_density(m, x, sigma):
    """numpy: log Σ_k w_k N(x; μ_k, (s_k² + σ²) I), an independent implementation."""
    w = m.weights / m.weights.sum()
    var = m.stds**2 + sigma**2  # [K]
    d2 = ((x[:, None, :] - m.means[None]) ** 2).sum(-1)  # [B, K]
    dim = x.shape[1]
    logs = np.log(w)[None] - 0.5 * d2 / var[None] - 0.5 * dim * np.log(2 * np.pi * var)[None]
    mx = logs.max(1, keepdims=True)
    return (mx + np.log(np.exp(logs - mx).sum(1, keepdims=True)))[:, 0]


def test_ode_likelihood_of_the_mixture_equals_its_true_log_density_within_one_percent():
    m = fd.oracles.eight_gaussians(radius=2.0, std=0.15)
    x = m.sample(200, seed=3)
    bpd, info = fd.likelihood.ode_bits_per_dim(
        m, None, x, sigma_min=0.002, sigma_max=80.0, data_variance=4.0, return_info=True
    )
    truth = mixture_log_density(m, x.astype(np.float64), 0.002)
    ll = info["log_likelihood"]
    assert abs(ll.mean() - truth.mean()) < 0.01 * abs(truth.mean()), (ll.mean(), truth.mean())
    np.testing.assert_allclose(ll, truth, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(bpd, -ll / (2 * math.log(2)))
    assert info["nfe"] > 0 and info["accepted"] > 0


def test_autograd_divergence_of_a_model_matches_central_differences():
    s = fd.Schedule.linear(1000)
    model = fd.nn.MLP((2,), hidden=32, blocks=1, seed=1)
    x = fd.oracles.eight_gaussians().sample(8, seed=0)
    kw = {"timestep_mode": "nearest", "rtol": 1e-4, "atol": 1e-4, "seed": 5}
    by_autograd = fd.likelihood.ode_bits_per_dim(model, s, x, **kw)
    by_differences = fd.likelihood.ode_bits_per_dim(lambda x, t: model(x, t), s, x, delta=1e-3, **kw)  # noqa: PLW0108
    assert np.all(np.isfinite(by_autograd))
    np.testing.assert_allclose(by_autograd, by_differences, rtol=2e-3, atol=2e-3)


def test_dequantized_bits_per_dim_adds_the_bin_width():
    m = fd.oracles.GaussianMixture(np.array([1.0]), np.array([[0.0, 0.0]]), np.array([0.5]))
    levels = np.array([[-1.0, 1.0], [0.0039215686, -0.5019608]], dtype=np.float32)  # on the 256-level grid
    plain, info = fd.likelihood.ode_bits_per_dim(m, None, levels, data_variance=0.25, return_info=True)
    deq, dinfo = fd.likelihood.ode_bits_per_dim(
        m, None, levels, data_variance=0.25, dequantize=True, return_info=True
    )
    # bits/dim of 8-bit data = (−log p(x̃)/D + ln 128)/ln 2 at the dequantised x̃
    np.testing.assert_allclose(deq, (-dinfo["log_likelihood"] / 2 + math.log(128)) / math.log(2))
    assert np.all(np.abs(deq - plain - 7.0) < 1.0)


def test_bad_likelihood_inputs_are_value_errors():
    s = fd.Schedule.linear(1000)
    m = fd.oracles.eight_gaussians()
    x = m.sample(4, seed=0)
    with pytest.raises(ValueError, match="schedule"):
        fd.likelihood.ode_bits_per_dim(lambda x, t: x, None, x)
    with pytest.raises(ValueError, match="NaN"):
        fd.likelihood.ode_bits_per_dim(m, None, np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="dimension"):
        fd.likelihood.ode_bits_per_dim(m, None, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="8-bit"):
        fd.likelihood.ode_bits_per_dim(m, None, x * 5, dequantize=True)
    with pytest.raises(ValueError, match="rtol"):
        fd.likelihood.ode_bits_per_dim(m, s, x, rtol=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        fd.likelihood.ode_bits_per_dim(m, None, x, sigma_min=5.0, sigma_max=1.0)
