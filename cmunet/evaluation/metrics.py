"""Per-image segmentation metrics for coronary-artery masks, and their summary statistics.

All per-image functions take binary masks ``pred`` and ``gt``: 2-D ``bool`` arrays of the same
shape (anything else is refused with a ``ValueError``). Distances are in pixels unless a pixel
``spacing = (row_mm, col_mm)`` is given, in which case they are in millimetres; anisotropic
spacing is supported throughout. A value that is undefined for an image is ``None`` -- never
``inf`` or ``NaN`` -- and :func:`summarize` counts such values instead of averaging them.

Metrics and references
----------------------
* Dice, ``2TP / (2TP + FP + FN)`` -- L. R. Dice, "Measures of the amount of ecologic association
  between species", Ecology 26(3), 1945.
* IoU (Jaccard index), ``TP / (TP + FP + FN)`` -- P. Jaccard, "The distribution of the flora in
  the alpine zone", New Phytologist 11(2), 1912.
* clDice -- S. Shit et al., "clDice - a novel topology-preserving loss function for tubular
  structure segmentation", CVPR 2021. Skeletons come from ``skimage.morphology.skeletonize``
  (T. Y. Zhang and C. Y. Suen, "A fast parallel algorithm for thinning digital patterns",
  Communications of the ACM 27(3), 1984).
* Modified Hausdorff distance (MHD) -- M.-P. Dubuisson and A. K. Jain, "A modified Hausdorff
  distance for object matching", ICPR 1994.
* HD95, the 95th-percentile Hausdorff distance, as MONAI's ``compute_hausdorff_distance(...,
  percentile=95)``: the larger of the two directed 95th percentiles (pred -> gt and gt -> pred),
  each with linear interpolation (``np.percentile``'s default, as ``torch.quantile``). Some tools
  (medpy's ``hd95``) take the 95th percentile of both directions pooled instead; the two differ
  when one direction has a few far outliers (tests/test_metrics.py has such a case).
* Normalised surface Dice (NSD) at a tolerance tau -- S. Nikolov et al., "Clinically applicable
  segmentation of head and neck anatomy for radiotherapy", JMIR 2021; as MONAI's
  ``compute_surface_dice``: ``(|{a in A: d(a, B) <= tau}| + |{b in B: d(b, A) <= tau}|) /
  (|A| + |B|)`` over the boundary pixels ``A``, ``B`` (no sub-pixel surface areas).
* ADD, the artery diameter difference: the absolute difference between the mean skeleton
  diameters of the predicted and the ground-truth mask.
* Bland-Altman agreement -- J. M. Bland and D. G. Altman, "Statistical methods for assessing
  agreement between two methods of clinical measurement", The Lancet 327(8476), 1986.

Conventions
-----------
* Boundary (for the MHD, HD95 and NSD; MONAI's ``get_mask_edges``, a mask XOR its erosion by the
  4-neighbour cross): the mask pixels that have at least one 4-neighbour outside the mask;
  the resulting contour is one pixel thick and 8-connected. Outside the image counts as outside
  the mask, so a mask touching the image edge has a boundary along that edge.
* Contour (for diameters): the midpoints of the pixel edges that separate a mask pixel from a
  4-adjacent background pixel, i.e. the boundary *between* pixels. The image edge is not a vessel
  wall and contributes no contour points.
* Diameter at a skeleton pixel: 2 x the Euclidean distance from the pixel centre to the nearest
  contour point. A straight axis-aligned bar k pixels wide (k odd) has its skeleton on the middle
  column, k/2 from the pixel edges on either side, so its diameter is exactly k (equivalently
  ``2 * EDT - 1`` with the EDT to the nearest background pixel centre); a 1-pixel line has
  diameter 1. Known biases of this skeleton-based definition: an even-width bar reads k - 1 (a
  skeleton on pixel centres cannot lie on its midline); an oblique vessel reads about 0.5-1 px
  narrower than its nominal width, because the nearest point of a staircase contour is nearer than
  the ideal straight wall; skeleton points near vessel ends read narrower and points at branchings
  wider. Prediction and ground truth share these biases, so the ADD is much less affected than the
  diameters themselves.
* Empty masks: the distances (MHD, HD95) are 0.0 when both masks are empty and undefined (None)
  when exactly one is; the NSD is 1.0 when both are empty and 0.0 when exactly one is (no boundary
  pixel has a partner). MONAI gives NaN (both empty) or inf (one empty) for the distances and NaN
  for the NSD of two empty masks.
* Summary statistics: sample standard deviation (ddof = 1) and a two-sided 95% Student-t
  confidence interval of the mean; with a single defined value the standard deviation is 0.0 and
  the interval is ``None`` (a t interval needs at least 2 values).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

Mask = npt.NDArray[np.bool_]
Spacing = Sequence[float]

#: Metric keys that :func:`summarize` reports by default (those present in at least one row).
DEFAULT_KEYS: tuple[str, ...] = (
    "dice", "iou", "cldice", "hd", "hd_mm", "hd95", "hd95_mm", "nsd", "nsd_mm", "add", "add_mm",
    "diam_pred", "diam_gt", "diam_pred_mm", "diam_gt_mm",
)  # fmt: skip
#: Default NSD tolerances: 1 pixel, and 0.5 mm (about 1.5 pixels at 0.3 mm per pixel).
NSD_TOLERANCE_PX = 1.0
NSD_TOLERANCE_MM = 0.5

_CROSS = ndimage.generate_binary_structure(2, 1)
_UNIT_SAMPLING = (1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_mask(mask: npt.ArrayLike, name: str) -> Mask:
    """Return ``mask`` as an array after checking that it is a non-empty 2-D boolean array."""
    array = np.asarray(mask)
    if array.dtype != np.bool_:
        raise ValueError(
            f"{name} must be a boolean mask, got dtype {array.dtype}; "
            f"binarise it first (e.g. `{name} > 0.5`)"
        )
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (H, W) array, got shape {array.shape}")
    return array


def validate_masks(pred: npt.ArrayLike, gt: npt.ArrayLike) -> tuple[Mask, Mask]:
    """Return ``(pred, gt)`` as arrays after checking they are 2-D boolean masks of one shape.

    Raises a ValueError naming the problem (dtype, number of dimensions or shapes) otherwise.
    """
    pred_mask, gt_mask = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred and gt shapes differ: {pred_mask.shape} vs {gt_mask.shape}")
    return pred_mask, gt_mask


def _sampling(spacing: Spacing | None) -> tuple[float, float]:
    """Return the pixel spacing as ``(row, col)`` floats; ``None`` means 1 pixel per unit."""
    if spacing is None:
        return _UNIT_SAMPLING
    try:
        row, col = (float(value) for value in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a pair (row_mm, col_mm), got {spacing!r}") from None
    if not all(math.isfinite(value) and value > 0 for value in (row, col)):
        raise ValueError(f"spacing must be two positive finite numbers, got {spacing!r}")
    return row, col


# --------------------------------------------------------------------------------------------
# Overlap metrics
# --------------------------------------------------------------------------------------------


def _confusion(pred: Mask, gt: Mask) -> tuple[int, int, int]:
    """Return the pixel counts ``(TP, FP, FN)``."""
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def _dice_from(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def _iou_from(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def dice(pred: Mask, gt: Mask) -> float:
    """Dice coefficient ``2TP / (2TP + FP + FN)``; 1.0 when both masks are empty."""
    return _dice_from(*_confusion(*validate_masks(pred, gt)))


def iou(pred: Mask, gt: Mask) -> float:
    """Intersection over union ``TP / (TP + FP + FN)``; 1.0 when both masks are empty."""
    return _iou_from(*_confusion(*validate_masks(pred, gt)))


# --------------------------------------------------------------------------------------------
# clDice
# --------------------------------------------------------------------------------------------


def skeleton(mask: Mask) -> Mask:
    """Skeleton of a binary mask (Zhang-Suen thinning, ``skimage.morphology.skeletonize``).

    ``skeletonize`` keeps at least one pixel of every connected component, so the skeleton of a
    non-empty mask is never empty.
    """
    return skeletonize(_as_mask(mask, "mask"))


def _cldice_from(pred: Mask, gt: Mask, skel_pred: Mask, skel_gt: Mask) -> float:
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    t_prec = np.count_nonzero(skel_pred & gt) / np.count_nonzero(skel_pred)
    t_sens = np.count_nonzero(skel_gt & pred) / np.count_nonzero(skel_gt)
    if t_prec + t_sens == 0:
        return 0.0
    return float(2.0 * t_prec * t_sens / (t_prec + t_sens))


def cldice(pred: Mask, gt: Mask) -> float:
    """Centerline Dice (Shit et al. 2021): harmonic mean of topology precision and sensitivity.

    ``Tprec = |S(pred) & gt| / |S(pred)|`` and ``Tsens = |S(gt) & pred| / |S(gt)|`` with ``S`` the
    skeleton. Edge cases: both masks empty -> 1.0; exactly one empty -> 0.0; ``Tprec = Tsens = 0``
    (no skeleton pixel inside the other mask) -> 0.0. A non-empty mask always has a non-empty
    skeleton (see :func:`skeleton`), so the two ratios are always defined otherwise.
    """
    pred, gt = validate_masks(pred, gt)
    return _cldice_from(pred, gt, skeletonize(pred), skeletonize(gt))


# --------------------------------------------------------------------------------------------
# Boundary distances: MHD, HD95, NSD
# --------------------------------------------------------------------------------------------


def boundary(mask: Mask) -> Mask:
    """Mask pixels with at least one 4-neighbour outside the mask (outside the image counts)."""
    mask = _as_mask(mask, "mask")
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _distances_to(source: Mask, target: Mask, sampling: tuple[float, float]) -> np.ndarray:
    """For every ``source`` pixel (row-major), the distance to the nearest ``target`` pixel."""
    return ndimage.distance_transform_edt(~target, sampling=sampling)[source]


def surface_distances(
    pred: Mask, gt: Mask, spacing: Spacing | None = None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """The directed boundary distances ``(pred -> gt, gt -> pred)``: for every boundary pixel of
    one mask (:func:`boundary`), the distance to the nearest boundary pixel of the other, in
    pixels or mm. None when either mask is empty (a boundary without partner)."""
    pred, gt = validate_masks(pred, gt)
    return _surface_distances(boundary(pred), boundary(gt), _sampling(spacing))


def _surface_distances(pred_edge: Mask, gt_edge: Mask, sampling: tuple[float, float]):
    if not pred_edge.any() or not gt_edge.any():
        return None
    return _distances_to(pred_edge, gt_edge, sampling), _distances_to(gt_edge, pred_edge, sampling)


def _both_empty(pred_edge: Mask, gt_edge: Mask) -> bool:
    return not pred_edge.any() and not gt_edge.any()


def _mhd_of(distances, both_empty: bool) -> float | None:
    if distances is None:
        return 0.0 if both_empty else None
    return max(float(d.mean()) for d in distances)


def _hd95_of(distances, both_empty: bool) -> float | None:
    if distances is None:
        return 0.0 if both_empty else None
    return max(float(np.percentile(d, 95)) for d in distances)


def _nsd_of(distances, both_empty: bool, tolerance: float) -> float:
    if distances is None:
        return 1.0 if both_empty else 0.0
    close = sum(int(np.count_nonzero(d <= tolerance)) for d in distances)
    return close / sum(d.size for d in distances)


def _check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, numbers.Real) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return float(tolerance)


def modified_hausdorff(pred: Mask, gt: Mask, spacing: Spacing | None = None) -> float | None:
    """Modified Hausdorff distance (Dubuisson & Jain 1994) between the masks' boundaries.

    ``max(mean_{a in A} d(a, B), mean_{b in B} d(b, A))`` with ``A``, ``B`` the boundary pixels
    (see :func:`boundary`), computed with Euclidean distance transforms. In pixels, or in mm when
    ``spacing = (row_mm, col_mm)`` is given. Both masks empty -> 0.0; exactly one empty -> None
    (undefined).
    """
    pred, gt = validate_masks(pred, gt)
    pred_edge, gt_edge = boundary(pred), boundary(gt)
    return _mhd_of(_surface_distances(pred_edge, gt_edge, _sampling(spacing)),
                   _both_empty(pred_edge, gt_edge))


def hd95(pred: Mask, gt: Mask, spacing: Spacing | None = None) -> float | None:
    """95th-percentile Hausdorff distance as MONAI's ``compute_hausdorff_distance(percentile=95)``:
    the larger of the 95th percentiles of the directed distances pred -> gt and gt -> pred
    (:func:`surface_distances`). In pixels or mm. Both masks empty -> 0.0; one empty -> None."""
    pred, gt = validate_masks(pred, gt)
    pred_edge, gt_edge = boundary(pred), boundary(gt)
    return _hd95_of(_surface_distances(pred_edge, gt_edge, _sampling(spacing)),
                    _both_empty(pred_edge, gt_edge))


def normalized_surface_dice(
    pred: Mask, gt: Mask, tolerance: float = NSD_TOLERANCE_PX, spacing: Spacing | None = None
) -> float:
    """Normalised surface Dice as MONAI's ``compute_surface_dice``: the fraction of the boundary
    pixels of both masks that lie within ``tolerance`` (``<=``; pixels, or mm with ``spacing``) of
    the other mask's boundary. Both masks empty -> 1.0; exactly one empty -> 0.0."""
    tolerance = _check_tolerance(tolerance)
    pred, gt = validate_masks(pred, gt)
    pred_edge, gt_edge = boundary(pred), boundary(gt)
    return _nsd_of(_surface_distances(pred_edge, gt_edge, _sampling(spacing)),
                   _both_empty(pred_edge, gt_edge), tolerance)


