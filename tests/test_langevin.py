"""Score matching and Langevin dynamics (fd.langevin): SGLD, annealed Langevin, the σ ladder, DSM loss."""

import os
import signal

import numpy as np
import pytest

import ferrodiff as fd
from ferrodiff import langevin

# A 2-D mixture with unequal weights and widths, so that both the modes and their masses are tested.
MIXTURE = fd.oracles.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.3])
N_SAMPLES = 2000
# A ladder that starts well above the distance between the modes (4.1) so that the chains can
# still cross between them at the first levels, and 200 iterations per level: with NCSN's own
# (1 -> 0.01, 10 x 100) the mixture weights come out visibly biased.
LADDER = dict(sigma_max=10.0, sigma_min=0.01, n=20)
STEPS_PER_LEVEL = 200


def mixture_score_ve(x, sigma, means_shift=0.0):
    """Exact score of the mixture under VE noise σ: Σ_k w_k N(μ_k, (s_k² + σ²) I), in float64."""
    means = MIXTURE.means + means_shift
    var = MIXTURE.stds**2 + sigma**2
    diff = x[:, None, :].astype(np.float64) - means[None]
    dim = x.shape[1]
    log_resp = np.log(MIXTURE.weights)[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * dim * np.log(var)
    log_resp -= log_resp.max(axis=1, keepdims=True)
    resp = np.exp(log_resp)
    resp /= resp.sum(axis=1, keepdims=True)
    return (-(resp[:, :, None] * diff / var[None, :, None]).sum(axis=1)).astype(np.float32)


@pytest.fixture(scope="module")
def true_samples_and_floor():
    """A reference sample and the energy-distance floor: the largest |D²| over five pairs of
    independent exact samples of the same size."""
    samples = [MIXTURE.sample(N_SAMPLES, seed=100 + i) for i in range(11)]
    pairs = [fd.oracles.energy_distance(samples[2 * i], samples[2 * i + 1]) for i in range(5)]
    return samples[10], max(abs(d) for d in pairs), pairs


def run_annealed(score_fn, seed=0):
    sigmas = langevin.geometric_sigmas(**LADDER)
    return langevin.annealed(score_fn, sigmas, (N_SAMPLES, 2), steps_per_level=STEPS_PER_LEVEL, seed=seed)


# --- SGLD -------------------------------------------------------------------------------------


def test_sgld_with_the_analytic_score_recovers_a_gaussians_mean_and_variance():
    mean = np.array([1.0, -2.0], np.float32)
    std = np.array([0.7, 1.0], np.float32)
    chains, delta, steps = 4000, 0.01, 2000
    seen = []

    def score(x):
        return -(x - mean) / std**2

    x = langevin.sgld(
        score, np.zeros((chains, 2), np.float32), delta, steps, seed=3, callback=lambda k, x: seen.append(k)
    )
    assert x.shape == (chains, 2) and x.dtype == np.float32
    assert seen == list(range(steps))
    # Stationary variance of the discretised chain: s² / (1 - δ/(4 s²)) (< 0.6 % above s²); the
    # start has decayed by (1 - δ/(2 s²))^steps < 1e-4. Tolerances: 5 standard errors.
    var_chain = std.astype(np.float64) ** 2 / (1 - delta / (4 * std.astype(np.float64) ** 2))
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * std / np.sqrt(chains))
    np.testing.assert_array_less(np.abs(x.var(0, ddof=1) - var_chain), 5 * var_chain * np.sqrt(2 / chains))


