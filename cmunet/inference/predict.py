"""Vessel masks of images of any size, predicted at the model's training scale.

:func:`segment` runs these steps on a list of images (uint8 or uint16, each in its own geometry):

1. :func:`to_model_scale` -- the training preprocessing, without its crop: the storage type of
   the training images (:func:`to_storage_type`), the rescaling of ``fit=resize`` (shorter side to
   the training size; ``fit=crop`` keeps the native scale), corner inpainting and unsharp masking
   with the stored parameters, rounding to the storage type, then the dataset z-score. A square
   image whose shorter side is the training size comes out exactly as
   :func:`~cmunet.data.preprocess.preprocess_image` made the training images (tested).
2. :func:`predict_probabilities` -- the vessel probability (softmax of the 2-class head) at the
   model's scale, in one of two modes:

   * ``resize``: the whole image in one pass, reflect-padded (centred) to sides that are multiples
     of 16;
   * ``window``: windows of the training size, ``overlap`` apart (0.5 = half a window), each
     weighted by a Gaussian (sigma = size / 8, as in nnU-Net) so that window borders, where the
     network sees least context, count least; the weighted probabilities are averaged.

   With ``tta`` every batch is also predicted flipped left-right, up-down and both ways; the four
   probability maps are flipped back and averaged. Batches of ``batch_size`` inputs (whole images
   or windows of equal shape) run under ``torch.no_grad`` and bf16 autocast where supported.
3. :func:`to_original` -- bilinear interpolation of the probabilities back to the original size,
   the threshold, then :func:`remove_small_components` at the original resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from skimage.transform import resize

from cmunet.config import check
from cmunet.data.preprocess import inpaint_border_regions, unsharp_mask
from cmunet.inference.model import InferenceModel, Preprocessing
from cmunet.training.precision import autocast

Mode = Literal["resize", "window"]
MODES: tuple[Mode, ...] = ("resize", "window")
#: Flips of test-time augmentation, as tensor dims of (..., H, W): none, left-right, up-down, both.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

Window = tuple[slice, slice]


@dataclass(frozen=True)
class SegmentOptions:
    mode: Mode = "resize"
    tta: bool = False  # average over the four flips
    threshold: float = 0.5  # vessel where the probability is above it
    min_component: int = 0  # drop 8-connected vessel components with fewer pixels (original size)
    batch_size: int = 8  # network inputs per forward pass
    overlap: float = 0.5  # window mode: overlap of neighbouring windows, as a fraction of a window

    def __post_init__(self) -> None:
        check(self.mode in MODES, "mode", f"= {self.mode!r} must be one of {', '.join(MODES)}")
        check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
        check(self.min_component >= 0, "min_component", "must be >= 0")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(0.0 <= self.overlap < 1.0, "overlap", "must be in [0, 1)")


def segment(model: InferenceModel, images: Sequence[np.ndarray],
            options: SegmentOptions) -> list[np.ndarray]:
    """Bool vessel masks of ``images`` (uint8/uint16, any sizes), each at its image's size."""
    return [to_mask(p, options) for p in vessel_probabilities(model, images, options)]


def vessel_probabilities(model: InferenceModel, images: Sequence[np.ndarray],
                         options: SegmentOptions) -> list[np.ndarray]:
    """Float32 vessel probabilities of ``images`` (steps 1 and 2, then the bilinear
    interpolation of step 3), each at its image's size."""
    scaled = [to_model_scale(image, model.preprocessing) for image in images]
    probabilities = predict_probabilities(model, scaled, options)
    return [to_original(probability, image.shape).astype(np.float32)
            for image, probability in zip(images, probabilities)]


def to_mask(probability: np.ndarray, options: SegmentOptions) -> np.ndarray:
    """The bool mask of a probability map at the original size: threshold, small components."""
    return remove_small_components(probability > options.threshold, options.min_component)


# ---- 1. preprocessing --------------------------------------------------------------------------

def model_scale_shape(shape: tuple[int, ...], prep: Preprocessing) -> tuple[int, int]:
    """An image's shape at the model's pixel scale: with ``fit=resize``, scaled as
    :func:`~cmunet.data.preprocess.fit_to_size` scales (shorter side = training size), uncropped."""
    rows, cols = shape
    if prep.preprocess.fit != "resize":
        return rows, cols
    factor = prep.size / min(rows, cols)
    return max(prep.size, round(rows * factor)), max(prep.size, round(cols * factor))


def bits_used(pixels: np.ndarray) -> int:
    """The smallest of 8, 10, 12, 14 and 16 bits that holds the image's largest value."""
    top = int(pixels.max())
    return next(bits for bits in (8, 10, 12, 14, 16) if top < 1 << bits)


