"""End-to-end sampling with the exact denoiser of a Gaussian mixture: the truth is known."""

import ferrodiff as fd
import numpy as np
import pytest

N = 1500


@pytest.fixture(scope="module")
def mixture():
    return fd.oracles.eight_gaussians(radius=2.0, std=0.15)


@pytest.fixture(scope="module")
def noise_floor(mixture):
    """Energy distances between independent true samples: what sampling error cannot beat."""
    truth = [mixture.sample(N, seed=100 + i) for i in range(5)]
    return max(abs(fd.oracles.energy_distance(truth[0], t)) for t in truth[1:])


def test_mixture_eps_matches_numpy_closed_form(mixture):
    s = fd.Schedule.cosine(1000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 2)).astype(np.float32) * 2
    t = np.array([0, 1, 100, 400, 700, 950, 999])
    a = s.alphas_cumprod[t][:, None]
    mu, sd, w = mixture.means, mixture.stds, mixture.weights
    var = a[:, :, None] * sd[None, None, :] ** 2 + 1 - a[:, :, None]  # [B, 1, K]
    diff = x[:, :, None] - np.sqrt(a)[:, :, None] * mu.T[None]  # [B, D, K]
    logp = np.log(w)[None] - 0.5 * (diff**2 / var).sum(1) - np.log(var[:, 0, :])  # D = 2
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    eps = np.sqrt(1 - a) * (r[:, None, :] * diff / var).sum(-1)
    np.testing.assert_allclose(mixture.eps(x, t, s), eps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mixture.class_posterior(x, t, s), r, rtol=1e-6, atol=1e-9)


def test_mixture_samples_have_the_right_moments(mixture):
    x = mixture.sample(200_000, seed=1)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.02)
    # E|x|² = r² + 2 s² for points on a circle of radius r with isotropic noise s.
    assert abs((x**2).sum(1).mean() - (4.0 + 2 * 0.15**2)) < 0.03


def test_ddpm_1000_steps_reproduces_the_mixture_within_the_noise_floor(mixture, noise_floor):
    s = fd.Schedule.linear(1000)
    x = fd.DDPM(s).sample(mixture.denoiser(s), (N, 2), seed=3)
    truth = mixture.sample(N, seed=99)
    d = fd.oracles.energy_distance(x, truth)
    assert d < 3 * noise_floor + 1e-3, (d, noise_floor)


def test_a_wrong_denoiser_is_detected_by_the_same_check(mixture, noise_floor):
    # The check above can fail: a denoiser for a mixture on a 10 % larger circle is caught.
    s = fd.Schedule.linear(1000)
    wrong = fd.oracles.eight_gaussians(radius=2.2, std=0.15)
    x = fd.DDIM(s, steps=50).sample(wrong.denoiser(s), (N, 2), seed=3)
    d = fd.oracles.energy_distance(x, mixture.sample(N, seed=99))
    assert d > 3 * noise_floor + 1e-3, (d, noise_floor)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_ddim_50_steps_reproduces_the_mixture_for_every_prediction_type(mixture, noise_floor, prediction):
    s = fd.Schedule.cosine(1000)
    x = fd.DDIM(s, steps=50, prediction=prediction).sample(mixture.denoiser(s, prediction), (N, 2), seed=5)
    d = fd.oracles.energy_distance(x, mixture.sample(N, seed=98))
    assert d < 3 * noise_floor + 1e-3, (d, noise_floor)


def numpy_ddim_eta0(s, timesteps, eps_fn, x):
    """DDIM eq. 12 with η = 0, written from the paper in float64."""
    abar = s.alphas_cumprod
    traj = []
    x = x.astype(np.float64)
    for i, t in enumerate(timesteps):
        a = abar[t]
        ap = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        eps = eps_fn(x.astype(np.float32), t).astype(np.float64)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
        traj.append(x)
    return traj


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_eta0_follows_a_numpy_reference_trajectory(mixture, spacing):
    s = fd.Schedule.linear(1000)
    d = fd.DDIM(s, steps=20, spacing=spacing)
    den = mixture.denoiser(s)
    x_t = fd.randn((64, 2), seed=8)
    ref = numpy_ddim_eta0(s, d.timesteps, lambda x, t: den(x, np.full(len(x), t)), x_t)
    got = []
    d.sample(den, x_T=x_t, callback=lambda i, t, x, x0: got.append(x))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_strided_ddpm_with_fixed_large_still_reaches_the_mixture(mixture, noise_floor):
    # The seed's "DDPM (σ̂)" row: strided ancestral sampling with σ² = β over 100 steps.
    s = fd.Schedule.linear(1000)
    x = fd.DDPM(s, steps=100, variance="fixed_large").sample(mixture.denoiser(s), (N, 2), seed=9)
    d = fd.oracles.energy_distance(x, mixture.sample(N, seed=97))
    assert d < 10 * noise_floor + 5e-3, (d, noise_floor)


def test_zero_terminal_snr_with_v_prediction_samples_the_mixture(mixture, noise_floor):
    s = fd.Schedule.linear(1000).rescale_zero_terminal_snr()
    d = fd.DDIM(s, steps=50, spacing="trailing", prediction="v")
    x = d.sample(mixture.denoiser(s, "v"), (N, 2), seed=2)
    dist = fd.oracles.energy_distance(x, mixture.sample(N, seed=96))
    assert dist < 3 * noise_floor + 1e-3, (dist, noise_floor)
