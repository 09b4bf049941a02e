"""Random patch masking (one independent mask per image) and patch helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_patch_mask(batch: int, grid: int, ratio: float, gen: torch.Generator,
                      device: torch.device) -> torch.Tensor:
    """(batch, grid, grid) bool, True = masked: exactly round(ratio * grid²) patches per image,
    chosen independently for every image (the reference code shared one mask across the batch)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    patches = grid * grid
    masked = round(ratio * patches)
    order = torch.rand(batch, patches, generator=gen, device=device).argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    return mask.view(batch, grid, grid)


def pixel_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, g, g) patch mask -> (B, 1, g*patch, g*patch) float pixel mask."""
    return F.interpolate(mask[:, None].float(), scale_factor=patch, mode="nearest")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