# --------------------------------------------------------------------------------------------
# Diameters
# --------------------------------------------------------------------------------------------


def _contour_points(mask: Mask) -> npt.NDArray[np.float64]:
    """``(row, col)`` midpoints of the pixel edges between 4-adjacent mask and background pixels."""
    rows, cols = np.nonzero(mask[:, 1:] != mask[:, :-1])
    between_columns = np.column_stack([rows, cols + 0.5])
    rows, cols = np.nonzero(mask[1:, :] != mask[:-1, :])
    between_rows = np.column_stack([rows + 0.5, cols])
    return np.concatenate([between_columns, between_rows]).astype(np.float64)


def _diameters_from(
    mask: Mask, skel: Mask, sampling: tuple[float, float]
) -> npt.NDArray[np.float64] | None:
    """Diameters at the skeleton pixels; None if the mask is empty or has no contour at all."""
    contour = _contour_points(mask)
    if not skel.any() or len(contour) == 0:
        return None
    scale = np.asarray(sampling)
    distances, _ = cKDTree(contour * scale).query(np.argwhere(skel) * scale)
    return 2.0 * distances


def skeleton_diameters(
    mask: Mask, spacing: Spacing | None = None
) -> npt.NDArray[np.float64] | None:
    """Vessel diameter at every skeleton pixel (row-major order), in pixels or mm.

    The diameter is 2 x the distance from the skeleton pixel centre to the nearest contour point,
    the contour being the boundary between mask and background pixels (module docstring). None
    when the mask is empty, or when it covers the whole image (no wall to measure to).
    """
    mask = _as_mask(mask, "mask")
    return _diameters_from(mask, skeletonize(mask), _sampling(spacing))


