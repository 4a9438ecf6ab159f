"""ferrodiff.metrics.psnr against hand computations, and bad inputs."""

import math

import numpy as np
import pytest
from ferrodiff import metrics


@pytest.mark.parametrize("offset", [0.5, 0.01, 1.0])
def test_psnr_of_a_constant_offset_is_ten_log10_of_range_squared_over_offset_squared(offset):
    reference = np.random.default_rng(0).uniform(-1.0, 1.0, (4, 3, 8, 8))
    expected = 10.0 * math.log10(2.0**2 / offset**2)
    assert metrics.psnr(reference + offset, reference) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr(reference - offset, reference) == pytest.approx(expected, abs=1e-9)


def test_psnr_with_an_8_bit_data_range():
    reference = np.full((2, 1, 4, 4), 100.0)
    assert metrics.psnr(reference + 5.0, reference, data_range=255.0) == pytest.approx(
        10.0 * math.log10(255.0**2 / 25.0)
    )


def test_psnr_is_the_mean_of_per_image_values_not_of_the_pooled_error():
    reference = np.zeros((2, 1, 2, 2))
    x = reference.copy()
    x[0] += 0.1
    x[1, 0, 0, 0] = 0.4  # mean squared error 0.16 / 4 = 0.04
    per_image = [10.0 * math.log10(4.0 / 0.01), 10.0 * math.log10(4.0 / 0.04)]
    assert metrics.psnr(x, reference) == pytest.approx(np.mean(per_image))
    assert metrics.psnr(x, reference) != pytest.approx(10.0 * math.log10(4.0 / 0.025))


def test_psnr_of_an_identical_image_is_infinite_and_so_is_the_mean():
    reference = np.random.default_rng(1).uniform(-1.0, 1.0, (3, 2, 5, 5)).astype(np.float32)
    assert metrics.psnr(reference, reference) == math.inf
    x = reference + 0.1
    x[1] = reference[1]
    assert metrics.psnr(x, reference) == math.inf


def test_psnr_accepts_rows_and_any_float_dtype():
    reference = np.zeros((3, 10), np.float32)
    assert metrics.psnr(reference + np.float16(0.5), reference) == pytest.approx(10.0 * math.log10(16.0))


def test_psnr_rejects_mismatched_shapes_and_bad_arguments():
    x = np.zeros((2, 1, 4, 4))
    with pytest.raises(
        ValueError, match=r"x has shape \(2, 1, 4, 4\) but reference has shape \(2, 1, 4, 3\)"
    ):
        metrics.psnr(x, np.zeros((2, 1, 4, 3)))
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\]"):
        metrics.psnr(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\]"):
        metrics.psnr(np.zeros((0, 3)), np.zeros((0, 3)))
    for data_range in (0.0, -2.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="data_range"):
            metrics.psnr(x, x + 1.0, data_range=data_range)


def test_psnr_is_public():
    assert "psnr" in metrics.__all__
