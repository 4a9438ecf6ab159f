"""ferrodiff.notebook: image grids with a numpy-only PNG encoder, loss and scatter plots, atomic
saves, progress bars."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest

from ferrodiff import notebook
from ferrodiff.notebook import ImageGrid, image_grid, plot_loss, progress, save_figure, scatter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_with_pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)


def png_chunks(data: bytes):
    position, chunks = len(PNG_SIGNATURE), []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        chunks.append((kind, body, crc))
        position += 12 + length
    return chunks


def constant_images(values, height=2, width=3):
    """[N, 1, H, W] images, image i filled with values[i]."""
    return np.broadcast_to(np.array(values, np.float32)[:, None, None, None], (len(values), 1, height, width))


# ---------------------------------------------------------------------------------------------
# PNG encoder


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (5, 11, 3), (1, 300, 3)])
def test_png_encoder_round_trips_exactly_through_pillow(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = decode_with_pillow(notebook._encode_png(pixels))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("channels, colour_type, mode", [(1, 0, "L"), (3, 2, "RGB")])
def test_grid_png_is_greyscale_or_rgb_and_decodes_to_array(channels, colour_type, mode):
    from PIL import Image

    images = np.random.default_rng(1).uniform(-1.2, 1.2, size=(5, channels, 4, 6))
    grid = image_grid(images, nrow=2, padding=1, scale=2)
    data = grid._repr_png_()
    assert data.startswith(PNG_SIGNATURE)
    chunks = png_chunks(data)
    assert [kind for kind, _, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    for kind, body, crc in chunks:
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (height, width, depth, colour) == (*grid.array.shape[:2], 8, colour_type)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode
    np.testing.assert_array_equal(decode_with_pillow(data), grid.array)
    assert grid.to_pil().mode == mode


# ---------------------------------------------------------------------------------------------
# Grid layout and value mapping


def test_grid_places_image_i_at_row_i_div_nrow_and_column_i_mod_nrow():
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    grid = image_grid(constant_images(values), nrow=3, padding=2, scale=1)
    assert (grid.rows, grid.cols) == (2, 3)
    # 2 rows of height 2 and 3 columns of width 3, with 2 px of padding around and between.
    assert grid.array.shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2)
    expected = np.zeros_like(grid.array)  # pad_value 0, also in the unused sixth slot
    for index, value in enumerate(values):
        row, col = divmod(index, 3)
        top, left = 2 + row * (2 + 2), 2 + col * (3 + 2)
        expected[top : top + 2, left : left + 3] = np.rint((value + 1) / 2 * 255)
    np.testing.assert_array_equal(grid.array, expected)


def test_nrow_is_images_per_row_and_default_is_a_square_layout():
    four_per_row = image_grid(constant_images([0] * 10), nrow=4)
    assert (four_per_row.rows, four_per_row.cols) == (3, 4)
    square = image_grid(constant_images([0] * 10))
    assert (square.rows, square.cols) == (3, 4)
    wide = image_grid(constant_images([0] * 3), nrow=8)
    assert (wide.rows, wide.cols) == (1, 3)


def test_scale_repeats_each_pixel_into_a_square_block():
    image = np.array([[[[-1.0, 1.0], [0.0, -1.0]]]])
    grid = image_grid(image, padding=1, scale=3, pad_value=7)
    assert grid.array.shape == (3 * 2 + 2, 3 * 2 + 2)
    assert grid.cell_shape == (6, 6)
    inner = grid.array[1:-1, 1:-1]
    np.testing.assert_array_equal(inner, np.kron(np.array([[0, 255], [128, 0]]), np.ones((3, 3))))
    assert (grid.array[0] == 7).all() and (grid.array[:, -1] == 7).all()


def test_values_map_low_to_0_and_high_to_255_and_are_clipped():
    images = np.array([[[-1.0, 1.0, 0.0, -5.0, 7.0, 0.5]]])  # [N=1, H=1, W=6]
    row = image_grid(images, padding=0, scale=1).array[0]
    np.testing.assert_array_equal(row, [0, 255, 128, 0, 255, 191])
    row = image_grid(images, padding=0, scale=1, value_range=(0, 1)).array[0]
    np.testing.assert_array_equal(row, [0, 255, 0, 0, 255, 128])


def test_rgb_images_keep_channel_order_in_the_last_axis():
    image = np.stack([np.full((2, 2), -1.0), np.zeros((2, 2)), np.ones((2, 2))])[None]
    grid = image_grid(image, padding=0, scale=1)
    assert grid.array.shape == (2, 2, 3)
    np.testing.assert_array_equal(grid.array[0, 0], [0, 128, 255])


def test_nhw_and_single_channel_images_give_the_same_greyscale_grid():
    images = np.random.default_rng(2).uniform(-1, 1, size=(6, 5, 4))
    from_nhw = image_grid(images, nrow=3, scale=2)
    from_nchw = image_grid(images[:, None], nrow=3, scale=2)
    assert from_nhw.array.ndim == 2
    np.testing.assert_array_equal(from_nhw.array, from_nchw.array)


def test_default_scale_makes_8x8_digits_visible_and_leaves_large_images_alone():
    digits = image_grid(np.zeros((16, 1, 8, 8)))
    assert digits.scale > 1 and max(digits.array.shape) >= 256
    assert max(image_grid(np.zeros((1, 8, 8))).array.shape) >= 256
    assert image_grid(np.zeros((4, 3, 256, 256))).scale == 1


def test_accepts_lists_integers_and_torch_tensors_with_grad():
    grid = image_grid([[[0, 255]]], value_range=(0, 255), padding=0, scale=1)
    np.testing.assert_array_equal(grid.array, [[0, 255]])
    torch = pytest.importorskip("torch")
    tensor = torch.linspace(-1, 1, 8).reshape(2, 1, 2, 2).requires_grad_()
    np.testing.assert_array_equal(
        image_grid(tensor, scale=1).array, image_grid(tensor.detach().numpy(), scale=1).array
    )


def test_repr_png_starts_with_png_signature_and_repr_names_the_layout():
    grid = image_grid(np.zeros((4, 3, 8, 8)), scale=2)
    assert grid._repr_png_().startswith(PNG_SIGNATURE)
    assert "4 images" in repr(grid) and "scale=2" in repr(grid)


def test_html_view_only_with_labels_and_escapes_them():
    grid = image_grid(np.zeros((2, 8, 8)), labels=["<a>", 3])
    page = grid._repr_html_()
    assert page.count("data:image/png;base64,") == 2
    assert "&lt;a&gt;" in page and "<a>" not in page and ">3<" in page
    assert image_grid(np.zeros((2, 8, 8)))._repr_html_() is None


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((8, 8)), "images"),
        (np.zeros((1, 1, 1, 8, 8)), "images"),
        (np.zeros((2, 2, 8, 8)), "C = 2"),
        (np.zeros((0, 1, 8, 8)), "images is empty"),
        (np.zeros((2, 1, 0, 8)), "images is empty"),
        (np.array([[[0.0, np.nan]]]), "images has 1 non-finite"),
        (np.array([[[np.inf, -np.inf]]]), "images has 2 non-finite"),
    ],
)
def test_bad_images_raise_value_error_naming_images(images, message):
    with pytest.raises(ValueError, match=message):
        image_grid(images)


def test_non_real_images_raise_type_error():
    with pytest.raises(TypeError, match="images"):
        image_grid(np.zeros((1, 2, 2), dtype=complex))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"nrow": 0}, "nrow"),
        ({"nrow": 2.5}, "nrow"),
        ({"padding": -1}, "padding"),
        ({"scale": 0}, "scale"),
        ({"scale": 1.5}, "scale"),
        ({"value_range": (1, -1)}, "value_range"),
        ({"value_range": (0, np.inf)}, "value_range"),
        ({"value_range": 1.0}, "value_range"),
        ({"labels": ["a"]}, "labels"),
        ({"labels": "ab"}, "labels"),
        ({"pad_value": 256}, "pad_value"),
    ],
)
def test_bad_grid_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        image_grid(np.zeros((2, 8, 8)), **kwargs)


def test_image_grid_function_and_class_agree():
    images = np.random.default_rng(3).uniform(-1, 1, size=(3, 3, 4, 4))
    np.testing.assert_array_equal(image_grid(images, 2).array, ImageGrid(images, 2).array)


# ---------------------------------------------------------------------------------------------
# Atomic saves


def test_save_writes_the_png_and_leaves_no_temporary_file(tmp_path):
    grid = image_grid(np.zeros((4, 1, 8, 8)))
    target = grid.save(tmp_path / "grid.png")
    assert target.read_bytes() == grid._repr_png_()
    assert os.listdir(tmp_path) == ["grid.png"]
    grid.save(str(target))  # overwrites, str paths accepted
    assert os.listdir(tmp_path) == ["grid.png"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "grid.png"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="disk full"):
        image_grid(np.zeros((4, 1, 8, 8))).save(target)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["grid.png"]


# ---------------------------------------------------------------------------------------------
# Plots


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def test_plot_loss_draws_a_faint_raw_curve_and_a_smoothed_curve_on_a_log_axis(matplotlib):
    from matplotlib.figure import Figure

    losses = np.exp(-np.linspace(0, 3, 500)) + 0.01 * np.random.default_rng(4).random(500)
    figure = plot_loss(losses, title="training")
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    raw, smoothed = ax.get_lines()
    assert raw.get_alpha() < 1 and ax.get_yscale() == "log" and ax.get_title() == "training"
    np.testing.assert_array_equal(raw.get_ydata(), losses)
    assert np.abs(np.diff(smoothed.get_ydata())).sum() < np.abs(np.diff(losses)).sum()


def test_plot_loss_without_smoothing_draws_one_line(matplotlib):
    for smooth in (None, 0.0, 1):
        (line,) = plot_loss([3.0, 2.0, 1.0], smooth=smooth).axes[0].get_lines()
        np.testing.assert_array_equal(line.get_ydata(), [3.0, 2.0, 1.0])
    assert len(plot_loss(np.ones(20)).axes[0].get_lines()) == 1  # "auto" leaves short runs raw


def test_plot_loss_window_is_a_trailing_mean_and_ema_is_bias_corrected(matplotlib):
    _, windowed = plot_loss([1.0, 2.0, 3.0, 4.0], smooth=2).axes[0].get_lines()
    np.testing.assert_allclose(windowed.get_ydata(), [1.0, 1.5, 2.5, 3.5])
    _, ema = plot_loss([5.0, 5.0, 5.0], smooth=0.9).axes[0].get_lines()
    np.testing.assert_allclose(ema.get_ydata(), [5.0, 5.0, 5.0])
    _, ema = plot_loss([1.0, 3.0], smooth=0.5).axes[0].get_lines()
    np.testing.assert_allclose(ema.get_ydata(), [1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_plot_loss_skips_non_finite_losses_in_the_smoothing(matplotlib):
    raw, windowed = plot_loss([1.0, np.nan, np.inf, 3.0], smooth=3).axes[0].get_lines()
    assert np.isnan(raw.get_ydata()[1:3]).all()
    np.testing.assert_allclose(windowed.get_ydata(), [1.0, 1.0, 1.0, 3.0])


def test_plot_loss_draws_into_a_given_ax_and_returns_its_figure(matplotlib):
    from matplotlib.figure import Figure

    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert plot_loss(np.linspace(1, 2, 300), ax=right, log=False) is figure
    assert len(right.get_lines()) == 2 and len(left.get_lines()) == 0
    assert right.get_yscale() == "linear"


@pytest.mark.parametrize(
    "losses, kwargs, name",
    [
        (np.ones((3, 2)), {}, "losses"),
        ([], {}, "losses is empty"),
        ([np.nan, np.inf], {}, "losses has no finite"),
        ([1.0, 0.0, -1.0], {}, "losses has non-positive"),
        ([1.0, 2.0], {"smooth": 1.5}, "smooth"),
        ([1.0, 2.0], {"smooth": 0}, "smooth"),
        ([1.0, 2.0], {"smooth": True}, "smooth"),
        ([1.0, 2.0], {"smooth": "ema"}, "smooth"),
    ],
)
def test_bad_plot_loss_inputs_raise_value_error_naming_the_argument(matplotlib, losses, kwargs, name):
    with pytest.raises(ValueError, match=name):
        plot_loss(losses, **kwargs)


def test_plot_loss_accepts_negative_losses_on_a_linear_axis(matplotlib):
    assert plot_loss([1.0, 0.0, -1.0], log=False).axes[0].get_yscale() == "linear"


def test_scatter_draws_samples_over_reference_in_another_colour(matplotlib):
    from matplotlib.figure import Figure

    rng = np.random.default_rng(5)
    samples, reference = rng.normal(size=(100, 2)), rng.normal(size=(300, 2))
    figure = scatter(samples, title="DDIM")
    assert isinstance(figure, Figure) and len(figure.axes[0].collections) == 1
    figure = scatter(samples, reference=reference, lim=3)
    ax = figure.axes[0]
    reference_points, sample_points = ax.collections
    np.testing.assert_array_equal(sample_points.get_offsets(), samples)
    np.testing.assert_array_equal(reference_points.get_offsets(), reference)
    assert not np.allclose(reference_points.get_facecolor(), sample_points.get_facecolor())
    assert ax.get_xlim() == (-3, 3) and ax.get_ylim() == (-3, 3)
    assert ax.get_legend() is not None


def test_scatter_draws_into_a_given_ax(matplotlib):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert scatter(np.zeros((4, 2)), ax=ax, lim=(-1, 2)) is figure
    assert len(ax.collections) == 1 and ax.get_xlim() == (-1, 2)


def test_scatter_leaves_out_non_finite_rows_with_a_warning(matplotlib):
    with pytest.warns(RuntimeWarning, match="samples has 1 of 3 rows"):
        figure = scatter([[0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]])
    assert len(figure.axes[0].collections[0].get_offsets()) == 2


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"samples": np.zeros((5, 3))}, "samples must have shape \\[N, 2\\]"),
        ({"samples": np.zeros(5)}, "samples must have shape"),
        ({"samples": np.zeros((0, 2))}, "samples is empty"),
        ({"reference": np.zeros((5, 2, 1))}, "reference must have shape"),
        ({"lim": -1}, "lim"),
        ({"lim": (2, 1)}, "lim"),
        ({"s": 0}, "s must be"),
    ],
)
def test_bad_scatter_inputs_raise_value_error_naming_the_argument(matplotlib, kwargs, name):
    kwargs = {"samples": np.zeros((5, 2)), **kwargs}
    with pytest.raises(ValueError, match=name):
        scatter(**kwargs)


def test_save_figure_is_atomic_and_follows_the_suffix(matplotlib, tmp_path, monkeypatch):
    figure = scatter(np.zeros((4, 2)))
    assert save_figure(figure, tmp_path / "plot.png").read_bytes().startswith(PNG_SIGNATURE)
    assert save_figure(figure, tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(os.listdir(tmp_path)) == ["plot.png", "plot.svg"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_figure(plot_loss([1.0, 2.0]), tmp_path / "plot.png")
    monkeypatch.undo()
    assert decode_with_pillow((tmp_path / "plot.png").read_bytes()).shape[0] > 0
    assert sorted(os.listdir(tmp_path)) == ["plot.png", "plot.svg"]


def test_plots_without_matplotlib_raise_import_error_with_the_install_hint(monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for plot, argument in [(plot_loss, [1.0, 2.0]), (scatter, np.zeros((3, 2)))]:
        with pytest.raises(ImportError, match=r"pip install 'ferrodiff\[plot\]'"):
            plot(argument)
    assert image_grid(np.zeros((1, 8, 8)))._repr_png_().startswith(PNG_SIGNATURE)  # numpy only


def test_returned_figures_display_as_png_in_ipython_without_pyplot(matplotlib, monkeypatch):
    formatters = pytest.importorskip("IPython.core.formatters")
    png = formatters.PNGFormatter()
    shell = types.SimpleNamespace(display_formatter=types.SimpleNamespace(formatters={"image/png": png}))
    fake_ipython = types.SimpleNamespace(get_ipython=lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    figure = plot_loss([1.0, 2.0])
    assert png(figure).startswith(PNG_SIGNATURE)


def test_library_code_never_touches_pyplot(matplotlib):
    script = (
        "import sys, numpy as np\n"
        "from ferrodiff.notebook import image_grid, plot_loss, scatter\n"
        "plot_loss(np.linspace(2, 1, 200)); scatter(np.zeros((3, 2)), reference=np.ones((3, 2)))\n"
        "image_grid(np.zeros((2, 8, 8)))._repr_png_()\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "MPLBACKEND": "Agg"})


# ---------------------------------------------------------------------------------------------
# Progress


def test_progress_uses_tqdm_auto_when_installed():
    tqdm_auto = pytest.importorskip("tqdm.auto")
    with progress(3, desc="sampling") as bar:
        bar.update(3)
    assert isinstance(bar, tqdm_auto.tqdm) and bar.n == 3


def test_progress_falls_back_to_a_text_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with progress(4, desc="sampling") as bar:
        for _ in range(4):
            bar.update()
    assert bar.n == 4
    err = capsys.readouterr().err
    assert "sampling" in err and "4/4" in err


def test_progress_with_total_zero_counts_steps_of_unknown_number(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with progress(0, desc="adaptive") as bar:
        for _ in range(7):
            bar.update()
    err = capsys.readouterr().err
    assert "adaptive: 7 steps" in err and "/0" not in err


@pytest.mark.parametrize("total", [-1, 2.5, True, "10"])
def test_bad_progress_total_raises_value_error_naming_total(total):
    with pytest.raises(ValueError, match="total"):
        progress(total)
