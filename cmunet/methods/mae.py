"""MAE on the UNet: masked image modelling (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022), the paper's "MAE" baseline.

One view per image: a random resized crop (scale 0.2-1.0, MAE's) and a horizontal flip, S² pixels.
75 % of its 16x16 patches (MAE's ratio; configurable), a random set for every image, are set to 0
(the z-scored mean) — a CNN cannot drop tokens, so masked patches are blanked instead, as the
paper did. The encoder, the UNet decoder (with skips) and a 1x1 conv predict the image; the loss is
the MSE on the masked patches only, against the view normalised patch by patch (MAE's
``norm_pix_loss``, switchable). Export: encoder and decoder; the 1x1 head is left behind.

Unlike CM-UNet's reconstruction branch there is no second view and no pixel shifting. Because
blanked patches still pass through dense 3x3 convolutions and BatchNorm, information from visible
pixels flows into masked ones and masked zeros shift the BN statistics; SparK
(:mod:`cmunet.methods.spark`) is the variant that prevents both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cmunet.config import check
from cmunet.methods.base import PretrainMethod, to_numpy
from cmunet.methods.cmunet import denormalize_patches
from cmunet.methods.losses import masked_patch_mse
from cmunet.methods.masking import pixel_mask, random_patch_mask
from cmunet.methods.views import crop, random_boxes, random_flips
from cmunet.models.unet import Decoder, Encoder


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    patch: int = 16
    norm_pix_loss: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self):
        check(0 < self.mask_ratio < 1, "mask_ratio", "must be in (0, 1)")
        check(self.patch >= 2, "patch", "must be >= 2 pixels (norm_pix needs 2 values a patch)")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
              "must be [low, high] with 0 < low <= high <= 1")


class MAE(PretrainMethod):
    name = "mae"

    def __init__(self, cfg: MAEConfig, width: int, view_size: int):
        super().__init__()
        if view_size % cfg.patch or view_size % 16:
            raise ValueError(f"view_size {view_size} must be a multiple of 16 and of mae.patch")
        self.cfg, self.view_size = cfg, view_size
        self.encoder = Encoder(width)
        self.decoder = Decoder(width)
        self.pixel_head = nn.Conv2d(width, 1, kernel_size=1)

    def views(self, images: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(view, patch mask): a random resized crop + flip of each image and its own mask."""
        n, device = images.shape[0], images.device
        boxes = random_boxes(n, gen, device, self.cfg.crop_scale)
        view = crop(images, boxes, random_flips(n, gen, device), self.view_size)
        mask = random_patch_mask(n, self.view_size // self.cfg.patch, self.cfg.mask_ratio, gen,
                                 device)
        return view, mask

    def reconstruct(self, view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = 1 - pixel_mask(mask, self.cfg.patch).to(view.dtype)
        masked = (view * keep).contiguous(memory_format=torch.channels_last)
        return self.pixel_head(self.decoder(self.encoder(masked)))

    def forward(self, images: torch.Tensor, gen: torch.Generator):
        view, mask = self.views(images, gen)
        loss = masked_patch_mse(self.reconstruct(view, mask), view, mask, self.cfg.patch,
                                self.cfg.norm_pix_loss)
        return loss, {"loss": loss}

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict]:
        view, mask = self.views(images, gen)
        return reconstruction_rows(view, mask, self.reconstruct(view, mask), self.cfg.patch,
                                   self.cfg.norm_pix_loss)


def reconstruction_rows(view: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, patch: int,
                        norm_pix: bool) -> list[dict]:
    """Gallery rows of a masked-modelling method: the view, its masked version, and the
    prediction pasted into the masked patches (in image units when the loss was per-patch
    normalised)."""
    keep = 1 - pixel_mask(mask, patch).to(view.dtype)
    if norm_pix:
        recon = denormalize_patches(recon, view, patch)
    pasted = recon.to(view.dtype) * (1 - keep) + view * keep
    return [{"input": to_numpy(view[i, 0]), "masked": to_numpy((view * keep)[i, 0]),
             "reconstruction": to_numpy(pasted[i, 0])} for i in range(view.shape[0])]
