"""Evaluation figures: TP/FP/FN overlays, Bland-Altman plots and reconstruction galleries.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas -- no pyplot, so no
window, no ``plt.show`` and no global figure state; safe in headless jobs and worker processes.
Every function that saves a figure writes a PNG atomically (to a temporary name in the target
folder, then renamed over the target, so a reader never sees a half-written file), creates the
folder if needed and returns the path.

The Bland-Altman plot follows J. M. Bland and D. G. Altman, "Statistical methods for assessing
agreement between two methods of clinical measurement", The Lancet 327(8476), 1986.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cmunet.evaluation.metrics import diameter_agreement, dice, validate_masks

PathLike = str | os.PathLike[str]
RGB = tuple[int, int, int]

#: Overlay colours (RGB): true positives, false positives, false negatives.
TP_COLOR: RGB = (255, 215, 0)  # gold
FP_COLOR: RGB = (220, 20, 60)  # crimson
FN_COLOR: RGB = (30, 144, 255)  # dodger blue
#: Opacity of the overlay colours over the grayscale image.
OVERLAY_ALPHA = 0.6

_DPI = 110


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: PathLike) -> Path:
    """Write ``figure`` to ``path`` as a PNG atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def to_gray_uint8(image: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """A 2-D image as 8-bit gray levels for display.

    ``uint8`` images are kept as they are, boolean images become 0/255 and any other numeric
    image is min-max scaled to 0..255 (a constant image becomes 0). Non-finite values are refused.
    """
    array = np.asarray(image)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"image must be a 2-D numeric array, got {array.dtype} {array.shape}")
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image has non-finite values")
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.rint(255.0 * scaled).astype(np.uint8)


def _finite_range(arrays: Sequence[np.ndarray]) -> tuple[float | None, float | None]:
    """Min and max of the finite values of all ``arrays`` (None, None if there are none)."""
    finite = [array[np.isfinite(array)] for array in arrays]
    finite = [values for values in finite if values.size]
    if not finite:
        return None, None
    return min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)


def _grid(
    count: int, ncols: int, panel_size: float, extra_height: float = 0.0
) -> tuple[Figure, npt.NDArray[Any]]:
    """A figure with ``count`` panels on ``ncols`` columns; unused panels are hidden."""
    if count == 0:
        raise ValueError("nothing to draw: no items")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    figure = _new_figure(panel_size * ncols, panel_size * nrows + extra_height)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, axes


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def overlay(
    image: npt.ArrayLike, pred: npt.ArrayLike, gt: npt.ArrayLike, alpha: float = OVERLAY_ALPHA
) -> npt.NDArray[np.uint8]:
    """An RGB ``(H, W, 3) uint8`` picture of a prediction against the ground truth.

    The image (see :func:`to_gray_uint8`) is shown in gray; true positives are blended with
    :data:`TP_COLOR`, false positives with :data:`FP_COLOR` and false negatives with
    :data:`FN_COLOR` at opacity ``alpha``: ``round((1 - alpha) * gray + alpha * colour)``.
    True negatives keep their gray level.
    """
    pred, gt = validate_masks(pred, gt)
    gray = to_gray_uint8(image)
    if gray.shape != pred.shape:
        raise ValueError(f"image shape {gray.shape} differs from the masks' {pred.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.repeat(gray[..., np.newaxis], 3, axis=2).astype(np.float64)
    for region, colour in ((pred & gt, TP_COLOR), (pred & ~gt, FP_COLOR), (~pred & gt, FN_COLOR)):
        rgb[region] = (1.0 - alpha) * rgb[region] + alpha * np.asarray(colour, dtype=np.float64)
    return np.rint(rgb).astype(np.uint8)


def _legend_handles() -> list[Patch]:
    return [
        Patch(color=np.asarray(colour) / 255.0, label=label)
        for colour, label in (
            (TP_COLOR, "true positive"),
            (FP_COLOR, "false positive"),
            (FN_COLOR, "false negative"),
        )
    ]


def save_overlays(
    items: Sequence[Mapping[str, Any]], path: PathLike, ncols: int = 4, panel_size: float = 3.0
) -> Path:
    """A grid of :func:`overlay` panels, each titled with its Dice, with a colour legend.

    Each item is a mapping with arrays ``image``, ``pred`` and ``gt`` and an optional ``title``
    (e.g. an image id), shown above its Dice. Panels fill ``ncols`` columns row by row.
    """
    figure, axes = _grid(len(items), ncols, panel_size, extra_height=0.5)
    for ax, item in zip(axes.flat, items):
        ax.imshow(overlay(item["image"], item["pred"], item["gt"]), interpolation="nearest")
        score = f"Dice {dice(item['pred'], item['gt']):.3f}"
        ax.set_title(f"{item['title']}\n{score}" if "title" in item else score, fontsize=9)
    figure.legend(handles=_legend_handles(), loc="outside lower center", ncol=3, fontsize=9)
    return _save_png(figure, path)


# --------------------------------------------------------------------------------------------
# Bland-Altman plot
# --------------------------------------------------------------------------------------------


def _draw_limits(ax: Axes, agreement: Mapping[str, Any], units: str) -> None:
    """Bias line and, when defined, the 95% limits of agreement, labelled in the legend."""
    ax.axhline(
        agreement["mean_diff"], color="black", linewidth=1.2,
        label=f"bias {agreement['mean_diff']:+.3f} {units}",
    )  # fmt: skip
    if agreement["loa"] is not None:
        low, high = agreement["loa"]
        for value, sign in ((high, "+"), (low, "-")):
            ax.axhline(
                value, color="tab:red", linestyle="--", linewidth=1.0,
                label=f"bias {sign} 1.96 SD = {value:+.3f} {units}",
            )  # fmt: skip


def bland_altman_plot(
    diam_gt: Sequence[float | None],
    diam_pred: Sequence[float | None],
    path: PathLike,
    units: str = "px",
    title: str | None = None,
) -> Path:
    """Bland-Altman plot of per-image mean diameters: (pred + gt) / 2 against pred - gt.

    Images where either diameter is None are left out (the title gives the number used, n, and
    the Pearson r from :func:`~cmunet.evaluation.metrics.diameter_agreement`). The bias line and
    the bias +/- 1.96 SD limits of agreement are drawn where defined (n >= 1, n >= 2).
    """
    agreement = diameter_agreement(diam_gt, diam_pred)
    pairs = np.array(
        [(g, p) for g, p in zip(diam_gt, diam_pred) if g is not None and p is not None],
        dtype=np.float64,
    ).reshape(-1, 2)
    figure = _new_figure(6.0, 4.5)
    ax = figure.add_subplot()
    ax.scatter(pairs.mean(axis=1), pairs[:, 1] - pairs[:, 0], s=18, alpha=0.8, color="tab:blue")
    if agreement["n"]:
        _draw_limits(ax, agreement, units)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no image with both diameters defined", transform=ax.transAxes,
                ha="center", va="center")  # fmt: skip
    r = agreement["pearson_r"]
    summary = f"n = {agreement['n']}, r = {'undefined' if r is None else f'{r:.3f}'}"
    ax.set_title(f"{title or 'Bland-Altman: mean vessel diameter'}\n{summary}", fontsize=10)
    ax.set_xlabel(f"mean of ground-truth and predicted diameter ({units})")
    ax.set_ylabel(f"predicted - ground-truth diameter ({units})")
    ax.grid(alpha=0.3)
    return _save_png(figure, path)


