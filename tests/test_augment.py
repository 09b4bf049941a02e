"""Fine-tuning augmentations: the mask follows the image exactly and stays binary."""

from __future__ import annotations

import numpy as np
import pytest

from cmunet.config import ConfigError, load_config
from cmunet.data.augment import Augment, AugmentConfig, affine, flip_and_rot90

GEOMETRY_ONLY = AugmentConfig(p_flip=1.0, p_rot90=1.0, p_rotate=1.0, max_angle=30.0, p_crop=1.0,
                              min_crop=0.5, p_intensity=0.0, p_blur=0.0, p_noise=0.0)
EVERYTHING = AugmentConfig(p_flip=1.0, p_rot90=1.0, p_rotate=1.0, max_angle=30.0, p_crop=1.0,
                           min_crop=0.5, p_intensity=1.0, p_blur=1.0, p_noise=1.0)


def vessel_mask(shape=(64, 64), seed=0) -> np.ndarray:
    """An asymmetric mask: a thick diagonal band and a blob in one corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    band = np.abs(yy - 0.7 * xx - rng.integers(0, 10)) <= 3
    blob = (yy - 10) ** 2 + (xx - shape[1] + 12) ** 2 <= 25
    return band | blob


@pytest.mark.parametrize("shape", [(64, 64), (48, 64)])
@pytest.mark.parametrize("seed", range(8))
def test_mask_stays_aligned_with_an_image_equal_to_it(shape, seed):
    mask = vessel_mask(shape, seed)
    image, out_mask = Augment(GEOMETRY_ONLY)(mask.astype(np.float32), mask,
                                              np.random.default_rng(seed))
    assert image.shape == out_mask.shape == shape and image.dtype == np.float32
    assert out_mask.dtype == np.bool_
    assert np.array_equal(image >= 0.5, out_mask)
    assert not np.array_equal(out_mask, mask)  # something did move


@pytest.mark.parametrize("seed", range(4))
def test_intensity_steps_change_the_image_only(seed):
    mask = vessel_mask(seed=seed)
    image = np.random.default_rng(seed).standard_normal(mask.shape).astype(np.float32)
    _, geometric = Augment(GEOMETRY_ONLY)(image, mask, np.random.default_rng(seed))
    out, full = Augment(EVERYTHING)(image, mask, np.random.default_rng(seed))
    assert np.array_equal(full, geometric)  # same geometric draws, same mask
    assert full.dtype == np.bool_ and out.shape == (64, 64) and np.isfinite(out).all()


def test_same_rng_same_result_and_mask_may_be_absent():
    image = vessel_mask().astype(np.float32)
    a, _ = Augment(EVERYTHING)(image, None, np.random.default_rng(3))
    b, _ = Augment(EVERYTHING)(image, None, np.random.default_rng(3))
    c, _ = Augment(EVERYTHING)(image, None, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rot90_and_flips_are_exact_array_operations():
    mask = vessel_mask()
    rotations = [np.rot90(mask, k) for k in (1, 2, 3)]
    for seed in range(6):
        _, out = flip_and_rot90(mask.astype(np.float32), mask, np.random.default_rng(seed),
                                p_flip=0.0, p_rot90=1.0)
        assert any(np.array_equal(out, r) for r in rotations)
    _, flipped = flip_and_rot90(mask, mask, np.random.default_rng(0), p_flip=1.0, p_rot90=0.0)
    assert np.array_equal(flipped, mask[::-1, ::-1])


def test_affine_crop_of_a_ramp_is_exact():
    # out(r, c) = input(centre + shift + scale * ((r, c) - centre)); bilinear is exact on a ramp
    rows = np.repeat(np.arange(64, dtype=np.float32)[:, None], 64, axis=1)
    centre, scale, shift = 31.5, 0.5, np.array([4.0, -2.0])
    out, _ = affine(rows, None, angle=0.0, scale=scale, shift=shift)
    expected = centre + shift[0] + scale * (np.arange(64) - centre)
    assert np.allclose(out[:, 10], expected, atol=1e-4)
    assert np.allclose(out, out[:, :1])  # columns untouched


def test_affine_by_90_degrees_equals_rot90():
    image = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    out, _ = affine(image, None, angle=90.0, scale=1.0, shift=np.zeros(2))
    assert np.allclose(out, np.rot90(image, -1), atol=1e-4)


def test_affine_matches_scipy_mirror_resampling():
    """grid_sample with reflected borders = scipy's affine_transform(order=1, mode="mirror"),
    on a non-square image with rotation, crop and shift (borders reached included)."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.standard_normal((48, 40)), 2).astype(np.float32)
    mask = image > 0.1
    for angle, scale, shift in ((12.0, 0.8, np.array([3.0, -2.5])), (-15.0, 1.0, np.zeros(2))):
        out, warped = affine(image, mask, angle, scale, shift)
        centre = (np.asarray(image.shape) - 1) / 2
        theta = np.deg2rad(angle)
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        warp = dict(matrix=rotation * scale, order=1, mode="mirror",
                    offset=centre + rotation @ shift - rotation * scale @ centre)
        assert np.allclose(out, ndimage.affine_transform(image, **warp), atol=1e-4)
        reference = ndimage.affine_transform(mask.astype(np.float32), **warp)
        decided = np.abs(reference - 0.5) > 1e-3  # away from exact ties at the threshold
        assert np.array_equal(warped[decided], (reference >= 0.5)[decided])


def test_probabilities_are_validated(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("p_noise: 1.5\n")
    with pytest.raises(ConfigError, match="p_noise"):
        load_config(AugmentConfig, path)