def _mean_or_none(diameters: npt.NDArray[np.float64] | None) -> float | None:
    return None if diameters is None else float(diameters.mean())


def _stats_of(diameters: npt.NDArray[np.float64] | None) -> dict[str, float | int] | None:
    if diameters is None:
        return None
    return {
        "mean": float(diameters.mean()),
        "min": float(diameters.min()),
        "max": float(diameters.max()),
        "n_points": int(diameters.size),
    }


def diameter_stats(mask: Mask, spacing: Spacing | None = None) -> dict[str, float | int] | None:
    """Mean, min and max skeleton diameter and the number of skeleton points of one mask.

    Returns ``{"mean", "min", "max", "n_points"}`` (diameters in pixels, or mm with ``spacing``),
    or None when the diameter is undefined (see :func:`skeleton_diameters`).
    """
    return _stats_of(skeleton_diameters(mask, spacing))


def mean_diameter(mask: Mask, spacing: Spacing | None = None) -> float | None:
    """Mean skeleton diameter in pixels (or mm); None when undefined (see skeleton_diameters)."""
    return _mean_or_none(skeleton_diameters(mask, spacing))


def _abs_difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else abs(a - b)


def add(pred: Mask, gt: Mask, spacing: Spacing | None = None) -> float | None:
    """Artery diameter difference ``|mean_diameter(pred) - mean_diameter(gt)|``.

    In pixels, or mm with ``spacing``; None when either mean diameter is undefined (empty mask).
    """
    pred, gt = validate_masks(pred, gt)
    return _abs_difference(mean_diameter(pred, spacing), mean_diameter(gt, spacing))


