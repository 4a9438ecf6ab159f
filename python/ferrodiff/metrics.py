"""Sample-quality metrics: how far generated samples are from data.

Which to use:

- :func:`energy_distance` and :func:`mmd` compare two samples directly, with no model of either
  distribution. They suit low-dimensional samples (the 2-D toys, a few dozen features), where
  they see every difference between distributions, not only the first two moments. Both are
  unbiased U-statistics: they scatter around 0 (and can come out slightly negative) for two
  samples of one distribution. Both cost O((N + M)² D). ``mmd`` sums Gaussian kernels
  exp(-|a - b|² / (2 h²)) over ``bandwidths``; with ``bandwidths=None`` it uses one bandwidth,
  the median pairwise distance of the pooled sample (the median heuristic; above 1000 pooled
  rows, of 1000 evenly spaced ones).
- :func:`frechet_distance` fits a Gaussian (mean, unbiased covariance) to each sample and returns
  the Fréchet (squared 2-Wasserstein) distance between the fits,
  |mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1^½ C2 C1^½)^½). It sees only means and covariances,
  so use it on features where those summarise the data: on Inception-v3 pool features
  (D = 2048) it is FID (Heusel et al. 2017). It needs N, M >= 2, and more rows than D for a
  stable estimate. Fit once with :func:`gaussian_stats` and compare many times with
  :func:`frechet_distance_from_stats` (e.g. against reference statistics kept on disk). The
  matrix square roots are taken through symmetric eigendecompositions, so the result is real
  and non-negative where ``scipy.linalg.sqrtm`` can return complex values.

- :func:`digits_features` maps 8x8 digits to the last hidden layer of a small classifier that
  ferrodiff trains on the bundled digits (:func:`digits_classifier`), so the Fréchet distance of
  those features is an FID for digits.

- :func:`psnr` compares images in pairs (a reconstruction or an edit against its original), not
  distributions: the mean over images of each pair's peak signal-to-noise ratio in dB.

Values depend on the features and on the sample sizes (the Fréchet distance of finite samples is
biased upward): compare only numbers computed the same way.

All functions take float arrays [N, D], or [N, ...] with each row flattened (images [N, C, H, W]
work as they are), in any float dtype (computed from float32 values, accumulated in float64).
"""

import functools

import numpy as np

from ferrodiff._core import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    mmd,
)

__all__ = [
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
]


# The digits classifier: an MLP 64 -> 128 -> 128 -> 10 that ferrodiff trains itself on the bundled
# digits (all 1797 images, seed 0) the first time it is needed in a process: about 3 seconds,
# deterministic on every machine. Held-out accuracy when trained on the train split: see
# tests/test_metrics_digits.py.
DIGITS_CLASSIFIER_HIDDEN = (128, 128)
DIGITS_CLASSIFIER_STEPS = 1500


@functools.cache
def digits_classifier(split: str = "all"):
    """The digits classifier (a :class:`ferrodiff.nn.Classifier`), trained on first use and cached.

    ``split="all"`` (the default) trains on every bundled digit; ``split="train"`` trains on the
    train split only (to measure held-out accuracy).
    """
    from ferrodiff import datasets
    from ferrodiff._core import Classifier

    ds = datasets.digits(split=split)
    clf = Classifier(64, list(DIGITS_CLASSIFIER_HIDDEN), 10, seed=0)
    clf.fit(ds.data, ds.labels, steps=DIGITS_CLASSIFIER_STEPS, batch_size=128, lr=3e-3, seed=0)
    return clf


def digits_features(x) -> np.ndarray:
    """Features [N, 128] of 8x8 digits in [-1, 1] ([N, 1, 8, 8] or [N, 64]): the last hidden
    layer of :func:`digits_classifier`. ``frechet_distance(digits_features(a),
    digits_features(b))`` is an FID-style score for digits."""
    return digits_classifier().features(np.asarray(x, dtype=np.float32).reshape(len(x), -1))


# The 28x28 classifier: an MLP 784 -> 256 -> 128 -> 10 trained by ferrodiff on the train split of
# the bundled MNIST digits (4,000 images, seed 0; about 15 s on 2 cores) the first time it is needed
# in a process. Held-out accuracy on the 1,000 test digits: see tests/test_latent.py.
MNIST_CLASSIFIER_HIDDEN = (256, 128)
MNIST_CLASSIFIER_STEPS = 2000


@functools.cache
def mnist_classifier():
    """The 28x28 digit classifier (a :class:`ferrodiff.nn.Classifier`) trained on the train split
    of the bundled MNIST digits (:func:`ferrodiff.datasets.mnist`), on first use, and cached. The
    test split stays held out, so it is the reference set of :func:`mnist_features` scores."""
    from ferrodiff import datasets
    from ferrodiff._core import Classifier

    ds = datasets.mnist(split="train")
    clf = Classifier(784, list(MNIST_CLASSIFIER_HIDDEN), 10, seed=0)
    clf.fit(
        ds.data.reshape(len(ds), -1), ds.labels, steps=MNIST_CLASSIFIER_STEPS, batch_size=128, lr=2e-3, seed=0
    )
    return clf


def mnist_features(x) -> np.ndarray:
    """Features [N, 128] of 28x28 digits in [-1, 1] ([N, 1, 28, 28] or [N, 784]): the last hidden
    layer of :func:`mnist_classifier`, for an FID-style Fréchet distance on 28x28 digits."""
    return mnist_classifier().features(np.asarray(x, dtype=np.float32).reshape(len(x), -1))


def psnr(x, reference, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over images.

    For each image ``i``, ``10 log10(data_range² / mse_i)`` with ``mse_i`` the mean squared
    difference of ``x[i]`` and ``reference[i]`` over all its values; the result is the mean over
    images of these per-image values (not the PSNR of the pooled mean squared error).

    Args:
        x: images ``[N, ...]`` (e.g. ``[N, C, H, W]``), any real dtype.
        reference: the images to compare with, the same shape as ``x``.
        data_range: the span of possible pixel values, > 0: 2.0 for ferrodiff's images in [-1, 1],
            255.0 for 8-bit pixels, 1.0 for [0, 1].

    Returns:
        The mean PSNR in dB (a Python float). An image identical to its reference has an infinite
        PSNR, so the mean is then ``inf``.

    Raises:
        ValueError: ``x`` and ``reference`` differ in shape, have no batch axis or no images, or
            ``data_range`` is not a finite number > 0.
    """
    x = np.asarray(x, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if x.shape != reference.shape:
        raise ValueError(f"x has shape {x.shape} but reference has shape {reference.shape}")
    if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
        raise ValueError(
            f"x and reference must be [N, ...] with N >= 1 non-empty images, got shape {x.shape}"
        )
    if not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
    mse = np.mean(np.square(x - reference).reshape(x.shape[0], -1), axis=1)
    with np.errstate(divide="ignore"):
        per_image = 10.0 * np.log10(data_range**2 / mse)
    return float(np.mean(per_image))