def test_sgld_is_a_pure_function_of_the_seed():
    x0 = np.linspace(-1, 1, 64, dtype=np.float32).reshape(32, 2)
    a = langevin.sgld(lambda x: -x, x0, 0.1, 20, seed=5)
    b = langevin.sgld(lambda x: -x, x0, 0.1, 20, seed=5)
    c = langevin.sgld(lambda x: -x, x0, 0.1, 20, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Zero steps return the start; the input is not modified in place.
    np.testing.assert_array_equal(langevin.sgld(lambda x: -x, x0, 0.1, 0), x0)
    assert x0[0, 0] == -1.0


def test_sgld_noise_is_a_function_of_seed_iteration_and_element_index_only():
    def unit_score(x):
        return np.ones_like(x)

    big = langevin.sgld(unit_score, np.full((4, 3), 0.5, np.float32), 0.04, 2, seed=9)
    small = langevin.sgld(unit_score, np.full((2, 3), 0.5, np.float32), 0.04, 2, seed=9)
    np.testing.assert_array_equal(big[:2], small)
    # Two steps of x + (δ/2)·1 + sqrt(δ) z: z = (x2 - x0 - δ) / sqrt(δ) is a sum of two normals.
    z = (big - 0.5 - 0.04) / 0.2
    assert np.all(np.abs(z) < 12) and np.std(z) > 0.1


# --- Annealed Langevin with the exact score of a mixture -----------------------------------------


def test_annealed_langevin_with_the_exact_score_reproduces_a_gaussian_mixture(true_samples_and_floor):
    reference, floor, pairs = true_samples_and_floor
    x = run_annealed(mixture_score_ve)
    assert x.shape == (N_SAMPLES, 2) and np.isfinite(x).all()
    d2 = fd.oracles.energy_distance(x, reference)
    print(f"energy distance {d2:.6f}, floor {floor:.6f} (true-vs-true pairs {np.round(pairs, 6)})")
    assert d2 < 2 * floor
    # The mass of the left component (weight 0.3) is within 4 binomial standard errors.
    assert abs((x[:, 0] < 0).mean() - 0.3) < 4 * np.sqrt(0.21 / N_SAMPLES)


def test_annealed_langevin_with_a_wrong_score_fails_the_same_check(true_samples_and_floor):
    reference, floor, _ = true_samples_and_floor
    x = run_annealed(lambda x, sigma: mixture_score_ve(x, sigma, means_shift=0.25))
    d2 = fd.oracles.energy_distance(x, reference)
    print(f"energy distance with means shifted by 0.25: {d2:.6f}, floor {floor:.6f}")
    assert d2 > 2 * floor


def test_annealed_calls_the_score_with_each_sigma_of_the_ladder_as_a_float():
    calls = []

    def score(x, sigma):
        calls.append(sigma)
        assert isinstance(sigma, float) and x.dtype == np.float32 and x.shape == (3, 2)
        return np.zeros_like(x)

    sigmas = [2.0, 1.0, 0.5]
    x = langevin.annealed(score, sigmas, (3, 2), steps_per_level=4, eps=0.01, seed=1)
    assert calls == [2.0] * 4 + [1.0] * 4 + [0.5] * 4
    # With a zero score the start is σ_1 z and each iteration adds sqrt(2 α_i) z: finite and random.
    assert np.isfinite(x).all() and x.std() > 0
    start = np.full((3, 2), 7.0, np.float32)
    y = langevin.annealed(lambda x, s: -(x - 7.0) * 0, sigmas, steps_per_level=0, x_init=start)
    np.testing.assert_array_equal(y, start)


def test_geometric_sigmas_default_is_ncsns_ladder():
    s = langevin.geometric_sigmas()
    np.testing.assert_allclose(s, np.geomspace(1.0, 0.01, 10), rtol=1e-12)
    assert s.dtype == np.float64 and s[0] == 1.0 and s[-1] == 0.01
    np.testing.assert_allclose(langevin.geometric_sigmas(50.0, 0.5, 3), [50.0, 5.0, 0.5], rtol=1e-12)


# --- Denoising score matching ------------------------------------------------------------------


def dsm_loss_numpy(score, x_noisy, x0, sigmas):
    """NCSN eq. 6 per sample: ½ σ² mean over dims of (s - (-(x̃ - x0)/σ²))², in float64."""
    s, xn, x = (a.astype(np.float64).reshape(len(a), -1) for a in (score, x_noisy, x0))
    sig = np.asarray(sigmas, np.float64)[:, None]
    target = -(xn - x) / sig**2
    return 0.5 * (sig**2 * (s - target) ** 2).mean(axis=1)


def test_dsm_loss_and_gradient_match_numpy_and_finite_differences(rng):
    shape = (4, 2, 3)
    x0 = rng.standard_normal(shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    ladder = langevin.geometric_sigmas()
    sigmas = ladder[[0, 3, 6, 9]]
    x_noisy = (x0 + sigmas[:, None, None] * z).astype(np.float32)
    score = rng.standard_normal(shape).astype(np.float32)
    loss, grad = langevin.dsm_loss(score, x_noisy, x0, sigmas)
    assert loss.dtype == np.float64 and loss.shape == (4,)
    assert grad.dtype == np.float32 and grad.shape == shape
    np.testing.assert_allclose(loss, dsm_loss_numpy(score, x_noisy, x0, sigmas), rtol=1e-10)
    # The exact target -z/σ has zero loss.
    exact = (-z / sigmas[:, None, None]).astype(np.float32)
    np.testing.assert_array_less(langevin.dsm_loss(exact, x_noisy, x0, sigmas)[0], 1e-8)
    # Gradient of the sum over samples, by central differences in float64.
    h = 1e-4
    base = score.astype(np.float64)
    numeric = np.zeros(shape)
    for idx in np.ndindex(shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += h
        minus[idx] -= h
        total_plus = dsm_loss_numpy(plus, x_noisy, x0, sigmas).sum()
        total_minus = dsm_loss_numpy(minus, x_noisy, x0, sigmas).sum()
        numeric[idx] = (total_plus - total_minus) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


# --- Bad inputs --------------------------------------------------------------------------------


def test_score_fn_returning_the_wrong_shape_or_dtype_is_a_clear_error():
    x0 = np.zeros((4, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"score_fn returned an array of shape \[4, 3\] but x has shape \[4, 2\]"
    ):
        langevin.sgld(lambda x: np.zeros((4, 3), np.float32), x0, 0.1, 3)
    with pytest.raises(TypeError, match="score_fn must return a float array"):
        langevin.sgld(lambda x: np.zeros((4, 2), np.int64), x0, 0.1, 3)
    with pytest.raises(TypeError, match="score_fn must return a float array"):
        langevin.annealed(lambda x, s: "no", [1.0], (4, 2), steps_per_level=2)
    with pytest.raises(ValueError, match="score_fn returned an array of shape"):
        langevin.annealed(lambda x, s: x[:2], [1.0], (4, 2), steps_per_level=2)


def test_non_callable_score_fn_is_a_type_error():
    with pytest.raises(TypeError, match=r"score_fn must be callable as score_fn\(x\), got int"):
        langevin.sgld(3, np.zeros((2, 2), np.float32), 0.1, 1)
    with pytest.raises(TypeError, match=r"score_fn must be callable as score_fn\(x, sigma\)"):
        langevin.annealed(None, [1.0], (2, 2))
    with pytest.raises(TypeError, match="callback must be callable"):
        langevin.sgld(lambda x: x, np.zeros((2, 2), np.float32), 0.1, 1, callback=1)


def test_an_exception_raised_by_score_fn_propagates_as_the_same_object():
    class Boom(Exception):
        pass

    err = Boom("from the score")

    def score(x, *sigma):
        raise err

    with pytest.raises(Boom) as info:
        langevin.sgld(score, np.zeros((2, 2), np.float32), 0.1, 5)
    assert info.value is err
    with pytest.raises(Boom) as info:
        langevin.annealed(score, [1.0, 0.1], (2, 2))
    assert info.value is err


def test_bad_step_sizes_and_ladders_are_value_errors():
    x0 = np.zeros((2, 2), np.float32)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step_size must be a positive finite number"):
            langevin.sgld(lambda x: x, x0, bad, 3)
    with pytest.raises(ValueError, match="empty ladder"):
        langevin.annealed(lambda x, s: x, [], (2, 2))
    with pytest.raises(ValueError, match="sigmas must be strictly descending"):
        langevin.annealed(lambda x, s: x, [0.01, 0.1, 1.0], (2, 2))
    with pytest.raises(ValueError, match="sigmas must be positive and finite"):
        langevin.annealed(lambda x, s: x, [1.0, 0.0], (2, 2))
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        langevin.annealed(lambda x, s: x, [1.0], (2, 2), eps=0.0)
    with pytest.raises(ValueError, match="shape of the samples"):
        langevin.annealed(lambda x, s: x, [1.0])
    with pytest.raises(ValueError, match="does not match x_init's shape"):
        langevin.annealed(lambda x, s: x, [1.0], (3, 2), x_init=x0)
    with pytest.raises(ValueError, match="sigma_max must be finite and greater than sigma_min"):
        langevin.geometric_sigmas(0.01, 1.0)
    with pytest.raises(ValueError, match="n must be at least 1"):
        langevin.geometric_sigmas(n=0)
    with pytest.raises(ValueError, match="x_init must have a batch dimension"):
        langevin.sgld(lambda x: x, np.zeros((), np.float32), 0.1, 1)
    with pytest.raises(TypeError, match="x_init must be a floating-point array"):
        langevin.sgld(lambda x: x, np.zeros((2, 2), np.int32), 0.1, 1)


def test_dsm_loss_rejects_mismatched_inputs():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"x0 has shape \[3, 5\] but score_output has shape \[3, 4\]"):
        langevin.dsm_loss(a, a, np.zeros((3, 5), np.float32), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sigmas_per_sample has 2 entries but the batch has 3 rows"):
        langevin.dsm_loss(a, a, a, [1.0, 1.0])
    with pytest.raises(ValueError, match="sigmas must be positive and finite, got -1 for sample 2"):
        langevin.dsm_loss(a, a, a, [1.0, 1.0, -1.0])
    empty = np.zeros((0, 4), np.float32)
    loss, grad = langevin.dsm_loss(empty, empty, empty, np.zeros(0))
    assert loss.shape == (0,) and grad.shape == (0, 4)


def test_a_nan_in_the_iterate_is_a_floating_point_error_naming_the_iteration():
    calls = []

    def score(x, *sigma):
        calls.append(1)
        return np.full_like(x, np.nan if len(calls) == 4 else 0.0)

    with pytest.raises(FloatingPointError, match="after iteration 3:"):
        langevin.sgld(score, np.zeros((2, 2), np.float32), 0.1, 10)
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"after iteration 3 \(noise level 1\)"):
        langevin.annealed(score, [1.0, 0.5], (2, 2), steps_per_level=3)


def test_ctrl_c_between_iterations_raises_keyboard_interrupt():
    calls = []

    def score(x):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return -x

    with pytest.raises(KeyboardInterrupt):
        langevin.sgld(score, np.zeros((2, 2), np.float32), 0.1, 1000)
    assert len(calls) < 1000


def test_langevin_is_exported_from_the_package():
    assert fd.langevin is langevin
    assert "langevin" in fd.__all__
    assert set(langevin.__all__) == {"annealed", "dsm_loss", "geometric_sigmas", "sgld"}
    assert langevin.__doc__
