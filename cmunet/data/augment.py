"""Fine-tuning augmentations: numpy transforms applied to an image and its mask together.

:class:`Augment` is a :data:`~cmunet.data.stream.Transform`: ``(image, mask, rng) -> (image,
mask)`` with ``image`` a float32 (H, W) z-scored angiogram and ``mask`` a bool (H, W) vessel mask
(or None). Every random draw comes from ``rng``, so a sample's augmentation is reproducible from
the data set's seed, epoch and index. The output has the input's shape (crops are resized back), so
a side divisible by 16 stays divisible by 16.

Geometric steps move image and mask with the same coordinates: flips and 90-degree rotations are
exact array operations; a small-angle rotation and a random crop are composed into one affine map,
sampled bilinearly for the image and, for the mask, bilinearly then thresholded at 0.5 (so a mask
equal to its image stays equal to the thresholded image, and stays binary). Borders reached by a
rotation are filled by reflection, in the image and the mask alike. Intensity steps (brightness and
contrast, Gaussian blur, Gaussian noise, cutout) change the image only. Cutout (off by default; the
strong view of semi-supervised fine-tuning uses it) sets a random rectangle to 0, the z-scored mean.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cmunet.config import check


@dataclass
class AugmentConfig:
    """Probabilities (``p_*``) and strengths of the fine-tuning augmentations."""

    enabled: bool = True
    p_flip: float = 0.5  # probability of a horizontal flip, and (independently) of a vertical one
    p_rot90: float = 0.5  # probability of a rotation by 90, 180 or 270 degrees
    p_rotate: float = 0.3  # probability of a small-angle rotation ...
    max_angle: float = 15.0  # ... by up to this many degrees either way
    p_crop: float = 0.3  # probability of a random crop, resized back to the full size ...
    min_crop: float = 0.7  # ... whose side is at least this fraction of the image side
    p_intensity: float = 0.5  # probability of a brightness and contrast change ...
    brightness: float = 0.2  # ... adding up to +-this (z-score units) ...
    contrast: float = 0.2  # ... and scaling by 1 +- up to this
    p_blur: float = 0.2  # probability of a Gaussian blur ...
    max_blur_sigma: float = 1.0  # ... with sigma drawn in [0.25, this] pixels
    p_noise: float = 0.3  # probability of additive Gaussian noise ...
    max_noise_std: float = 0.1  # ... with std drawn in [0, this] (z-score units)
    p_cutout: float = 0.0  # probability of a cutout: a rectangle set to 0 (the z-scored mean) ...
    max_cutout: float = 0.5  # ... whose sides are drawn in [0, this] x the image sides

    def __post_init__(self):
        for f in fields(self):
            if f.name.startswith("p_"):
                value = getattr(self, f.name)
                check(0.0 <= value <= 1.0, f.name, f"= {value} must be a probability in [0, 1]")
        check(0.0 <= self.max_angle <= 180.0, "max_angle", "must be in [0, 180] degrees")
        check(0.0 < self.min_crop <= 1.0, "min_crop", "must be in (0, 1]")
        check(0.0 <= self.contrast < 1.0, "contrast", "must be in [0, 1)")
        check(self.brightness >= 0, "brightness", "must be >= 0")
        check(self.max_blur_sigma >= 0.25, "max_blur_sigma", "must be >= 0.25 pixels")
        check(self.max_noise_std >= 0, "max_noise_std", "must be >= 0")
        check(0.0 < self.max_cutout <= 1.0, "max_cutout", "must be in (0, 1]")


class Augment:
    """The augmentation pipeline of an :class:`AugmentConfig` (picklable for DataLoader workers)."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, image: np.ndarray, mask: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        c = self.cfg
        image, mask = flip_and_rot90(image, mask, rng, c.p_flip, c.p_rot90)
        angle = rng.uniform(-c.max_angle, c.max_angle) if rng.random() < c.p_rotate else 0.0
        scale = rng.uniform(c.min_crop, 1.0) if rng.random() < c.p_crop else 1.0
        if angle or scale != 1.0:
            image, mask = affine(image, mask, angle, scale, crop_shift(image.shape, scale, rng))
        if rng.random() < c.p_intensity:
            gain = rng.uniform(1 - c.contrast, 1 + c.contrast)
            image = image * gain  # a new array (the input may be a cached sample) ...
            image += rng.uniform(-c.brightness, c.brightness)  # ... then in place
        if rng.random() < c.p_blur:
            image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.25, c.max_blur_sigma))
        if rng.random() < c.p_noise:
            std = np.float32(rng.uniform(0.0, c.max_noise_std))
            noise = gaussian_noise(image.shape, rng)
            noise *= std
            noise += image
            image = noise
        if c.p_cutout and rng.random() < c.p_cutout:  # no draw when off: runs stay as they were
            image = cutout(image, rng, c.max_cutout)
        return image.astype(np.float32, copy=False), mask


