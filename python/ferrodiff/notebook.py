"""Notebook helpers: image grids, loss curves, 2-D scatter plots and progress bars.

Everything works headless. :class:`ImageGrid` needs numpy only (it writes its own PNG); the plots
need matplotlib (``pip install 'ferrodiff[plot]'``), imported on first use, and draw on a
``matplotlib.figure.Figure`` with an Agg canvas, never on pyplot's global state. A returned grid or
Figure displays inline when it is the last expression of a Jupyter cell.

    >>> from ferrodiff.notebook import image_grid, plot_loss, scatter
    >>> image_grid(x)                       # x: [N, C, H, W] or [N, H, W] in [-1, 1]  # doctest: +SKIP
    >>> plot_loss(losses)                   # raw curve + exponential moving average   # doctest: +SKIP
    >>> scatter(samples, reference=data)    # [N, 2] samples over [M, 2] data          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import numbers
import os
import struct
import sys
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np

from ferrodiff._progress import progress_bar

__all__ = ["ImageGrid", "image_grid", "plot_loss", "progress", "save_figure", "scatter"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The default scale makes the grid's longer side at least this many pixels, so 8x8 digits are
# visible without a zoom (a 4x4 grid of them is drawn at scale 8, 261 px).
_MIN_DISPLAY_SIDE = 256
_MAX_DEFAULT_SCALE = 32
_PLOT_EXTRA = "pip install 'ferrodiff[plot]'"


# ---------------------------------------------------------------------------------------------
# Image grids


class ImageGrid:
    """A batch of images tiled into one uint8 picture.

    ``images``: ``[N, C, H, W]`` (C = 1 or 3) or ``[N, H, W]`` real values (numpy array, anything
    ``np.asarray`` takes, or a torch tensor). Values are clipped to ``value_range = (low, high)``
    and mapped linearly to 0..255 (``low`` -> 0, ``high`` -> 255, rounded half to even).

    ``nrow``: images per row, as in torchvision's ``make_grid`` (default ``ceil(sqrt(N))``).
    ``padding``: output pixels between images and around the border, filled with ``pad_value``.
    ``scale``: integer nearest-neighbour upscaling of every image (default: the smallest scale
    that makes the grid's longer side at least 256 px, at most 32; 1 for large images).
    ``labels``: optional N captions (any objects, shown with ``str``) displayed under each image
    in Jupyter's HTML view; the PNG (``save``, ``_repr_png_``) holds pixels only.

    Attributes: ``array`` (``[height, width]`` for one channel, ``[height, width, 3]`` for RGB,
    uint8), ``rows``, ``cols``, ``scale``, ``padding``, ``cell_shape`` (scaled ``(H, W)``), ``labels``.
    """

    def __init__(
        self,
        images,
        nrow: int | None = None,
        padding: int = 1,
        value_range: tuple[float, float] = (-1.0, 1.0),
        scale: int | None = None,
        labels=None,
        *,
        pad_value: int = 0,
    ) -> None:
        pixels = _images_to_uint8(images, value_range)  # [N, H, W] or [N, H, W, 3]
        count, height, width = pixels.shape[:3]
        padding = _check_int("padding", padding, minimum=0)
        pad_value = _check_int("pad_value", pad_value, minimum=0)
        if pad_value > 255:
            raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
        if nrow is None:
            cols = math.ceil(math.sqrt(count))
        else:
            cols = min(_check_int("nrow", nrow, minimum=1), count)
        rows = math.ceil(count / cols)
        if scale is None:
            scale = _default_scale(rows, cols, height, width, padding)
        else:
            scale = _check_int("scale", scale, minimum=1)
        self.labels = _check_labels(labels, count)
        self.rows, self.cols, self.scale, self.padding = rows, cols, scale, padding
        self.cell_shape = (height * scale, width * scale)

        if scale > 1:
            pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        cell_height, cell_width = self.cell_shape
        grid_shape = (
            rows * cell_height + (rows + 1) * padding,
            cols * cell_width + (cols + 1) * padding,
        ) + pixels.shape[3:]
        grid = np.full(grid_shape, pad_value, dtype=np.uint8)
        for index in range(count):
            top, left = self._origin(index)
            grid[top : top + cell_height, left : left + cell_width] = pixels[index]
        self.array = grid
        self._count = count

    def _origin(self, index: int) -> tuple[int, int]:
        """Top-left output pixel of image ``index`` (row-major order)."""
        row, col = divmod(index, self.cols)
        return (
            self.padding + row * (self.cell_shape[0] + self.padding),
            self.padding + col * (self.cell_shape[1] + self.padding),
        )

    def __repr__(self) -> str:
        height, width = self.array.shape[:2]
        return (
            f"ImageGrid({self._count} images in {self.rows} rows x {self.cols} columns, "
            f"{width}x{height} px, scale={self.scale})"
        )

    def _repr_png_(self) -> bytes:
        return _encode_png(self.array)

    def _repr_html_(self) -> str | None:
        # Only with labels: without them Jupyter falls back to the PNG.
        if self.labels is None:
            return None
        cell_height, cell_width = self.cell_shape
        figures = []
        for index, label in enumerate(self.labels):
            top, left = self._origin(index)
            cell = self.array[top : top + cell_height, left : left + cell_width]
            data = base64.b64encode(_encode_png(cell)).decode("ascii")
            figures.append(
                '<figure style="margin:0;text-align:center">'
                f'<img src="data:image/png;base64,{data}" width="{cell_width}" height="{cell_height}" '
                'style="image-rendering:pixelated">'
                f'<figcaption style="font-size:0.8em">{html.escape(label)}</figcaption></figure>'
            )
        gap = max(self.padding, 2)
        return (
            f'<div style="display:inline-grid;grid-template-columns:repeat({self.cols},auto);'
            f'gap:{gap}px">' + "".join(figures) + "</div>"
        )

    def save(self, path) -> Path:
        """Write the grid as a PNG, atomically (a temporary file in the same folder, then
        ``os.replace``): a reader never sees a half-written file, and a failure leaves any
        previous file untouched. Returns the path."""
        data = _encode_png(self.array)
        return _atomic_write(path, lambda file: file.write(data))

    def to_pil(self):
        """The grid as a ``PIL.Image.Image`` (mode ``"L"`` or ``"RGB"``); needs Pillow."""
        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError("ImageGrid.to_pil needs Pillow: pip install pillow") from error
        return Image.fromarray(self.array)


def image_grid(
    images,
    nrow: int | None = None,
    padding: int = 1,
    value_range: tuple[float, float] = (-1.0, 1.0),
    scale: int | None = None,
    labels=None,
    *,
    pad_value: int = 0,
) -> ImageGrid:
    """Tile ``images`` (``[N, C, H, W]`` with C = 1 or 3, or ``[N, H, W]``) into an
    :class:`ImageGrid`, which Jupyter displays inline; see :class:`ImageGrid` for the arguments."""
    return ImageGrid(images, nrow, padding, value_range, scale, labels, pad_value=pad_value)


def _images_to_uint8(images, value_range) -> np.ndarray:
    array = np.asarray(_from_tensor(images))
    if array.dtype.kind not in "fiu":
        raise TypeError(f"images must hold real numbers, got dtype {array.dtype}")
    if array.ndim == 4:
        if array.shape[1] not in (1, 3):
            raise ValueError(
                f"images has shape {array.shape}: expected [N, C, H, W] with C = 1 or 3, got C = {array.shape[1]}"
            )
        array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    elif array.ndim != 3:
        raise ValueError(
            f"images must have shape [N, C, H, W] or [N, H, W], got {array.ndim} dimensions {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"images is empty: shape {array.shape}")
    low, high = _check_range(value_range)
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(f"images has {array.size - int(finite.sum())} non-finite values (NaN or inf)")
    unit = (np.clip(array, low, high) - low) / (high - low)
    return np.rint(unit * 255.0).astype(np.uint8)


def _check_range(value_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair (low, high), got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    return low, high


def _check_labels(labels, count: int) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels must be a sequence of {count} labels, got a single string {labels!r}")
    labels = [str(label) for label in labels]
    if len(labels) != count:
        raise ValueError(f"labels has {len(labels)} entries but images has {count}")
    return labels


def _default_scale(rows: int, cols: int, height: int, width: int, padding: int) -> int:
    def longer_side(scale: int) -> int:
        return max(rows * height * scale + (rows + 1) * padding, cols * width * scale + (cols + 1) * padding)

    scale = 1
    while scale < _MAX_DEFAULT_SCALE and longer_side(scale) < _MIN_DISPLAY_SIDE:
        scale += 1
    return scale


# ---------------------------------------------------------------------------------------------
# PNG: 8-bit greyscale (colour type 0) or RGB (colour type 2), one IDAT, no filtering.


def _encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes for a uint8 ``[H, W]`` (greyscale) or ``[H, W, 3]`` (RGB) array."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim == 2:
        colour_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type = 2
    else:
        raise ValueError(f"pixels must have shape [H, W] or [H, W, 3], got {pixels.shape}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"pixels is empty: shape {pixels.shape}")
    scanlines = np.zeros((height, 1 + pixels[0].size), dtype=np.uint8)  # filter byte 0 per row
    scanlines[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join(
        [
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_loss(losses, smooth="auto", ax=None, log: bool = True, title: str | None = None):
    """Plot a training-loss curve against the step index; returns the Figure (``ax.figure`` when
    ``ax`` is given: end the cell's line with ``;`` if pyplot already shows that figure).

    ``losses``: 1-D sequence of numbers (non-finite entries are drawn as gaps and skipped by the
    smoothing). The raw curve is drawn faint with a smoothed curve on top; ``smooth`` picks it:

    - ``"auto"``: exponential moving average with span ``len(losses) / 50`` (no smoothing below
      100 points);
    - a float in ``[0, 1)``: exponential moving average with that decay, bias-corrected as in
      TensorBoard (``0`` = no smoothing);
    - an int ``>= 1``: mean over a trailing window of that many steps (``1`` = no smoothing);
    - ``None``: raw curve only.

    ``log``: logarithmic y axis (needs positive losses).
    """
    values = _as_series(losses)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"losses has no finite values (all {values.size} are NaN or inf)")
    if log and (values[finite] <= 0).any():
        raise ValueError(
            f"losses has non-positive values (min {values[finite].min():g}) but log=True needs "
            "positive values; pass log=False"
        )
    smoothed, smooth_label = _smooth(np.where(finite, values, np.nan), smooth)

    figure, ax = _figure_and_axes(ax, figsize=(6.0, 3.5))
    steps = np.arange(values.size)
    raw = np.where(finite, values, np.nan)
    if smoothed is None:
        ax.plot(steps, raw, color="C0", linewidth=1.0, label="loss")
    else:
        ax.plot(steps, raw, color="C0", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, smoothed, color="C0", linewidth=1.6, label=smooth_label)
        ax.legend()
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if title is not None:
        ax.set_title(title)
    return figure


def scatter(samples, reference=None, ax=None, title: str | None = None, s: float = 2, lim=None):
    """Scatter ``[N, 2]`` samples, optionally over ``[M, 2]`` reference data drawn in grey;
    returns the Figure (``ax.figure`` when ``ax`` is given).

    ``s``: marker area in points². ``lim``: axis limits for both axes, a number ``L`` for
    ``(-L, L)`` or a pair ``(low, high)``; default: matplotlib's automatic limits. Non-finite rows
    are left out with a warning. The axes have equal aspect.
    """
    points = _as_points(samples, "samples")
    reference_points = None if reference is None else _as_points(reference, "reference")
    if not (isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0):
        raise ValueError(f"s must be a positive marker size, got {s!r}")
    limits = _check_lim(lim)

    figure, ax = _figure_and_axes(ax, figsize=(4.5, 4.5))
    if reference_points is not None:
        ax.scatter(
            reference_points[:, 0],
            reference_points[:, 1],
            s=s,
            color="0.65",
            alpha=0.6,
            linewidths=0,
            label=f"reference ({len(reference_points)})",
        )
    ax.scatter(points[:, 0], points[:, 1], s=s, color="C0", linewidths=0, label=f"samples ({len(points)})")
    if reference_points is not None:
        ax.legend(markerscale=max(1.0, 4.0 / math.sqrt(s)))
    if limits is not None:
        ax.set_xlim(limits)
        ax.set_ylim(limits)
    ax.set_aspect("equal")
    if title is not None:
        ax.set_title(title)
    return figure


def save_figure(figure, path, **savefig_kwargs) -> Path:
    """Save a matplotlib Figure atomically (a temporary file in the same folder, then
    ``os.replace``). The format follows ``path``'s suffix (PNG without one) unless ``format=`` is
    given; other keyword arguments go to ``Figure.savefig``. Returns the path."""
    if not hasattr(figure, "savefig"):
        raise TypeError(f"figure must be a matplotlib Figure, got {type(figure).__name__}")
    file_format = savefig_kwargs.pop("format", None) or Path(os.fspath(path)).suffix[1:].lower() or "png"
    return _atomic_write(path, lambda file: figure.savefig(file, format=file_format, **savefig_kwargs))


def _as_series(losses) -> np.ndarray:
    values = np.asarray(_from_tensor(losses))
    if values.dtype == object:
        try:
            values = np.array([float(v) for v in values.ravel()]).reshape(values.shape)
        except (TypeError, ValueError):
            raise TypeError("losses must hold numbers") from None
    if values.dtype.kind not in "fiu":
        raise TypeError(f"losses must hold real numbers, got dtype {values.dtype}")
    if values.ndim != 1:
        raise ValueError(f"losses must be 1-D (one value per step), got shape {values.shape}")
    if values.size == 0:
        raise ValueError("losses is empty")
    return values.astype(np.float64)


def _smooth(values: np.ndarray, smooth) -> tuple[np.ndarray | None, str]:
    """(smoothed curve or None, legend label). ``values`` has NaN where a loss was not finite."""
    if smooth is None:
        return None, ""
    if isinstance(smooth, str):
        if smooth != "auto":
            raise ValueError(f'smooth must be "auto", a float in [0, 1), an int >= 1 or None, got {smooth!r}')
        span = values.size // 50
        if span < 2:
            return None, ""
        return _exponential_moving_average(values, 1.0 - 2.0 / (span + 1)), f"EMA (span {span})"
    if isinstance(smooth, bool):
        raise ValueError(f"smooth must be a float in [0, 1), an int >= 1 or None, got {smooth!r}")
    if isinstance(smooth, numbers.Integral):
        if smooth < 1:
            raise ValueError(f"smooth as a window must be >= 1 step, got {smooth}")
        if smooth == 1:
            return None, ""
        return _trailing_mean(values, int(smooth)), f"mean of {int(smooth)} steps"
    if isinstance(smooth, numbers.Real) and 0.0 <= smooth < 1.0:
        if smooth == 0.0:
            return None, ""
        return _exponential_moving_average(values, float(smooth)), f"EMA ({float(smooth):g})"
    raise ValueError(f'smooth must be "auto", a float in [0, 1), an int >= 1 or None, got {smooth!r}')


def _exponential_moving_average(values: np.ndarray, decay: float) -> np.ndarray:
    # Bias-corrected (divided by the weight seen so far, 1 - decay^k), as TensorBoard does, so the
    # curve starts at the first loss instead of at zero.
    out = np.empty_like(values)
    average = weight = 0.0
    for index, value in enumerate(values.tolist()):
        if value == value:  # not NaN
            average = decay * average + (1.0 - decay) * value
            weight = decay * weight + (1.0 - decay)
        out[index] = average / weight if weight > 0 else np.nan
    return out


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    finite = ~np.isnan(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    seen = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, (sums[ends] - sums[starts]) / np.maximum(seen, 1), np.nan)


def _as_points(points, name: str) -> np.ndarray:
    array = np.asarray(_from_tensor(points))
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2], got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    array = array.astype(np.float64)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        warnings.warn(
            f"{name} has {int((~finite).sum())} of {len(array)} rows with NaN or inf; they are not drawn",
            RuntimeWarning,
            stacklevel=3,
        )
        array = array[finite]
    return array


def _check_lim(lim) -> tuple[float, float] | None:
    if lim is None:
        return None
    if isinstance(lim, numbers.Real) and not isinstance(lim, bool):
        if not (math.isfinite(lim) and lim > 0):
            raise ValueError(f"lim as a number must be positive and finite, got {lim!r}")
        return (-float(lim), float(lim))
    try:
        low, high = (float(v) for v in lim)
    except (TypeError, ValueError):
        raise ValueError(f"lim must be a number L or a pair (low, high), got {lim!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"lim must be finite with low < high, got {lim!r}")
    return (low, high)


def _from_tensor(value):
    # A torch tensor may need grad tracking dropped and a move to host memory before np.asarray.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu()
    return value


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"ferrodiff.notebook plots need matplotlib: {_PLOT_EXTRA}") from error
    return Figure, FigureCanvasAgg


def _figure_and_axes(ax, figsize: tuple[float, float]):
    if ax is not None:
        if not (hasattr(ax, "figure") and hasattr(ax, "plot")):
            raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
        return ax.figure, ax
    figure_class, canvas_class = _matplotlib()
    figure = figure_class(figsize=figsize, layout="constrained")
    canvas_class(figure)
    _enable_inline_display(figure_class)
    return figure, figure.add_subplot()


def _enable_inline_display(figure_class) -> None:
    """Let Jupyter show a returned Figure as PNG even if pyplot (whose inline backend registers
    that display) was never imported. A no-op outside IPython or when a display is registered."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    if shell is None:
        return
    try:
        formatter = shell.display_formatter.formatters["image/png"]
        try:
            formatter.lookup_by_type(figure_class)
        except KeyError:
            formatter.for_type(figure_class, _figure_png)
    except Exception:  # display is a convenience: never let it break plotting
        return


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Files and progress


def _atomic_write(path, write) -> Path:
    """Call ``write(binary_file)`` on a new file next to ``path``, then ``os.replace`` it over
    ``path``; on any failure the temporary file is removed and ``path`` is left as it was."""
    target = Path(os.path.expanduser(os.fspath(path)))
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0o666 lets the umask set the permissions, as for an ordinary new file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target


class _ClosingBar:
    """Adds ``with`` support to a bar that only has ``update`` and ``close``."""

    def __init__(self, bar) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __getattr__(self, name: str):
        return getattr(self._bar, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(total: int, desc: str = ""):
    """A progress bar over ``total`` steps with ``update(n=1)`` and ``close()``, usable as a
    context manager: ``tqdm.auto`` (a widget in Jupyter, text in a terminal) when tqdm is
    installed, otherwise a plain text bar on stderr. ``total=0``: an unknown number of steps
    (a counter, as for the adaptive solver)."""
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 0:
        raise ValueError(f"total must be a non-negative integer, got {total!r}")
    bar = progress_bar(int(total), desc=str(desc))
    return bar if hasattr(bar, "__enter__") else _ClosingBar(bar)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
