"""Tests of cmunet.evaluation.figures: overlay colours and the PNG files written."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from cmunet.evaluation import figures as F

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_bytes: int = 5_000) -> np.ndarray:
    """The file is a PNG of non-trivial size that decodes; returns the decoded pixels."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > min_bytes
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert pixels[..., :3].std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away
    return pixels


def sample(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    gt[20:26, 5:60] = True
    pred = np.roll(gt, 2, axis=0)
    return {"image": rng.random(shape), "pred": pred, "gt": gt}


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------


def test_overlay_colours_at_tp_fp_fn_pixels():
    image = np.full((4, 4), 100, dtype=np.uint8)
    pred = np.zeros((4, 4), dtype=bool)
    gt = np.zeros((4, 4), dtype=bool)
    pred[0, 0] = gt[0, 0] = True  # true positive
    pred[1, 1] = True  # false positive
    gt[2, 2] = True  # false negative
    rgb = F.overlay(image, pred, gt, alpha=0.6)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8

    def blended(colour):
        return [round(0.4 * 100 + 0.6 * c) for c in colour]

    assert rgb[0, 0].tolist() == blended(F.TP_COLOR)
    assert rgb[1, 1].tolist() == blended(F.FP_COLOR)
    assert rgb[2, 2].tolist() == blended(F.FN_COLOR)
    assert rgb[3, 3].tolist() == [100, 100, 100]  # true negative keeps its gray level
    assert len({tuple(rgb[0, 0]), tuple(rgb[1, 1]), tuple(rgb[2, 2])}) == 3


def test_overlay_default_colours_are_distinct_hues():
    # TP gold (red + green), FP crimson (red), FN blue: the dominant channels differ.
    assert np.argmax(F.FP_COLOR) == 0 and np.argmax(F.FN_COLOR) == 2
    assert min(F.TP_COLOR[:2]) > 200 and F.TP_COLOR[2] < 50


def test_overlay_scales_float_images_to_gray():
    image = np.array([[0.0, 0.5], [1.0, 0.25]])
    masks = np.zeros((2, 2), dtype=bool)
    rgb = F.overlay(image, masks, masks)
    assert rgb[..., 0].tolist() == [[0, 128], [255, 64]]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize(
    "image, pred, message",
    [
        (np.zeros((4, 5)), np.zeros((4, 4), dtype=bool), "image shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), "boolean"),
        (np.full((4, 4), np.nan), np.zeros((4, 4), dtype=bool), "non-finite"),
    ],
)
def test_overlay_refuses_bad_inputs(image, pred, message):
    with pytest.raises(ValueError, match=message):
        F.overlay(image, pred, np.zeros((4, 4), dtype=bool))


# ---------------------------------------------------------------------------------------------
# Saved figures
# ---------------------------------------------------------------------------------------------


def test_save_overlays_writes_a_png_grid(tmp_path: Path):
    items = [sample(seed) | {"title": f"case {seed}"} for seed in range(3)] + [sample(3)]
    path = F.save_overlays(items, tmp_path / "figures" / "overlays.png", ncols=3)
    assert path == tmp_path / "figures" / "overlays.png"
    pixels = assert_valid_png(path)
    assert pixels.shape[1] > pixels.shape[0]  # 3 columns, 2 rows of square panels
    with pytest.raises(ValueError, match="no items"):
        F.save_overlays([], tmp_path / "empty.png")


def test_save_overlays_replaces_an_existing_file(tmp_path: Path):
    path = tmp_path / "overlays.png"
    path.write_bytes(b"old")
    F.save_overlays([sample()], path)
    assert_valid_png(path)


def test_bland_altman_plot(tmp_path: Path):
    gt = [2.0, 3.1, None, 4.0, 5.2, 6.0]
    pred = [2.3, 3.0, 4.4, None, 5.6, 6.5]
    path = F.bland_altman_plot(gt, pred, tmp_path / "bland_altman.png", units="mm")
    assert_valid_png(path)


@pytest.mark.parametrize("gt, pred", [([None], [1.0]), ([2.0], [2.5]), ([3.0, 3.0], [3.0, 3.0])])
def test_bland_altman_plot_with_few_images(tmp_path: Path, gt, pred):
    assert_valid_png(F.bland_altman_plot(gt, pred, tmp_path / "few.png"))


def test_reconstruction_gallery(tmp_path: Path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):
        target = rng.random((32, 32))
        masked = target.copy()
        masked[8:16, 8:24] = 0.0
        rows.append({"input": target, "masked input": masked, "reconstruction": target * 0.9,
                     "target": target})  # fmt: skip
    pixels = assert_valid_png(F.reconstruction_gallery(rows, tmp_path / "gallery.png", title="x"))
    assert pixels.shape[1] > pixels.shape[0]  # 4 columns, 2 rows


def test_reconstruction_gallery_refuses_mismatched_rows(tmp_path: Path):
    image = np.zeros((8, 8))
    with pytest.raises(ValueError, match="row 1"):
        F.reconstruction_gallery([{"a": image, "b": image}, {"a": image}], tmp_path / "g.png")
    with pytest.raises(ValueError, match="2-D"):
        F.reconstruction_gallery([{"a": np.zeros((2, 8, 8))}], tmp_path / "g.png")
    assert not list(tmp_path.iterdir())