# --------------------------------------------------------------------------------------------
# All metrics of one image
# --------------------------------------------------------------------------------------------


def _distance_metrics(
    pred: Mask,
    gt: Mask,
    skel_pred: Mask,
    skel_gt: Mask,
    sampling: tuple[float, float],
    tolerance: float,
) -> tuple[dict[str, float | None], Any]:
    """MHD, HD95, NSD at ``tolerance`` and both mean diameters at the given pixel sampling, and
    the boundary distances they came from (:func:`surface_distances`)."""
    pred_edge, gt_edge = boundary(pred), boundary(gt)
    distances = _surface_distances(pred_edge, gt_edge, sampling)
    both_empty = _both_empty(pred_edge, gt_edge)
    values = {
        "hd": _mhd_of(distances, both_empty),
        "hd95": _hd95_of(distances, both_empty),
        "nsd": _nsd_of(distances, both_empty, tolerance),
        "diam_pred": _mean_or_none(_diameters_from(pred, skel_pred, sampling)),
        "diam_gt": _mean_or_none(_diameters_from(gt, skel_gt, sampling)),
    }
    return values, distances


def image_metrics(
    pred: Mask,
    gt: Mask,
    spacing: Spacing | None = None,
    nsd_tolerance: float = NSD_TOLERANCE_PX,
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, float | None]:
    """All metrics of one image, each mask skeletonised once and each distance transform run once.

    Keys: ``dice, iou, cldice, hd (the MHD), hd95, nsd, add, diam_pred, diam_gt`` (distances in
    pixels, ``nsd`` at ``nsd_tolerance`` pixels) and, when ``spacing`` is given, ``hd_mm, hd95_mm,
    nsd_mm`` (at ``nsd_tolerance_mm``), ``add_mm, diam_pred_mm, diam_gt_mm``. Undefined values
    are None.
    """
    nsd_tolerance, nsd_tolerance_mm = map(_check_tolerance, (nsd_tolerance, nsd_tolerance_mm))
    pred, gt = validate_masks(pred, gt)
    sampling = None if spacing is None else _sampling(spacing)
    skel_pred, skel_gt = skeletonize(pred), skeletonize(gt)
    counts = _confusion(pred, gt)
    px, distances = _distance_metrics(pred, gt, skel_pred, skel_gt, _UNIT_SAMPLING, nsd_tolerance)
    row: dict[str, float | None] = {
        "dice": _dice_from(*counts),
        "iou": _iou_from(*counts),
        "cldice": _cldice_from(pred, gt, skel_pred, skel_gt),
        "hd": px["hd"],
        "hd95": px["hd95"],
        "nsd": px["nsd"],
        "add": _abs_difference(px["diam_pred"], px["diam_gt"]),
        "diam_pred": px["diam_pred"],
        "diam_gt": px["diam_gt"],
    }
    if sampling is not None:
        if sampling[0] == sampling[1]:  # isotropic: every distance is the pixel distance x spacing
            scale = sampling[0]
            mm = {k: None if v is None else v * scale for k, v in px.items() if k != "nsd"}
            scaled = None if distances is None else tuple(d * scale for d in distances)
            both_empty = not pred.any() and not gt.any()
            mm["nsd"] = _nsd_of(scaled, both_empty, nsd_tolerance_mm)
        else:
            mm, _ = _distance_metrics(pred, gt, skel_pred, skel_gt, sampling, nsd_tolerance_mm)
        row |= {
            "hd_mm": mm["hd"],
            "hd95_mm": mm["hd95"],
            "nsd_mm": mm["nsd"],
            "add_mm": _abs_difference(mm["diam_pred"], mm["diam_gt"]),
            "diam_pred_mm": mm["diam_pred"],
            "diam_gt_mm": mm["diam_gt"],
        }
    return row