def to_storage_type(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """``pixels`` in the model's storage type. An image of another type is scaled from the range of
    its :func:`bits_used` to the full range of ``dtype`` (12-bit DICOM to uint8: x 255 / 4095)."""
    if pixels.dtype == dtype:
        return pixels
    factor = np.iinfo(dtype).max / ((1 << bits_used(pixels)) - 1)
    return np.rint(pixels * factor).astype(dtype)


def storage_note(pixels: np.ndarray, prep: Preprocessing) -> str:
    """What :func:`to_storage_type` did to an image, for the user ("" when nothing)."""
    if pixels.dtype == prep.dtype:
        return ""
    return f"{bits_used(pixels)}-bit image rescaled to the model's {prep.dtype} range"


def to_model_scale(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The z-scored float32 network input of one image, at :func:`model_scale_shape`."""
    cfg = prep.preprocess
    dtype = np.dtype(prep.dtype)
    image = to_storage_type(pixels, prep.dtype).astype(np.float32)
    shape = model_scale_shape(image.shape, prep)
    if shape != image.shape:  # the same call as fit_to_size's
        image = resize(image, shape, order=1, anti_aliasing=shape[0] < image.shape[0],
                       preserve_range=True).astype(np.float32)
    if cfg.inpaint_corners:
        image = inpaint_border_regions(image, cfg.corner_threshold)
    if cfg.unsharp and cfg.unsharp_amount > 0:
        image = unsharp_mask(image, cfg.unsharp_radius * cfg.size / 512, cfg.unsharp_amount)
    stored = np.clip(np.rint(image), 0, np.iinfo(dtype).max)  # as the training shards stored it
    return ((stored - prep.mean) / prep.std).astype(np.float32)


# ---- 2. prediction -----------------------------------------------------------------------------

def pad_centred(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, Window]:
    """``image`` reflect-padded about its centre to ``shape`` (no smaller than the image), and
    where the image lies in the result."""
    before = [(n - s) // 2 for n, s in zip(shape, image.shape)]
    widths = [(b, n - s - b) for b, n, s in zip(before, shape, image.shape)]
    inner = (slice(before[0], before[0] + image.shape[0]),
             slice(before[1], before[1] + image.shape[1]))
    return np.pad(image, widths, mode="reflect"), inner


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows covering ``length`` (>= ``window``), evenly spread from 0 to
    ``length - window``, neighbours at most ``window * (1 - overlap)`` apart."""
    step = max(1, math.floor(window * (1.0 - overlap)))
    count = math.ceil((length - window) / step) + 1
    return sorted({round(s) for s in np.linspace(0, length - window, count)})


def gaussian_weights(size: int) -> np.ndarray:
    """(size, size) Gaussian importance map, sigma = size / 8, peak 1, floored at 1e-3."""
    centre, sigma = (size - 1) / 2, size / 8
    profile = np.exp(-((np.arange(size) - centre) ** 2) / (2 * sigma**2))
    profile /= profile.max()
    return np.maximum(np.outer(profile, profile), 1e-3).astype(np.float32)


@dataclass
class _Canvas:
    """One image's padded network input and its accumulated, weighted probabilities."""

    image: np.ndarray
    inner: Window  # where the unpadded image lies
    windows: list[Window]
    weights: np.ndarray | float  # per window pixel (window mode) or 1.0 (resize mode)
    total: np.ndarray
    weight_sum: np.ndarray

    def probability(self) -> np.ndarray:
        return (self.total / self.weight_sum)[self.inner]


def _canvas(image: np.ndarray, size: int, options: SegmentOptions) -> _Canvas:
    if options.mode == "resize":
        padded, inner = pad_centred(image, tuple(-(-s // 16) * 16 for s in image.shape))
        windows = [(slice(None), slice(None))]
        weights: np.ndarray | float = 1.0
    else:
        padded, inner = pad_centred(image, tuple(max(s, size) for s in image.shape))
        windows = [(slice(r, r + size), slice(c, c + size))
                   for r in window_starts(padded.shape[0], size, options.overlap)
                   for c in window_starts(padded.shape[1], size, options.overlap)]
        weights = gaussian_weights(size)
    zeros = np.zeros(padded.shape, np.float32)
    return _Canvas(padded, inner, windows, weights, zeros, zeros.copy())


def predict_probabilities(model: InferenceModel, images: Sequence[np.ndarray],
                          options: SegmentOptions) -> list[np.ndarray]:
    """Vessel probabilities of z-scored model-scale images (float32, each the image's shape).

    Every network input (a whole padded image, or a window) is batched with others of its shape,
    across images, ``options.batch_size`` at a time.
    """
    canvases = [_canvas(image, model.preprocessing.size, options) for image in images]
    by_shape: dict[tuple[int, ...], list[tuple[_Canvas, Window]]] = {}
    for canvas in canvases:
        for window in canvas.windows:
            by_shape.setdefault(canvas.image[window].shape, []).append((canvas, window))
    for inputs in by_shape.values():
        for start in range(0, len(inputs), options.batch_size):
            chunk = inputs[start:start + options.batch_size]
            batch = np.stack([canvas.image[window] for canvas, window in chunk])
            for (canvas, window), probability in zip(chunk, forward(model, batch, options.tta)):
                canvas.total[window] += probability * canvas.weights
                canvas.weight_sum[window] += canvas.weights
    return [canvas.probability() for canvas in canvases]


@torch.no_grad()
def forward(model: InferenceModel, batch: np.ndarray, tta: bool) -> np.ndarray:
    """Vessel probabilities (B, H, W) of a (B, H, W) batch, averaged over :data:`FLIPS` with
    ``tta``; H and W must be multiples of 16."""
    x = torch.from_numpy(batch)[:, None].to(model.device)
    flips = FLIPS if tta else FLIPS[:1]
    total = torch.zeros(batch.shape, device=model.device)
    for dims in flips:
        flipped = x.flip(dims).contiguous(memory_format=torch.channels_last)
        with autocast(model.device, model.bf16):
            logits = model.net(flipped)
        total += logits.float().softmax(dim=1)[:, 1].flip(dims)
    return (total / len(flips)).cpu().numpy()


# ---- 3. back to the original image -------------------------------------------------------------

def to_original(probability: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities at the model's scale interpolated (bilinear) to the original ``shape``."""
    if probability.shape == tuple(shape):
        return probability
    shrink = probability.shape[0] > shape[0]
    return resize(probability, shape, order=1, anti_aliasing=shrink, preserve_range=True)


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    keep = np.bincount(labels.ravel()) >= min_pixels
    keep[0] = False
    return keep[labels]
