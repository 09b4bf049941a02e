"""Preprocessing applied once, when shards are built (the paper's pipeline, each step switchable).

Order, as in the paper: mask smoothing, fit to a fixed size, corner inpainting, unsharp masking.
The dataset-level z-score is applied later, when samples are loaded (see ``cmunet.data.stream``).

Images keep their storage type (uint8 or uint16) so that shards stay lossless and small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from cmunet.config import check


@dataclass
class PreprocessConfig:
    size: int = 0  # output side in pixels (square); 0 = the first image's shorter side
    # resize: scale the shorter side to `size`, then centre-crop/pad; crop: centre-crop/pad only.
    fit: Literal["resize", "crop"] = "resize"
    inpaint_corners: bool = True  # fill dark collimator regions that touch the image border
    corner_threshold: float = 0.6  # "dark" = below this fraction of the image median
    unsharp: bool = True
    unsharp_radius: float = 60.0  # Gaussian sigma in pixels at 512 px, scaled with `size`
    unsharp_amount: float = 1.0  # the paper's value; its public code used 3
    smooth_masks: bool = True
    min_object_px: int = 20  # remove mask specks smaller than this (at 512 px, scaled by area)
    max_hole_px: int = 20  # fill mask holes smaller than this (at 512 px, scaled by area)

    def __post_init__(self) -> None:
        check(self.size == 0 or self.size >= 16, "size", "must be 0 (native) or at least 16")
        check(0 < self.corner_threshold < 1, "corner_threshold", "must be in (0, 1)")
        check(self.unsharp_radius > 0, "unsharp_radius", "must be positive")
        check(self.unsharp_amount >= 0, "unsharp_amount", "must be >= 0")
        check(self.min_object_px >= 0 and self.max_hole_px >= 0, "min_object_px",
              "and max_hole_px must be >= 0")


def preprocess_image(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Fit, inpaint and sharpen one image; returns the same dtype at ``cfg.size``²."""
    dtype = pixels.dtype
    top = float(np.iinfo(dtype).max)
    image = fit_to_size(pixels.astype(np.float32), cfg.size, cfg.fit, order=1)
    scale = cfg.size / 512
    if cfg.inpaint_corners:
        image = inpaint_border_regions(image, cfg.corner_threshold)
    if cfg.unsharp and cfg.unsharp_amount > 0:
        image = unsharp_mask(image, cfg.unsharp_radius * scale, cfg.unsharp_amount)
    return np.clip(np.rint(image), 0, top).astype(dtype)