# --------------------------------------------------------------------------------------------
# Summaries over images
# --------------------------------------------------------------------------------------------


def _is_finite_number(value: Any) -> bool:
    is_real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    return is_real and math.isfinite(value)


def _defined_values(values: Iterable[Any], name: str) -> tuple[npt.NDArray[np.float64], int]:
    """Split ``values`` into the finite numbers (as an array) and the count of Nones."""
    defined: list[float] = []
    n_undefined = 0
    for value in values:
        if value is None:
            n_undefined += 1
        elif not _is_finite_number(value):
            raise ValueError(f"{name}: {value!r} is not a finite number (use None for undefined)")
        else:
            defined.append(float(value))
    return np.asarray(defined, dtype=np.float64), n_undefined


def summarize_values(values: Iterable[float | None], name: str = "values") -> dict[str, Any]:
    """Mean, sample std (ddof=1), 95% t confidence interval of the mean, n and n_undefined.

    None values are undefined: counted in ``n_undefined`` and left out of the statistics.
    ``ci95`` is ``[mean - t * s / sqrt(n), mean + t * s / sqrt(n)]`` with ``t`` the 97.5% quantile
    of Student's t with ``n - 1`` degrees of freedom. n = 1: std 0.0 and ci95 None; n = 0: mean,
    std and ci95 None. Non-finite numbers are refused with a ValueError.
    """
    data, n_undefined = _defined_values(values, name)
    n = int(data.size)
    summary: dict[str, Any] = {
        "mean": None, "std": None, "ci95": None, "n": n, "n_undefined": n_undefined
    }
    if n == 0:
        return summary
    mean = float(data.mean())
    summary |= {"mean": mean, "std": 0.0}
    if n >= 2:
        std = float(data.std(ddof=1))
        half_width = float(stats.t.ppf(0.975, df=n - 1)) * std / np.sqrt(n)
        summary |= {"std": std, "ci95": [mean - half_width, mean + half_width]}
    return summary


