"""ferrodiff.metrics against independent numpy/scipy computations, and bad inputs."""

import ferrodiff._core as core
import numpy as np
import pytest
from ferrodiff import metrics


def f32_sample(rng, shape, shift=0.0, scale=1.0):
    """A float32 Gaussian sample; references use exactly these (float32-rounded) values."""
    return (shift + scale * rng.standard_normal(shape)).astype(np.float32)


def random_spd(rng, d, floor=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + floor * np.eye(d)


def frechet_by_eigvals(mu1, c1, mu2, c2):
    """tr((C1^½ C2 C1^½)^½) = Σ sqrt(eig(C1 C2)): C1 C2 is similar to C1^½ C2 C1^½."""
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross)


def frechet_by_sqrtm(mu1, c1, mu2, c2):
    """The reference FID formula, with scipy's sqrtm of the non-symmetric product."""
    linalg = pytest.importorskip("scipy.linalg")
    cross = np.trace(np.real(linalg.sqrtm(c1 @ c2)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross)


def mmd_by_loops(x, y, bandwidths):
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)

    def k(a, b):
        sq = float(np.sum((a - b) ** 2))
        return sum(np.exp(-sq / (2.0 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2.0 * kxy


def median_pairwise_distance(x, y):
    pooled = np.concatenate([x.reshape(len(x), -1), y.reshape(len(y), -1)]).astype(np.float64)
    p = len(pooled)
    distances = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(p) for j in range(i + 1, p)]
    return float(np.median(distances))


def test_metrics_module_reexports_the_extension_functions():
    assert metrics.energy_distance is core.energy_distance
    assert metrics.mmd is core.mmd
    assert metrics.frechet_distance is core.frechet_distance
    assert metrics.gaussian_stats is core.gaussian_stats
    assert metrics.frechet_distance_from_stats is core.frechet_distance_from_stats
    assert set(metrics.__all__) == {
        "digits_classifier",
        "digits_features",
        "energy_distance",
        "frechet_distance",
        "frechet_distance_from_stats",
        "gaussian_stats",
        "mmd",
        "mnist_classifier",
        "mnist_features",
        "psnr",
    }


@pytest.mark.parametrize("bandwidths", [[1.0], [0.3, 1.0, 4.0], (2.5,)])
def test_mmd_matches_explicit_loops(rng, bandwidths):
    x = f32_sample(rng, (12, 3))
    y = f32_sample(rng, (9, 3), shift=0.5)
    got = metrics.mmd(x, y, bandwidths=bandwidths)
    assert got == pytest.approx(mmd_by_loops(x, y, bandwidths), rel=1e-10, abs=1e-13)


def test_mmd_scalar_bandwidth_is_one_kernel(rng):
    x, y = f32_sample(rng, (8, 2)), f32_sample(rng, (7, 2), shift=1.0)
    assert metrics.mmd(x, y, bandwidths=1.5) == pytest.approx(mmd_by_loops(x, y, [1.5]), rel=1e-10)
    assert metrics.mmd(x, y, bandwidths=np.float32(1.5)) == metrics.mmd(x, y, 1.5)


def test_mmd_without_bandwidths_uses_the_median_pairwise_distance(rng):
    x = f32_sample(rng, (11, 4))
    y = f32_sample(rng, (10, 4), shift=0.3, scale=2.0)
    h = median_pairwise_distance(x, y)
    assert metrics.mmd(x, y) == pytest.approx(mmd_by_loops(x, y, [h]), rel=1e-9)
    assert metrics.mmd(x, y, bandwidths=None) == metrics.mmd(x, y)


def test_mmd_flattens_rows_and_converts_float64(rng):
    x = f32_sample(rng, (10, 1, 2, 2))
    y = f32_sample(rng, (6, 1, 2, 2), shift=0.2)
    flat = metrics.mmd(x.reshape(10, 4), y.reshape(6, 4), [1.0])
    assert metrics.mmd(x, y, [1.0]) == flat
    assert metrics.mmd(x.astype(np.float64), y.astype(np.float64), [1.0]) == flat


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_the_shift(rng):
    x = f32_sample(rng, (300, 2))
    same = metrics.mmd(x, f32_sample(rng, (300, 2)), [1.0])
    assert abs(same) < 0.01
    values = [metrics.mmd(x, f32_sample(rng, (300, 2), shift=s), [1.0]) for s in (0.5, 1.0, 2.0)]
    assert same < values[0] < values[1] < values[2]


def test_gaussian_stats_match_numpy(rng):
    x = f32_sample(rng, (50, 4), shift=100.0)
    mean, cov = metrics.gaussian_stats(x)
    assert mean.dtype == np.float64 and mean.shape == (4,)
    assert cov.dtype == np.float64 and cov.shape == (4, 4)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(cov, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(cov, cov.T)


def test_gaussian_stats_flatten_rows(rng):
    x = f32_sample(rng, (20, 2, 3))
    mean, cov = metrics.gaussian_stats(x)
    assert mean.shape == (6,) and cov.shape == (6, 6)
    np.testing.assert_array_equal(cov, metrics.gaussian_stats(x.reshape(20, 6))[1])


def test_frechet_from_stats_matches_scipy_sqrtm_on_non_commuting_covariances(rng):
    for d in (2, 6, 17):
        c1, c2 = random_spd(rng, d), random_spd(rng, d)
        assert not np.allclose(c1 @ c2, c2 @ c1)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        got = metrics.frechet_distance_from_stats(mu1, c1, mu2, c2)
        assert got == pytest.approx(frechet_by_sqrtm(mu1, c1, mu2, c2), rel=1e-8)


def test_frechet_from_stats_matches_eigenvalues_of_the_product(rng):
    d = 8
    c1, c2 = random_spd(rng, d), random_spd(rng, d, floor=0.5)
    mu1, mu2 = rng.standard_normal(d), np.zeros(d)
    got = metrics.frechet_distance_from_stats(mu1, c1, mu2, c2)
    assert got == pytest.approx(frechet_by_eigvals(mu1, c1, mu2, c2), rel=1e-8)
    assert metrics.frechet_distance_from_stats(mu2, c2, mu1, c1) == pytest.approx(got, rel=1e-12)


def test_frechet_from_stats_of_diagonal_covariances_is_the_closed_form():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12)


def test_frechet_distance_of_samples_matches_a_numpy_fit(rng):
    x = f32_sample(rng, (200, 5))
    y = f32_sample(rng, (150, 5), shift=0.3, scale=1.5)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = frechet_by_eigvals(
        x64.mean(axis=0), np.cov(x64, rowvar=False), y64.mean(axis=0), np.cov(y64, rowvar=False)
    )
    assert metrics.frechet_distance(x, y) == pytest.approx(want, rel=1e-8)
    mu1, c1 = metrics.gaussian_stats(x)
    mu2, c2 = metrics.gaussian_stats(y)
    assert metrics.frechet_distance_from_stats(mu1, c1, mu2, c2) == metrics.frechet_distance(x, y)


def test_frechet_distance_of_a_sample_with_itself_is_zero(rng):
    x = f32_sample(rng, (100, 6))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)
    x_img = x.reshape(100, 1, 2, 3)
    assert metrics.frechet_distance(x_img, x_img) == pytest.approx(0.0, abs=1e-10)


# --- bad inputs ------------------------------------------------------------------------------------


def test_mismatched_row_sizes_are_value_errors(rng):
    x, y = f32_sample(rng, (10, 3)), f32_sample(rng, (10, 4))
    with pytest.raises(ValueError, match="rows must have the same size"):
        metrics.mmd(x, y)
    with pytest.raises(ValueError, match="rows must have the same size"):
        metrics.frechet_distance(x, y)


@pytest.mark.parametrize("name", ["mmd", "frechet_distance"])
def test_one_dimensional_samples_are_value_errors(rng, name):
    fn = getattr(metrics, name)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fn(f32_sample(rng, 10), f32_sample(rng, (10, 1)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fn(f32_sample(rng, (10, 1)), f32_sample(rng, 10))


def test_gaussian_stats_of_a_one_dimensional_array_is_a_value_error(rng):
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.gaussian_stats(f32_sample(rng, 10))


def test_fewer_than_two_rows_for_a_covariance_are_value_errors(rng):
    one = f32_sample(rng, (1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.gaussian_stats(one)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(one, f32_sample(rng, (5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(f32_sample(rng, (5, 3)), one)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mmd(one, f32_sample(rng, (5, 3)))


def test_zero_width_rows_are_value_errors():
    empty = np.zeros((4, 0), np.float32)
    for fn in (metrics.mmd, metrics.frechet_distance):
        with pytest.raises(ValueError):
            fn(empty, empty)
    with pytest.raises(ValueError):
        metrics.gaussian_stats(empty)


def test_non_finite_samples_are_value_errors(rng):
    x = f32_sample(rng, (6, 2))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.gaussian_stats(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.mmd(x, f32_sample(rng, (6, 2)), [1.0])


def test_integer_samples_are_type_errors():
    x = np.arange(12).reshape(6, 2)
    with pytest.raises(TypeError):
        metrics.mmd(x, x)
    with pytest.raises(TypeError):
        metrics.gaussian_stats(x)


@pytest.mark.parametrize("bandwidths", [[], [1.0, -1.0], [0.0], [float("nan")], np.ones((2, 2))])
def test_bad_bandwidths_are_value_errors(rng, bandwidths):
    x = f32_sample(rng, (6, 2))
    with pytest.raises(ValueError):
        metrics.mmd(x, x + 1, bandwidths=bandwidths)


def test_bandwidths_of_the_wrong_kind_are_type_errors(rng):
    x = f32_sample(rng, (6, 2))
    with pytest.raises(TypeError):
        metrics.mmd(x, x + 1, bandwidths="wide")


def test_median_heuristic_on_identical_points_is_a_value_error():
    x = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="pass bandwidths explicitly"):
        metrics.mmd(x, x)


def test_mismatched_stats_are_value_errors(rng):
    mu, c = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu2"):
        metrics.frechet_distance_from_stats(mu, c, np.zeros(4), c)
    with pytest.raises(ValueError, match="cov1"):
        metrics.frechet_distance_from_stats(mu, np.eye(4), mu, c)
    with pytest.raises(ValueError, match="cov2"):
        metrics.frechet_distance_from_stats(mu, c, mu, np.zeros(9))
    with pytest.raises(ValueError, match="mu1"):
        metrics.frechet_distance_from_stats(np.zeros((3, 1)), c, mu, c)


def test_invalid_covariances_are_value_errors(rng):
    mu, c = np.zeros(3), np.eye(3)
    asymmetric = np.eye(3)
    asymmetric[0, 2] = 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        metrics.frechet_distance_from_stats(mu, asymmetric, mu, c)
    with pytest.raises(ValueError, match="negative"):
        metrics.frechet_distance_from_stats(mu, c, mu, -np.eye(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.frechet_distance_from_stats(mu, np.full((3, 3), np.inf), mu, c)
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.frechet_distance_from_stats(np.array([0.0, np.nan, 0.0]), c, mu, c)


def test_digits_classifier_generalises_to_held_out_digits():
    # Trained by ferrodiff on the train split only; judged on the test split.
    from ferrodiff import datasets

    clf = metrics.digits_classifier("train")
    test = datasets.digits(split="test")
    accuracy = (clf.predict_proba(test.data).argmax(1) == test.labels).mean()
    assert accuracy >= 0.95, accuracy


def test_digits_features_separate_real_digits_from_noise():
    from ferrodiff import datasets

    train, test = datasets.digits(split="train"), datasets.digits(split="test")
    f_test = metrics.digits_features(test.data)
    assert f_test.shape == (len(test.data), 128) and f_test.dtype == np.float32
    real = metrics.frechet_distance(metrics.digits_features(train.data), f_test)
    noise = np.random.default_rng(0).uniform(-1, 1, test.data.shape).astype(np.float32)
    fake = metrics.frechet_distance(metrics.digits_features(noise), f_test)
    assert real * 10 < fake, (real, fake)