# --------------------------------------------------------------------------------------------
# Reconstruction gallery
# --------------------------------------------------------------------------------------------


def _gallery_columns(rows: Sequence[Mapping[str, npt.ArrayLike]]) -> list[str]:
    """Column names shared by all rows (in the first row's order); refuses mismatches."""
    if not rows:
        raise ValueError("nothing to draw: no rows")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if set(row) != set(columns):
            raise ValueError(f"row {index} has panels {sorted(row)}, expected {sorted(columns)}")
        for name, array in row.items():
            if np.ndim(array) != 2:
                raise ValueError(f"row {index}, {name!r}: not a 2-D array: {np.shape(array)}")
    return columns


def reconstruction_gallery(
    rows: Sequence[Mapping[str, npt.ArrayLike]],
    path: PathLike,
    title: str | None = None,
    panel_size: float = 2.5,
) -> Path:
    """One grid figure, a row per sample and a titled column per named 2-D array.

    Each row maps names to arrays, e.g. ``{"input": x, "masked input": xm, "reconstruction": y,
    "target": t}``; all rows must have the same names. The panels of a row share one gray scale
    (min to max of its finite values) so that intensities can be compared along the row.
    """
    columns = _gallery_columns(rows)
    figure, axes = _grid(len(rows) * len(columns), len(columns), panel_size)
    for row, row_axes in zip(rows, axes):
        arrays = [np.asarray(row[name], dtype=np.float64) for name in columns]
        vmin, vmax = _finite_range(arrays)
        for ax, array in zip(row_axes, arrays):
            ax.imshow(array, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    for ax, name in zip(axes[0], columns):
        ax.set_title(name, fontsize=10)
    if title:
        figure.suptitle(title)
    return _save_png(figure, path)


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------


def contact_sheet(
    images: Sequence[npt.ArrayLike],
    titles: Sequence[str],
    path: PathLike,
    ncols: int = 6,
    panel_size: float = 2.2,
) -> Path:
    """A grid of 2-D images, each titled (e.g. the frames picked for annotation, in pick order),
    each on its own gray scale (see :func:`to_gray_uint8`)."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    figure, axes = _grid(len(images), ncols, panel_size)
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(to_gray_uint8(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    return _save_png(figure, path)