def summarize(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-metric summary (:func:`summarize_values`) of per-image rows (:func:`image_metrics`).

    ``keys`` defaults to the :data:`DEFAULT_KEYS` present in at least one row; other entries of
    the rows (e.g. an image id) are ignored. A row without a requested key counts as undefined.
    """
    if keys is None:
        keys = [key for key in DEFAULT_KEYS if any(key in row for row in rows)]
    return {key: summarize_values((row.get(key) for row in rows), name=key) for key in keys}


def _pearson(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]
) -> tuple[float | None, float | None]:
    """Pearson r and two-sided p-value; (None, None) for n < 3 or a constant input."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def diameter_agreement(
    diam_gt: Sequence[float | None], diam_pred: Sequence[float | None]
) -> dict[str, Any]:
    """Agreement of per-image mean diameters: Pearson correlation and Bland-Altman statistics.

    Only images where both diameters are defined (not None) are used; ``n`` is their number.
    Returns ``pearson_r`` and ``p_value`` (two-sided, ``scipy.stats.pearsonr``; None when n < 3 or
    either input is constant), ``mean_diff`` (bias, mean of pred - gt), ``sd_diff`` (sample SD of
    the differences) and ``loa``, the 95% limits of agreement ``[mean_diff - 1.96 sd_diff,
    mean_diff + 1.96 sd_diff]``. n = 1: sd_diff 0.0 and loa None; n = 0: all None. Non-finite
    numbers are refused with a ValueError (None marks an undefined diameter).
    """
    if len(diam_gt) != len(diam_pred):
        raise ValueError(f"diam_gt and diam_pred lengths differ: {len(diam_gt)}, {len(diam_pred)}")
    pairs = [(g, p) for g, p in zip(diam_gt, diam_pred) if g is not None and p is not None]
    gt, _ = _defined_values((g for g, _ in pairs), "diam_gt")
    pred, _ = _defined_values((p for _, p in pairs), "diam_pred")
    r, p_value = _pearson(gt, pred)
    differences = summarize_values(pred - gt, name="pred - gt")
    mean_diff, sd_diff = differences["mean"], differences["std"]
    loa = None
    if len(pairs) >= 2:
        loa = [mean_diff - 1.96 * sd_diff, mean_diff + 1.96 * sd_diff]
    return {
        "n": len(pairs),
        "pearson_r": r,
        "p_value": p_value,
        "mean_diff": mean_diff,
        "sd_diff": sd_diff,
        "loa": loa,
    }


