"""Tests of cmunet.evaluation.metrics on hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from cmunet.evaluation import metrics as M

# 97.5% quantile of Student's t with 3 degrees of freedom, from a printed t table.
T_975_DF3 = 3.182446305


def empty(shape: tuple[int, int] = (64, 96)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def hline(row: int, c0: int, c1: int, shape: tuple[int, int] = (64, 96)) -> np.ndarray:
    """A 1-pixel-wide horizontal line on ``row`` covering columns ``c0 .. c1 - 1``."""
    mask = empty(shape)
    mask[row, c0:c1] = True
    return mask


def disc(
    centre: tuple[float, float], radius: float, shape: tuple[int, int] = (128, 128)
) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def hbar(width: int, shape: tuple[int, int] = (48, 120), c0: int = 10, c1: int = 110) -> np.ndarray:
    """A horizontal bar ``width`` rows thick spanning columns ``c0 .. c1 - 1``."""
    mask = empty(shape)
    mask[10 : 10 + width, c0:c1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Overlap metrics and the MHD on lines and squares
# ---------------------------------------------------------------------------------------------


def test_line_against_itself_is_perfect():
    line = hline(20, 10, 50)
    row = M.image_metrics(line, line)
    assert (row["dice"], row["iou"], row["cldice"], row["hd"]) == (1.0, 1.0, 1.0, 0.0)
    assert row["diam_pred"] == row["diam_gt"] == 1.0  # a 1-pixel line is 1 pixel wide
    assert row["add"] == 0.0


def test_line_shifted_across_itself():
    # No overlap at all; every boundary pixel is exactly 3 rows from the other line.
    row = M.image_metrics(hline(23, 10, 50), hline(20, 10, 50))
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["cldice"] == 0.0
    assert row["hd"] == pytest.approx(3.0, abs=1e-12)


def test_line_shifted_along_itself():
    # 40-pixel lines shifted by s = 4 columns: overlap 36. The 4 pixels of each line outside
    # the other are 1, 2, 3, 4 pixels from its end, so each directed mean is 10 / 40.
    pred, gt = hline(20, 14, 54), hline(20, 10, 50)
    assert M.dice(pred, gt) == pytest.approx(2 * 36 / 80)
    assert M.iou(pred, gt) == pytest.approx(36 / 44)
    assert M.modified_hausdorff(pred, gt) == pytest.approx(10 / 40)
    assert M.cldice(pred, gt) == pytest.approx(36 / 40)  # Tprec = Tsens = 36/40


def test_two_squares_with_known_overlap():
    a, b = empty((40, 40)), empty((40, 40))
    a[10:20, 10:20] = True  # 100 pixels
    b[15:25, 15:25] = True  # 100 pixels, 25 shared
    assert M.dice(a, b) == pytest.approx(50 / 200)  # 2TP / (2TP + FP + FN) = 1/4
    assert M.iou(a, b) == pytest.approx(25 / 175)  # 1/7


# ---------------------------------------------------------------------------------------------
# Modified Hausdorff distance
# ---------------------------------------------------------------------------------------------


def continuous_mhd_of_shifted_circles(radius: float, shift: float) -> float:
    """MHD of two circles of equal radius whose centres are ``shift`` apart.

    A point at angle t on one circle is |R - sqrt(R^2 + k^2 - 2Rk cos t)| from the other
    circle; both directed means are equal by symmetry and are integrated numerically
    (about 2k/pi for k << R).
    """
    t = np.linspace(0.0, 2 * np.pi, 100_000, endpoint=False)
    distance_to_centre = np.sqrt(radius**2 + shift**2 - 2 * radius * shift * np.cos(t))
    return float(np.mean(np.abs(radius - distance_to_centre)))


def test_disc_against_itself():
    a = disc((64, 60), 30)
    assert M.modified_hausdorff(a, a) == 0.0
    assert M.dice(a, a) == 1.0


@pytest.mark.parametrize("shift", [2, 4, 8])
def test_disc_shifted_by_k_matches_the_continuous_circles(shift: int):
    # The digital circle is made of straight pixel runs; where a run overlaps the shifted copy
    # of itself its distance is 0 while the ideal distance k|cos t| is small but not zero, so
    # the digital MHD is a few percent (3-6% for R = 30, k = 2..8) below the continuous value:
    # an 8% relative tolerance.
    a, b = disc((64, 50), 30), disc((64, 50 + shift), 30)
    expected = continuous_mhd_of_shifted_circles(30, shift)
    assert M.modified_hausdorff(a, b) == pytest.approx(expected, rel=0.08)
    # The MHD averages the distances: well below the shift (the classical Hausdorff distance).
    assert M.modified_hausdorff(a, b) < 0.7 * shift


def brute_force_mhd(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> float:
    points_a = np.argwhere(M.boundary(a)) * spacing
    points_b = np.argwhere(M.boundary(b)) * spacing
    distances = cdist(points_a, points_b)
    return max(distances.min(axis=1).mean(), distances.min(axis=0).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mhd_equals_pairwise_definition_on_random_blobs(seed: int):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random((48, 40)), 3) > 0.5
    b = ndimage.gaussian_filter(rng.random((48, 40)), 3) > 0.5
    assert a.any() and b.any()
    for spacing in [(1.0, 1.0), (0.3, 0.7)]:
        assert M.modified_hausdorff(a, b, spacing) == pytest.approx(brute_force_mhd(a, b, spacing))


def test_boundary_uses_4_neighbours_and_the_image_edge():
    square = empty((7, 7))
    square[1:6, 1:6] = True
    expected = square.copy()
    expected[2:5, 2:5] = False  # interior pixels have all 4 neighbours inside
    assert np.array_equal(M.boundary(square), expected)
    rows, cols = np.mgrid[:7, :7]
    diamond = np.abs(rows - 3) + np.abs(cols - 3) <= 2
    # The pixels 1 step from the centre have all 4 neighbours inside (but not all 8).
    assert np.array_equal(M.boundary(diamond), np.abs(rows - 3) + np.abs(cols - 3) == 2)
    full = np.ones((4, 5), dtype=bool)
    assert M.boundary(full).sum() == 4 * 5 - 2 * 3  # outside the image counts as outside


def test_anisotropic_spacing_scales_each_axis():
    spacing = (0.5, 2.0)  # mm per row, mm per column
    shifted_rows = (hline(23, 10, 50), hline(20, 10, 50))
    shifted_cols = (hline(23, 10, 50).T, hline(20, 10, 50).T)
    assert M.modified_hausdorff(*shifted_rows) == pytest.approx(3.0)
    assert M.modified_hausdorff(*shifted_cols) == pytest.approx(3.0)
    assert M.modified_hausdorff(*shifted_rows, spacing=spacing) == pytest.approx(1.5)
    assert M.modified_hausdorff(*shifted_cols, spacing=spacing) == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------
# Diameters and ADD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [3, 5, 7, 9])
def test_bar_diameter_is_its_width(width: int):
    diameters = M.skeleton_diameters(hbar(width))
    # Along the middle row the skeleton is width/2 from the pixel edges on either side ...
    assert np.median(diameters) == pytest.approx(width) and diameters.max() == pytest.approx(width)
    # ... and a few points where the skeleton turns into the bar's corners read narrower.
    assert M.mean_diameter(hbar(width)) == pytest.approx(width, abs=0.5)
    assert M.mean_diameter(hbar(width)) < width


def test_even_width_bar_reads_one_pixel_less():
    # Documented bias: a skeleton on pixel centres cannot lie on the midline of an even bar.
    assert np.median(M.skeleton_diameters(hbar(4))) == pytest.approx(3.0)


@pytest.mark.parametrize("width", [3, 5, 7, 9])
def test_ring_diameter_close_to_its_width(width: int):
    # An annulus is a closed tube without ends, in every orientation. Its staircase contour is
    # nearer to the skeleton than the ideal circles, so it reads up to 1 px narrower (see the
    # module docstring).
    rows, cols = np.mgrid[:128, :128]
    ring = np.abs(np.hypot(rows - 64, cols - 64) - 40) <= width / 2
    assert width - 1.0 <= M.mean_diameter(ring) <= width


def test_add_between_bars_of_width_5_and_9():
    assert M.add(hbar(5), hbar(9)) == pytest.approx(4.0, abs=0.1)
    assert M.add(hbar(9), hbar(5)) == M.add(hbar(5), hbar(9))


def test_diameters_in_mm_with_anisotropic_spacing():
    spacing = (0.4, 0.1)  # mm per row, mm per column
    horizontal, vertical = hbar(5), hbar(5).T
    # Across a horizontal bar the diameter is measured along rows, across a vertical one along
    # columns (medians: the corner points of the skeleton are left out).
    assert np.median(M.skeleton_diameters(horizontal, spacing)) == pytest.approx(5 * 0.4)
    assert np.median(M.skeleton_diameters(vertical, spacing)) == pytest.approx(5 * 0.1)
    # Vertical bars are long in mm (rows are 0.4 mm) and thin (columns are 0.1 mm).
    assert M.add(hbar(5).T, hbar(9).T, spacing) == pytest.approx(4 * 0.1, abs=0.02)


def test_skeleton_diameters_one_per_skeleton_pixel():
    mask = hbar(5)
    diameters = M.skeleton_diameters(mask)
    assert diameters.shape == (M.skeleton(mask).sum(),)


def test_diameter_undefined_without_mask_or_wall():
    assert M.mean_diameter(empty()) is None
    assert M.diameter_stats(empty()) is None
    assert M.mean_diameter(np.ones((8, 8), dtype=bool)) is None  # no background: no wall


# ---------------------------------------------------------------------------------------------
# clDice
# ---------------------------------------------------------------------------------------------


def test_cldice_of_thin_line_and_dilated_copy_is_one():
    line = hline(10, 5, 35, shape=(20, 40))
    # 4-neighbour dilation: rounded ends, whose skeleton is the line itself. (A 3x3 square
    # dilation leaves a one-pixel corner spur in the Zhang-Suen skeleton.)
    thick = ndimage.binary_dilation(line, ndimage.generate_binary_structure(2, 1))
    assert thick.sum() == 3 * 30 + 2
    assert M.cldice(line, thick) == 1.0 and M.cldice(thick, line) == 1.0
    assert M.dice(line, thick) == pytest.approx(60 / 122)  # Dice does penalise the thickness


def test_cldice_of_half_a_line():
    pred, gt = hline(20, 10, 50), hline(20, 10, 90)
    # Tprec = 40/40 (the whole predicted line lies in gt); Tsens = 40/80.
    assert M.cldice(pred, gt) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_cldice_of_disjoint_masks_is_zero():
    assert M.cldice(hline(10, 5, 30), hline(40, 5, 30)) == 0.0


# ---------------------------------------------------------------------------------------------
# HD95 and NSD (MONAI's definitions) on hand-computed cases
# ---------------------------------------------------------------------------------------------


def square(r0: int, c0: int, side: int = 10, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    mask = empty(shape)
    mask[r0 : r0 + side, c0 : c0 + side] = True
    return mask


def test_square_shifted_by_three_columns():
    # Boundaries: 36 pixels each. pred -> gt: the 14 pixels of pred's top and bottom rows over
    # gt's are 0 away, the other 6 are 1, 2, 3 (twice); pred's left column (rows 11..18, inside
    # gt) is 1, 2, 3, 3, 3, 3, 2, 1 from gt's top, bottom or left side; its right column is 3 from
    # gt's right side (8 x 3). So 14 x 0, 4 x 1, 4 x 2, 14 x 3, and the same gt -> pred (mirror).
    gt, pred = square(10, 10), square(10, 13)
    directed = sorted([0] * 14 + [1] * 4 + [2] * 4 + [3] * 14)
    d_pg, d_gp = M.surface_distances(pred, gt)
    assert sorted(d_pg) == directed and sorted(d_gp) == directed
    assert M.modified_hausdorff(pred, gt) == pytest.approx(54 / 36)
    assert M.hd95(pred, gt) == 3.0  # the 95th percentile (sorted index 33.25) lies among the 3s
    assert M.normalized_surface_dice(pred, gt, 0.0) == pytest.approx(28 / 72)
    assert M.normalized_surface_dice(pred, gt, 1.0) == pytest.approx(36 / 72)
    assert M.normalized_surface_dice(pred, gt, 2.0) == pytest.approx(44 / 72)
    assert M.normalized_surface_dice(pred, gt, 3.0) == 1.0
    # in mm, rows 0.5 mm apart and columns 0.2 mm: the row ends are 0.2, 0.4, 0.6 away, the left
    # column min(0.5 x rows to gt's top or bottom, 0.6) = 0.5, 0.6 x 6, 0.5; the right one 0.6
    assert M.hd95(pred, gt, spacing=(0.5, 0.2)) == pytest.approx(3 * 0.2)
    assert M.normalized_surface_dice(pred, gt, 0.55, spacing=(0.5, 0.2)) == pytest.approx(40 / 72)


def test_hd95_is_the_larger_directed_percentile_as_in_monai():
    gt = square(10, 10)
    # a 4-pixel bar 10 columns right of gt's right side: pred -> gt has 36 zeros and 4 tens
    pred = gt.copy()
    pred[12:16, 29] = True
    # directed pred -> gt: 40 values, the 95th percentile at sorted index 37.05 -> 10;
    # gt -> pred: all 0. MONAI takes the larger: 10. (Pooled, as medpy, it would be
    # 0.25 x 10 = 2.5: 80 values, index 75.05 between the last zero and the first ten.)
    assert M.hd95(pred, gt) == 10.0
    pooled = np.percentile(np.concatenate(M.surface_distances(pred, gt)), 95)
    assert pooled == pytest.approx(2.5)
    assert M.normalized_surface_dice(pred, gt, 1.0) == pytest.approx(72 / 76)
    # one speck instead: 37 values, index 34.2 among the zeros -> HD95 0 while the MHD moves
    speck = gt.copy()
    speck[14, 29] = True
    assert M.hd95(speck, gt) == 0.0 and M.modified_hausdorff(speck, gt) == pytest.approx(10 / 37)


def test_disc_with_a_far_speck_against_brute_force():
    gt = disc((40, 40), 15, shape=(80, 100))
    pred = disc((42, 41), 13, shape=(80, 100))
    pred[5, 95] = True  # a speck far from both
    for spacing in (None, (0.3, 0.3), (0.2, 0.35)):
        scale = np.asarray(spacing or (1.0, 1.0))
        a, b = np.argwhere(M.boundary(pred)) * scale, np.argwhere(M.boundary(gt)) * scale
        pairwise = cdist(a, b)
        d_pg, d_gp = pairwise.min(axis=1), pairwise.min(axis=0)
        expected = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
        assert M.hd95(pred, gt, spacing) == pytest.approx(expected)
        assert M.hd95(pred, gt, spacing) < pairwise.min(axis=1).max() / 3  # the speck is ignored
        for tolerance in (0.5, 1.0, 2.5):
            close = (d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()
            assert M.normalized_surface_dice(pred, gt, tolerance, spacing) == pytest.approx(
                close / (len(a) + len(b)))
        row = M.image_metrics(pred, gt, spacing, nsd_tolerance=1.0, nsd_tolerance_mm=1.0)
        assert row["hd95"] == pytest.approx(M.hd95(pred, gt))
        if spacing is not None:
            assert row["hd95_mm"] == pytest.approx(expected)
            assert row["nsd_mm"] == pytest.approx(
                ((d_pg <= 1.0).sum() + (d_gp <= 1.0).sum()) / (len(a) + len(b)))


def test_nsd_tolerance_is_checked():
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        M.normalized_surface_dice(square(1, 1), square(2, 2), -1.0)
    with pytest.raises(ValueError, match="tolerance"):
        M.image_metrics(square(1, 1), square(2, 2), nsd_tolerance=float("nan"))


# ---------------------------------------------------------------------------------------------
# Empty masks
# ---------------------------------------------------------------------------------------------


def test_empty_prediction():
    row = M.image_metrics(empty(), hbar(5, shape=(64, 96), c1=90), spacing=(0.3, 0.3))
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["cldice"] == 0.0
    assert row["hd"] is None and row["hd_mm"] is None
    assert row["hd95"] is None and row["hd95_mm"] is None  # undefined: no boundary to measure to
    assert row["nsd"] == 0.0 and row["nsd_mm"] == 0.0  # no boundary pixel has a partner
    assert row["add"] is None and row["add_mm"] is None
    assert row["diam_pred"] is None and row["diam_gt"] > 0


def test_empty_ground_truth():
    row = M.image_metrics(hbar(5, shape=(64, 96), c1=90), empty())
    assert row["dice"] == 0.0 and row["iou"] == 0.0 and row["cldice"] == 0.0
    assert row["hd"] is None and row["add"] is None and row["diam_gt"] is None
    assert row["hd95"] is None and row["nsd"] == 0.0
    assert "hd_mm" not in row and "hd95_mm" not in row and "nsd_mm" not in row


def test_both_empty():
    row = M.image_metrics(empty(), empty())
    assert (row["dice"], row["iou"], row["cldice"], row["hd"]) == (1.0, 1.0, 1.0, 0.0)
    assert (row["hd95"], row["nsd"]) == (0.0, 1.0)  # as MHD and Dice: perfect agreement
    assert row["add"] is None and row["diam_pred"] is None and row["diam_gt"] is None


# ---------------------------------------------------------------------------------------------
# image_metrics and input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(0.25, 0.25), (0.2, 0.35)])
def test_image_metrics_in_mm_match_the_single_metrics(spacing: tuple[float, float]):
    pred, gt = disc((60, 62), 20), disc((64, 64), 24)
    row = M.image_metrics(pred, gt, spacing)
    assert set(row) == {
        "dice", "iou", "cldice", "hd", "hd95", "nsd", "add", "diam_pred", "diam_gt",
        "hd_mm", "hd95_mm", "nsd_mm", "add_mm", "diam_pred_mm", "diam_gt_mm",
    }  # fmt: skip
    assert row["hd"] == pytest.approx(M.modified_hausdorff(pred, gt))
    assert row["hd_mm"] == pytest.approx(M.modified_hausdorff(pred, gt, spacing))
    assert row["hd95"] == pytest.approx(M.hd95(pred, gt))
    assert row["hd95_mm"] == pytest.approx(M.hd95(pred, gt, spacing))
    assert row["nsd"] == M.normalized_surface_dice(pred, gt, M.NSD_TOLERANCE_PX)
    assert row["nsd_mm"] == M.normalized_surface_dice(pred, gt, M.NSD_TOLERANCE_MM, spacing)
    assert row["add_mm"] == pytest.approx(M.add(pred, gt, spacing))
    assert row["diam_gt_mm"] == pytest.approx(M.mean_diameter(gt, spacing))
    assert row["cldice"] == pytest.approx(M.cldice(pred, gt))


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.zeros((8, 8)), empty((8, 8)), "boolean"),
        (empty((8, 8)), np.zeros((8, 8), dtype=np.uint8), "boolean"),
        (np.zeros((2, 8, 8), dtype=bool), np.zeros((2, 8, 8), dtype=bool), "2-D"),
        (empty((8, 8)), empty((8, 9)), "shapes differ"),
    ],
)
def test_invalid_masks_are_refused(pred, gt, message):
    with pytest.raises(ValueError, match=message):
        M.image_metrics(pred, gt)


@pytest.mark.parametrize("spacing", [0.5, (0.5,), (0.5, -1.0), (0.5, float("nan")), ("a", "b")])
def test_invalid_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match="spacing"):
        M.modified_hausdorff(empty(), empty(), spacing)


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def test_summarize_skips_and_counts_undefined_values():
    rows = [
        {"image": "a", "dice": 0.5, "hd": 1.0},
        {"image": "b", "dice": 0.7, "hd": None},
        {"image": "c", "dice": 0.9, "hd": 3.0},
    ]
    summary = M.summarize(rows)
    assert set(summary) == {"dice", "hd"}  # only metric keys present in the rows
    assert summary["hd"]["n"] == 2 and summary["hd"]["n_undefined"] == 1
    assert summary["hd"]["mean"] == pytest.approx(2.0)
    assert summary["hd"]["std"] == pytest.approx(math.sqrt(2.0))  # sample std of 1 and 3
    assert summary["dice"]["n_undefined"] == 0 and summary["dice"]["mean"] == pytest.approx(0.7)


def test_summarize_ci_matches_the_t_formula():
    rows = [{"add": value} for value in (1.0, 2.0, 3.0, 4.0)]
    stats = M.summarize(rows, keys=["add"])["add"]
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # ddof = 1
    half_width = T_975_DF3 * std / math.sqrt(4)
    assert stats["std"] == pytest.approx(std)
    assert stats["ci95"] == pytest.approx([2.5 - half_width, 2.5 + half_width])


def test_summarize_one_and_zero_defined_values():
    stats = M.summarize([{"hd": 2.0}, {"hd": None}], keys=["hd"])["hd"]
    assert stats == {"mean": 2.0, "std": 0.0, "ci95": None, "n": 1, "n_undefined": 1}
    stats = M.summarize([{"hd": None}, {}], keys=["hd"])["hd"]  # a missing key is undefined
    assert stats == {"mean": None, "std": None, "ci95": None, "n": 0, "n_undefined": 2}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "0.5"])
def test_summarize_refuses_non_numbers(bad):
    with pytest.raises(ValueError, match="dice"):
        M.summarize([{"dice": 0.5}, {"dice": bad}])


# ---------------------------------------------------------------------------------------------
# Diameter agreement
# ---------------------------------------------------------------------------------------------


def test_pearson_r_is_one_for_linearly_related_diameters():
    gt = [2.0, 3.0, 4.5, 5.0, 7.0]
    agreement = M.diameter_agreement(gt, [1.5 * g + 0.2 for g in gt])
    assert agreement["pearson_r"] == pytest.approx(1.0)
    assert agreement["p_value"] < 1e-6
    assert agreement["n"] == 5


def test_bland_altman_of_a_constant_offset():
    gt = [2.0, 3.0, None, 4.5, 5.0]
    pred = [2.5, 3.5, 9.0, 5.0, None]
    agreement = M.diameter_agreement(gt, pred)
    assert agreement["n"] == 3  # only images where both diameters are defined
    assert agreement["mean_diff"] == pytest.approx(0.5)
    assert agreement["sd_diff"] == pytest.approx(0.0, abs=1e-12)
    assert agreement["loa"] == pytest.approx([0.5, 0.5])


def test_bland_altman_limits_by_hand():
    agreement = M.diameter_agreement([1.0, 1.0, 1.0, 5.0], [2.0, 3.0, 4.0, 8.0])
    # differences 1, 2, 3, 3: mean 2.25, sample SD sqrt(2.75 / 3)
    sd = math.sqrt(((1.25**2) + (0.25**2) + 2 * (0.75**2)) / 3)
    assert agreement["mean_diff"] == pytest.approx(2.25)
    assert agreement["sd_diff"] == pytest.approx(sd)
    assert agreement["loa"] == pytest.approx([2.25 - 1.96 * sd, 2.25 + 1.96 * sd])


def test_agreement_with_too_few_or_constant_diameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning or division warnings either
        two = M.diameter_agreement([1.0, 2.0], [1.5, 2.5])
        constant = M.diameter_agreement([3.0, 3.0, 3.0], [2.0, 3.0, 4.0])
        one = M.diameter_agreement([3.0, None], [2.0, 1.0])
        none = M.diameter_agreement([None], [1.0])
    assert two["pearson_r"] is None and two["p_value"] is None and two["loa"] is not None
    assert constant["pearson_r"] is None and constant["mean_diff"] == pytest.approx(0.0)
    assert one == {
        "n": 1, "pearson_r": None, "p_value": None, "mean_diff": -1.0, "sd_diff": 0.0, "loa": None
    }
    assert none["n"] == 0 and none["mean_diff"] is None and none["loa"] is None
    with pytest.raises(ValueError, match="lengths differ"):
        M.diameter_agreement([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Evaluation over a data set
# ---------------------------------------------------------------------------------------------


def test_evaluate_masks_and_accumulator():
    preds = [hline(20, 10, 50), empty()]
    gts = [hline(20, 10, 50), hline(20, 10, 50)]
    rows, summary = M.evaluate_masks(preds, gts, spacings=[(0.5, 0.5), None])
    assert [row["dice"] for row in rows] == [1.0, 0.0]
    assert summary["hd"] == {"mean": 0.0, "std": 0.0, "ci95": None, "n": 1, "n_undefined": 1}
    assert summary["hd_mm"]["n"] == 1 and summary["hd_mm"]["n_undefined"] == 1  # missing in row 2
    assert summary["dice"]["mean"] == pytest.approx(0.5)

    accumulator = M.MetricAccumulator()
    for pred, gt in zip(preds, gts):
        accumulator.update(pred, gt)
    assert accumulator.aggregate(["dice"])["dice"]["n"] == 2
    accumulator.reset()
    assert accumulator.rows == []
    with pytest.raises(ValueError, match="spacings"):
        M.evaluate_masks(preds, gts, spacings=[None])