def preprocess_mask(mask: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Smooth (optional) and fit a bool mask exactly as its image was fitted."""
    if cfg.smooth_masks:
        mask = smooth_mask(mask, cfg.min_object_px, cfg.max_hole_px)
    scale = cfg.size / min(mask.shape) if cfg.fit == "resize" else 1.0
    if scale != 1.0:
        mask = fit_to_size(mask.astype(np.float32), cfg.size, cfg.fit, order=1) >= 0.5
    else:
        mask = fit_to_size(mask, cfg.size, cfg.fit, order=0)
    return mask.astype(bool)


def fit_to_size(image: np.ndarray, size: int, fit: str, order: int) -> np.ndarray:
    """Scale (``fit="resize"``) the shorter side to ``size``, then centre-crop or pad to a square.

    Padding uses the image median, a neutral gray for X-ray images (masks pad with background).
    """
    if fit == "resize" and min(image.shape) != size:
        scale = size / min(image.shape)
        shape = tuple(max(size, round(s * scale)) for s in image.shape)
        image = resize(image, shape, order=order, anti_aliasing=scale < 1 and order > 0,
                       preserve_range=True).astype(image.dtype)
    out = image
    for axis in (0, 1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = out.take(np.arange(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0), (0, 0)]
            pad[axis] = (before, size - n - before)
            fill = 0 if out.dtype == bool else np.median(out)
            out = np.pad(out, pad, constant_values=fill)
    return out


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter with edge replication, fast for large sigma.

    For sigma above 8 px the image is block-averaged by a factor ``sigma / 4``, filtered, and
    interpolated back. The result differs from the exact filter by far less than one gray level
    (see the tests against scikit-image), at a small fraction of the cost of a 480-tap kernel.
    """
    factor = int(sigma // 4) if sigma > 8 else 1
    if factor <= 1:
        return ndimage.gaussian_filter(image, sigma, mode="nearest")
    h, w = image.shape
    # replicate the edges at full resolution over the kernel's reach, as mode="nearest" does
    margin = -(-int(4 * sigma) // factor) * factor
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.pad(image, ((margin, margin + hp - h), (margin, margin + wp - w)), mode="edge")
    rows, cols = padded.shape[0] // factor, padded.shape[1] // factor
    small = padded.reshape(rows, factor, -1).sum(1).reshape(rows, cols, factor).sum(2)
    small /= factor * factor
    # a box of width f has variance (f^2 - 1)/12 at full resolution; remove it from the target.
    rest = np.sqrt(max(sigma**2 - (factor**2 - 1) / 12, 0.0)) / factor
    small = ndimage.gaussian_filter(small, rest, mode="nearest")
    out = _upsample_axis(small, h, margin, factor, axis=0)
    return _upsample_axis(out, w, margin, factor, axis=1).astype(image.dtype)


def _upsample_axis(small: np.ndarray, n: int, margin: int, factor: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` from block centres, which sit at full-resolution
    coordinates (i + 0.5) * factor - 0.5 - margin, back to ``n`` pixels."""
    m = small.shape[axis]
    position = np.clip((np.arange(n) + margin + 0.5) / factor - 0.5, 0, m - 1)
    low = np.minimum(np.floor(position).astype(int), m - 2)
    frac = (position - low).astype(small.dtype)
    shape = (-1, 1) if axis == 0 else (1, -1)
    return (small.take(low, axis=axis) * (1 - frac.reshape(shape))
            + small.take(low + 1, axis=axis) * frac.reshape(shape))


def unsharp_mask(image: np.ndarray, radius: float, amount: float) -> np.ndarray:
    """``image + amount * (image - gaussian(image, radius))`` (scikit-image's definition)."""
    return image + amount * (image - gaussian_blur(image, radius))


def inpaint_border_regions(image: np.ndarray, threshold: float) -> np.ndarray:
    """Fill dark collimator regions (shutters, rounded corners) from their surroundings.

    A pixel is dark when it is below ``threshold`` x the image median. Dark areas that survive a
    5x5 opening (so thin vessels that reach the edge are kept) and touch the image border are
    treated as collimator and replaced by a normalised Gaussian average of the valid pixels
    around them.
    """
    dark = image < threshold * np.median(image[::4, ::4])
    if not (dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any()):
        return image  # nothing dark touches the border
    dark = _box_count(_box_count(dark, 5) == 25, 5) > 0  # 5x5 opening
    labels, count = ndimage.label(dark)
    if count == 0:
        return image
    touching = np.zeros(count + 1, dtype=bool)
    touching[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    touching[0] = False
    if not touching.any():
        return image
    region = ndimage.binary_dilation(touching[labels], iterations=3)
    valid = (~region).astype(np.float32)
    if valid.sum() < 0.1 * valid.size:
        return image  # nothing sensible to fill from
    filled = image.copy()
    missing = region
    sigma = max(image.shape) / 32
    while missing.any():
        weight = gaussian_blur(valid, sigma)
        estimate = gaussian_blur(image * valid, sigma) / np.maximum(weight, 1e-6)
        usable = missing & (weight > 1e-3)
        filled[usable] = estimate[usable]
        missing = missing & ~usable
        sigma *= 2
    return filled


def _box_count(mask: np.ndarray, size: int) -> np.ndarray:
    """How many pixels of each ``size`` x ``size`` neighbourhood are set (borders mirrored as
    scipy's ``mode="reflect"``), from an integral image: a binary erosion is ``== size**2``,
    a dilation ``> 0``, each in a few array passes whatever the size."""
    r = size // 2
    padded = np.pad(mask.astype(np.int32), r, mode="symmetric")
    total = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    np.cumsum(np.cumsum(padded, 0), 1, out=total[1:, 1:])
    h, w = mask.shape
    return (total[size:size + h, size:size + w] - total[:h, size:size + w]
            - total[size:size + h, :w] + total[:h, :w])


def smooth_mask(mask: np.ndarray, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Remove specks, fill small holes and close 1-pixel gaps of a bool mask."""
    area = mask.size / 512**2
    out = ndimage.binary_closing(mask, structure=ndimage.generate_binary_structure(2, 1))
    out |= mask  # closing must not erode at the border
    out = _drop_small(out, max(1, round(min_object_px * area)))
    holes = _drop_small(~out, max(1, round(max_hole_px * area)), keep_border=True)
    return ~holes


def _drop_small(mask: np.ndarray, min_px: int, keep_border: bool = False) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    if keep_border:  # background touching the border is never a hole
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            keep[edge] = True
        keep[0] = False
    return keep[labels]
