"""Which frames of a cine loop (multi-frame DICOM) become samples: all, one, a stride, or the
contrast phase.

Contrast score of a frame (:func:`contrast_scores`): the frame is block-averaged down to about
:data:`SCORE_SIZE` pixels on its shorter side and log-transformed (Beer-Lambert: a vessel's
contrast is then a difference of log intensities, whatever the exposure), then filtered with
scikit-image's Sato tubeness filter (``skimage.filters.sato``, sigma :data:`SIGMA` pixels,
``black_ridges=True``: dark tubular structures, the contrast-filled vessels). The score is the
mean response over the frame: anatomy, catheter and noise add a floor that changes little
within a loop, the vessels a part that grows with the contrast concentration.

Contrast phase (:func:`contrast_phase`): the frames whose score is at least ``keep`` of the way
from the loop's lowest score to its highest. With ``keep`` 0.4 it finds the frames of synthetic
loops at >= half of the peak concentration (:func:`cmunet.data.synth.generate_cine`) with a
precision of 0.96-1.0 and a recall of 0.94-1.0 (64, 256 and 512 px; tests/test_cine.py asks
for 0.9 and 0.85). The threshold is relative to the loop, so a loop without a bolus (every
frame alike) still keeps its higher-scoring part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FRAME_CHOICES = ("all", "first", "middle", "contrast")
SCORE_SIZE = 128  # frames are scored at about this many pixels on the shorter side
SIGMA = 1.5  # Sato filter scale in pixels at SCORE_SIZE (vessel radii are about 0.3-2 px there)


def choose_frames(frames: Sequence[np.ndarray], how: str, stride: int = 1, keep: float = 0.4,
                  limit: int = 0) -> list[int]:
    """The indices of the ``frames`` (2-D arrays) to keep: ``how`` (one of
    :data:`FRAME_CHOICES`) picks them, then every ``stride``-th of those is kept, then at most
    ``limit`` (0 = no limit), evenly spaced."""
    if how not in FRAME_CHOICES:
        raise ValueError(f"frame choice must be one of {', '.join(FRAME_CHOICES)}, not {how!r}")
    count = len(frames)
    if how == "contrast":
        chosen = contrast_phase(contrast_scores(frames), keep)
    else:
        chosen = {"all": list(range(count)), "first": [0], "middle": [count // 2]}[how]
    chosen = chosen[::stride]
    if limit and len(chosen) > limit:  # the centres of `limit` equal parts: for 1, the middle
        chosen = [chosen[int((i + 0.5) * len(chosen) / limit)] for i in range(limit)]
    return chosen


def contrast_scores(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The vessel-contrast score of each frame (see the module's description)."""
    return np.array([_score(pixels) for pixels in frames])


def contrast_phase(scores: np.ndarray, keep: float) -> list[int]:
    """The indices whose score is at least ``keep`` (0..1) of the way from the lowest score to
    the highest."""
    low, high = float(scores.min()), float(scores.max())
    return [int(i) for i in np.flatnonzero(scores >= low + keep * (high - low))]


def _score(pixels: np.ndarray) -> float:
    from skimage.filters import sato
    from skimage.transform import downscale_local_mean

    factor = max(1, min(pixels.shape) // SCORE_SIZE)
    rows, cols = (side - side % factor for side in pixels.shape)  # whole blocks only, no padding
    small = pixels[:rows, :cols].astype(np.float32)
    if factor > 1:
        small = downscale_local_mean(small, (factor, factor))
    return float(sato(np.log1p(small), sigmas=(SIGMA,), black_ridges=True).mean())
