import numpy as np
import pytest
from scipy import ndimage

from cmunet.data.preprocess import (PreprocessConfig, fit_to_size, gaussian_blur,
                                    inpaint_border_regions, preprocess_image, preprocess_mask,
                                    smooth_mask, unsharp_mask)


@pytest.fixture
def textured():
    rng = np.random.default_rng(0)
    return (ndimage.gaussian_filter(rng.normal(size=(256, 256)), 2) * 300 + 120).astype(np.float32)


@pytest.mark.parametrize("sigma", [3, 12, 30, 60])
def test_fast_gaussian_matches_exact_filter(textured, sigma):
    exact = ndimage.gaussian_filter(textured, sigma, mode="nearest")
    assert np.abs(gaussian_blur(textured, sigma) - exact).max() < 0.5


def test_unsharp_mask_is_scikit_image_definition(textured):
    from skimage.filters import gaussian

    expected = textured + 1.0 * (textured - gaussian(textured, sigma=30, mode="nearest",
                                                     preserve_range=True))
    assert np.abs(unsharp_mask(textured, 30, 1.0) - expected).max() < 0.5


def test_fit_resizes_shorter_side_then_centre_crops():
    image = np.zeros((100, 200), np.float32)
    image[:, 100:] = 1
    out = fit_to_size(image, 50, "resize", order=1)
    assert out.shape == (50, 50)
    assert out[:, :20].mean() < 0.05 and out[:, -20:].mean() > 0.95  # centre of the scaled image


def test_fit_crop_pads_small_images_with_the_median():
    image = np.full((20, 40), 7.0, np.float32)
    out = fit_to_size(image, 32, "crop", order=1)
    assert out.shape == (32, 32) and (out == 7).all()


def test_dark_border_regions_are_filled_but_vessels_kept():
    image = np.full((128, 128), 150, np.float32)
    image[:, :10] = 5  # collimator shutter
    image[60:63, 10:] = 40  # a thin dark vessel that reaches the right edge
    out = inpaint_border_regions(image, 0.6)
    assert out[:, :10].min() > 100  # shutter replaced by its surroundings
    assert out[61, 60:].max() < 50  # the vessel survived


def test_collimator_region_equals_the_filter_definition():
    """The integral-image opening and the label lookup give exactly the region of the plain
    definition: 5x5 minimum then maximum filter, border-touching labels, 3 cross dilations."""
    from cmunet.data.preprocess import _box_count

    rng = np.random.default_rng(1)
    for seed in range(4):
        image = ndimage.gaussian_filter(rng.normal(size=(128, 120)), 1.5) * 300 + 150
        image[:, : 3 + seed * 4] *= 0.1  # a shutter of varying width
        dark = image < 0.6 * np.median(image[::4, ::4])
        opened = ndimage.maximum_filter(ndimage.minimum_filter(dark.view(np.uint8), 5), 5)
        assert np.array_equal(_box_count(_box_count(dark, 5) == 25, 5) > 0, opened.view(bool))
        noise = rng.random((40, 33)) < 0.5
        assert np.array_equal(_box_count(noise, 3) > 0, ndimage.maximum_filter(noise, 3))


def test_preprocess_keeps_dtype_and_size():
    rng = np.random.default_rng(1)
    image = rng.integers(1000, 3000, (300, 300)).astype(np.uint16)
    out = preprocess_image(image, PreprocessConfig(size=128))
    assert out.dtype == np.uint16 and out.shape == (128, 128) and out.max() > 255


def test_mask_smoothing_removes_specks_and_fills_holes():
    mask = np.zeros((512, 512), bool)
    mask[100:140, 100:300] = True
    mask[120, 200] = False  # a hole
    mask[400, 400] = True  # a speck
    out = smooth_mask(mask, 20, 20)
    assert out[120, 200] and not out[400, 400] and out[100:140, 100:300].all()
    fitted = preprocess_mask(mask, PreprocessConfig(size=256))
    assert fitted.shape == (256, 256) and fitted.dtype == bool and fitted[60, 100]
