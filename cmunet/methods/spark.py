"""SparK on the UNet: sparse masked modelling for CNNs (Tian et al., "Designing BERT for
Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023).

One view per image (random resized crop + flip, as MAE), 60 % of its 16x16 patches masked, a
random set per image. Masked positions are kept EMPTY through the encoder, as sparse convolution
would: the same :class:`~cmunet.models.unet.Encoder` modules are run layer by layer by
:func:`sparse_encode`, which multiplies every conv and max-pool output by the mask at that
resolution (16x16 patches are 16, 8, 4, 2, 1 pixels wide at the five scales, so pooling windows
never straddle a patch border) and normalises with BatchNorm statistics computed over the
visible positions only (:func:`masked_batch_norm`, which updates the module's own running
statistics). Nothing from a masked pixel reaches a visible feature, and the encoder's state
dict is an ordinary UNet encoder: export and fine-tuning (dense) are unchanged.

Densification (SparK's "hierarchical decoder with mask tokens"): at each of the 5 scales the
encoder's feature map is normalised by a masked BatchNorm, its empty positions are filled with a
learnable mask token of that scale, and a 3x3 conv projects it (none at the bottleneck, where
SparK's projection is the identity because the encoder and decoder widths agree). The UNet
decoder (with these densified maps as skips) and a 1x1 conv predict the image; the loss is the
MSE on the masked patches against per-patch normalised pixels. The densifiers and the head are
pre-training only; the export is encoder + decoder.

The extra pre-training parameters are the densifiers': 3x3 convs at widths w..8w plus BN and
tokens, 3.14 M at w=64 — the paper's 34.18 M for SparK is the 31.04 M UNet plus exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmunet.config import check
from cmunet.methods.base import PretrainMethod
from cmunet.methods.losses import masked_patch_mse
from cmunet.methods.mae import reconstruction_rows
from cmunet.methods.masking import random_patch_mask
from cmunet.methods.views import crop, random_boxes, random_flips
from cmunet.models.unet import Decoder, Encoder


@dataclass
class SparKConfig:
    mask_ratio: float = 0.6
    crop_scale: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self):
        check(0 < self.mask_ratio < 1, "mask_ratio", "must be in (0, 1)")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
              "must be [low, high] with 0 < low <= high <= 1")


def visible_at(visible: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, g, g) bool patch grid (True = visible) -> (B, 1, h, w) float mask at ``like``'s size."""
    return F.interpolate(visible[:, None].to(like.dtype), size=like.shape[-2:], mode="nearest")


def masked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``bn`` applied with statistics of the visible positions only; masked positions output 0.

    SparK's SparseBatchNorm2d: mean and (biased) variance over the visible positions of ``x``
    (B, C, H, W), ``bn``'s affine parameters, its running statistics used in eval mode and
    updated in training mode (unbiased variance, as ``bn`` would). Computed as sums weighted by
    the visibility mask, not by gathering the visible positions: boolean indexing would make the
    host wait for the GPU twice per layer.
    """
    keep = visible_at(visible, x).float()  # (B, 1, H, W)
    xf, dims, shape = x.float(), (0, 2, 3), (1, -1, 1, 1)
    if bn.training:
        count = keep.sum()
        mean = (xf * keep).sum(dims) / count
        var = ((xf - mean.view(shape)) ** 2 * keep).sum(dims) / count
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * count / (count - 1).clamp_min(1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    else:
        mean, var = bn.running_mean.float(), bn.running_var.float()
    out = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return (out * keep).to(x.dtype)


def sparse_apply(module: nn.Module, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Run a Sequential of the UNet (DoubleConv, Down) layer by layer, keeping masked positions
    at zero: conv and max-pool outputs are re-masked, BatchNorm is masked, ReLU keeps zeros."""
    if isinstance(module, nn.Sequential):
        for layer in module:
            x = sparse_apply(layer, x, visible)
        return x
    if isinstance(module, nn.BatchNorm2d):
        return masked_batch_norm(module, x, visible)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        out = module(x)
        return out * visible_at(visible, out)
    if isinstance(module, nn.ReLU):
        return module(x)
    raise TypeError(f"SparK has no sparse rule for {type(module).__name__}")


def sparse_encode(encoder: Encoder, image: torch.Tensor,
                  visible: torch.Tensor) -> list[torch.Tensor]:
    """``encoder.forward`` with masked positions kept empty: features at the 5 scales, zero at
    every masked position. With every position visible it equals ``encoder(image)``."""
    x = image * visible_at(visible, image)
    features = [sparse_apply(encoder.stem, x, visible)]
    for down in encoder.downs:
        features.append(sparse_apply(down, features[-1], visible))
    return features


class SparK(PretrainMethod):
    name = "spark"
    no_weight_decay = ("mask_tokens.",)  # SparK decays neither its mask tokens nor 1-D tensors

    def __init__(self, cfg: SparKConfig, width: int, view_size: int):
        super().__init__()
        self.encoder = Encoder(width)
        self.patch = 2 ** len(self.encoder.downs)  # one patch = one bottleneck pixel
        if view_size % self.patch:
            raise ValueError(f"view_size {view_size} must be a multiple of {self.patch}")
        self.cfg, self.view_size = cfg, view_size
        widths = self.encoder.widths
        self.densify_norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, 1, 1), std=0.02, a=-0.02, b=0.02))
            for c in widths)
        self.densify_projs = nn.ModuleList(
            [nn.Conv2d(c, c, kernel_size=3, padding=1) for c in widths[:-1]] + [nn.Identity()])
        self.decoder = Decoder(width)
        self.pixel_head = nn.Conv2d(width, 1, kernel_size=1)

    def views(self, images: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(view, patch mask with True = masked), one random mask per image."""
        n, device = images.shape[0], images.device
        boxes = random_boxes(n, gen, device, self.cfg.crop_scale)
        view = crop(images, boxes, random_flips(n, gen, device), self.view_size)
        mask = random_patch_mask(n, self.view_size // self.patch, self.cfg.mask_ratio, gen, device)
        return view, mask

    def densify(self, features: list[torch.Tensor], visible: torch.Tensor) -> list[torch.Tensor]:
        """Fill each scale's empty positions with its mask token (after a masked BN), project."""
        dense = []
        for x, norm, token, proj in zip(features, self.densify_norms, self.mask_tokens,
                                        self.densify_projs):
            x = masked_batch_norm(norm, x, visible)
            x = torch.where(visible_at(visible, x).bool(), x, token.to(x.dtype))
            dense.append(proj(x))
        return dense

    def reconstruct(self, view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = ~mask
        features = sparse_encode(self.encoder, view, visible)
        return self.pixel_head(self.decoder(self.densify(features, visible)))

    def forward(self, images: torch.Tensor, gen: torch.Generator):
        view, mask = self.views(images, gen)
        loss = masked_patch_mse(self.reconstruct(view, mask), view, mask, self.patch, norm_pix=True)
        return loss, {"loss": loss}

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict]:
        view, mask = self.views(images, gen)
        return reconstruction_rows(view, mask, self.reconstruct(view, mask), self.patch, True)
