"""Batched, on-device view generation: random resized crops, flips and pixel-shifted crop pairs.

Every crop is one ``grid_sample`` call over the whole batch, with per-image parameters drawn from
the step's generator, so views are reproducible on resume and cost no data-loader time.
Coordinates follow ``align_corners=False``: pixel centres of an N-pixel side sit at
(i + 0.5) / N * 2 - 1 in normalised units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_boxes(n: int, gen: torch.Generator, device: torch.device,
                 scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(n, 4) boxes ``(cx, cy, hx, hy)`` in normalised coordinates: centre and half-sizes.

    Area is uniform in ``scale`` (fraction of the image), the aspect ratio log-uniform in
    ``ratio``; boxes that would leave the image are shrunk to fit, then placed uniformly.
    """
    rand = torch.rand(n, 4, generator=gen, device=device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand[:, 1]
    aspect = torch.exp(log_r)  # width / height
    hx = torch.sqrt(area * aspect).clamp(max=1.0)  # half-width in [-1, 1] units = width fraction
    hy = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - hx) * (2 * rand[:, 2] - 1)
    cy = (1 - hy) * (2 * rand[:, 3] - 1)
    return torch.stack([cx, cy, hx, hy], dim=1)


def random_flips(n: int, gen: torch.Generator, device: torch.device, p: float = 0.5) -> torch.Tensor:
    """(n,) tensor of +1 (keep) or -1 (horizontal flip)."""
    return torch.where(torch.rand(n, generator=gen, device=device) < p, -1.0, 1.0)


def crop(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
         base: int | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Sample a ``size``² view of each image.

    Without ``base``: the view is the (flipped) box resized to ``size``. With ``base`` and
    ``offsets`` (n, 2) in pixels (x, y): the box is first resized to a virtual ``base``² image and
    the view is its ``size``² window at that offset — two windows of one base overlap but are
    shifted against each other (CM-UNet's pixel shifting), without computing the base itself.
    """
    n = images.shape[0]
    cx, cy, hx, hy = boxes.unbind(1)
    hx = hx * flips
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    if base is None:
        theta[:, 0, 0], theta[:, 0, 2] = hx, cx
        theta[:, 1, 1], theta[:, 1, 2] = hy, cy
    else:
        # view coordinate v -> base coordinate v*size/base + (size + 2*offset)/base - 1 -> source
        shift = (size + 2 * offsets.to(images.dtype)) / base - 1  # (n, 2): x, y
        theta[:, 0, 0], theta[:, 0, 2] = hx * size / base, cx + hx * shift[:, 0]
        theta[:, 1, 1], theta[:, 1, 2] = hy * size / base, cy + hy * shift[:, 1]
    grid = F.affine_grid(theta, (n, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