def gaussian_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard normal float32 noise, drawn by torch from a seed taken from ``rng`` (so still
    reproducible): 2.6x faster than numpy's generator at 512² on one core."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    return torch.randn(shape, generator=gen).numpy()


def cutout(image: np.ndarray, rng: np.random.Generator, max_side: float) -> np.ndarray:
    """A copy of ``image`` with a rectangle at a random place, its sides drawn in [0, ``max_side``]
    x the image sides, set to 0."""
    sides = np.round(rng.uniform(0.0, max_side, 2) * image.shape).astype(int)
    top, left = (int(rng.integers(0, n - side + 1)) for n, side in zip(image.shape, sides))
    out = image.copy()
    out[top:top + sides[0], left:left + sides[1]] = 0.0
    return out


def make_augment(cfg: AugmentConfig) -> Augment | None:
    """The transform for training data, or None when augmentation is switched off."""
    return Augment(cfg) if cfg.enabled else None


def flip_and_rot90(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                   p_flip: float, p_rot90: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Random horizontal/vertical flips and a rotation by a multiple of 90 degrees (exact).

    Non-square images are only rotated by 180 degrees, so that the shape is kept.
    """
    arrays = [image] if mask is None else [image, mask]
    for axis in (1, 0):
        if rng.random() < p_flip:
            arrays = [np.flip(a, axis) for a in arrays]
    if rng.random() < p_rot90:
        k = int(rng.integers(1, 4)) if image.shape[0] == image.shape[1] else 2
        arrays = [np.rot90(a, k) for a in arrays]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    return arrays[0], (None if mask is None else arrays[1])


def crop_shift(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random offset (rows, cols) of a crop of side ``scale`` x the image side, kept inside it."""
    room = (1.0 - scale) * (np.asarray(shape[:2], dtype=np.float64) - 1)
    return rng.uniform(-room / 2, room / 2)


def affine(image: np.ndarray, mask: np.ndarray | None, angle: float, scale: float,
           shift: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate by ``angle`` degrees about the centre, then take the crop of relative side ``scale``
    centred at centre + ``shift`` and resize it back to the full size, in one resampling.

    Output pixel o (row, col) samples the input at ``matrix @ o + offset``, bilinearly, with
    borders mirrored about the edge pixels (scipy's ``mode="mirror"``); image and mask go through
    one ``grid_sample`` call (4-5x faster than two scipy ``affine_transform`` calls)."""
    centre = (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rotation * scale  # output pixel -> input pixel
    offset = centre + rotation @ shift - matrix @ centre
    # the same map in grid_sample's coordinates: (x, y) = (col, row), each side spanning [-1, 1]
    half = centre  # (rows - 1) / 2, (cols - 1) / 2: normalised = pixel / half - 1
    linear = matrix * half[None, :] / half[:, None]
    translation = (matrix @ half + offset) / half - 1
    swap = [1, 0]
    grid_map = np.concatenate([linear[swap][:, swap], translation[swap, None]], axis=1)
    planes = [image.astype(np.float32, copy=False)]
    if mask is not None:
        planes.append(mask.astype(np.float32))
    stack = torch.from_numpy(np.stack(planes))[None]
    grid = F.affine_grid(torch.tensor(grid_map, dtype=torch.float32)[None], list(stack.shape),
                         align_corners=True)
    out = F.grid_sample(stack, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=True)[0].numpy()
    return out[0], (None if mask is None else out[1] >= 0.5)