# --------------------------------------------------------------------------------------------
# Accumulation over a data set
# --------------------------------------------------------------------------------------------


class MetricAccumulator:
    """Collects :func:`image_metrics` rows image by image (MONAI-style update/aggregate/reset)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float | None]] = []

    def update(
        self, pred: Mask, gt: Mask, spacing: Spacing | None = None
    ) -> dict[str, float | None]:
        """Compute and store the metrics of one image; returns its row."""
        row = image_metrics(pred, gt, spacing)
        self.rows.append(row)
        return row

    def aggregate(self, keys: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Summary of the rows collected so far (:func:`summarize`)."""
        return summarize(self.rows, keys)

    def reset(self) -> None:
        """Forget the collected rows."""
        self.rows.clear()


def evaluate_masks(
    preds: Sequence[Mask],
    gts: Sequence[Mask],
    spacings: Sequence[Spacing | None] | None = None,
) -> tuple[list[dict[str, float | None]], dict[str, dict[str, Any]]]:
    """Metrics of every image pair and their summary: ``(rows, summarize(rows))``.

    ``spacings`` gives one spacing (or None) per image; None means pixels only for all images.
    """
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts lengths differ: {len(preds)} vs {len(gts)}")
    if spacings is None:
        spacings = [None] * len(preds)
    elif len(spacings) != len(preds):
        raise ValueError(f"spacings has {len(spacings)} entries for {len(preds)} images")
    accumulator = MetricAccumulator()
    for pred, gt, spacing in zip(preds, gts, spacings):
        accumulator.update(pred, gt, spacing)
    return accumulator.rows, accumulator.aggregate()
