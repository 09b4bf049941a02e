"""CM-UNet pre-training: CMAE (Huang et al., TPAMI 2024) on a UNet, as in the CM-UNet paper.

Two views of each image come from one random resized crop (plus flip) of a virtual base image of
side S + P: the online view is its S² window at offset 0, the target view the S² window shifted
by a random 0..P pixels in x and y (pixel shifting), with Gaussian noise on half of the targets.

* reconstruction: the online encoder E_s sees the online view with 65 % of its 16x16 patches
  set to 0 (one random mask per image); the pixel decoder D_p (UNet decoder with E_s's skips) and
  a 1x1 conv predict the image; MSE on the masked patches against per-patch normalised pixels.
* contrastive: the feature decoder D_f (same architecture, own weights) decodes E_s's features;
  an adapter (1x1 conv w -> 16w, BN, ReLU, at every cell of a 4x4 average-pooled grid) brings
  them to the bottleneck's width, then global average pooling, projector g_s and predictor q. The momentum encoder E_t
  and projector g_t (EMA copies) encode the target view's bottleneck, pooled. InfoNCE (tau 0.07,
  negatives = the global batch, all-gathered), scaled by 2 tau.  L = L_rec + lambda_con * L_con.

The adapter is non-linear and comes BEFORE pooling, so that g_s is trained on the space g_t (its
EMA copy) is used on: pooled post-ReLU 16w-channel features that fill all 16w dimensions. A
linear adapter after pooling (``adapter="linear-pooled"``, our first layout, kept to reproduce
it) confines g_s's input to a (w+1)-dimensional affine slice of the 16w, while the key's input
fills them: the key came mostly from directions g_s never learnt (docs/methods.md).
``reconstruction=False`` or ``contrastive=False`` give the paper's missing ablations (the unused
branch is not built). Every step also returns the branch's health
(:func:`cmunet.methods.losses.contrastive_health`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmunet.config import check
from cmunet.methods.base import PretrainMethod, to_numpy
from cmunet.methods.heads import MLP, cosine_momentum, ema_update, frozen_copy
from cmunet.methods.losses import global_info_nce, masked_patch_mse
from cmunet.methods.masking import pixel_mask, random_patch_mask
from cmunet.methods.views import crop, random_boxes, random_flips
from cmunet.models.unet import Decoder, Encoder


@dataclass
class CMUNetConfig:
    reconstruction: bool = True
    contrastive: bool = True
    mask_ratio: float = 0.65
    patch: int = 16
    norm_pix_loss: bool = True
    shift: int = -1  # P in pixels; -1 = round(31 * view_size / 224), the paper's 31 at 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    noise_p: float = 0.5
    noise_std: float = 0.2  # in units of the z-scored image
    lambda_con: float = 1.0
    tau: float = 0.07
    mlp_hidden: int = 2048
    mlp_out: int = 256
    # online layout into g_s; linear-pooled is the old one, which could not learn (methods.md)
    adapter: Literal["conv-bn-relu", "linear-pooled"] = "conv-bn-relu"
    adapter_pool: int = 4  # conv-bn-relu on D_f's output average-pooled by this factor; 1 = per pixel
    # constant: m = ema_start throughout (CMAE); cosine: ema_start -> ema_end (BYOL; freezes)
    ema_schedule: Literal["constant", "cosine"] = "cosine"
    ema_start: float = 0.996
    ema_end: float = 1.0  # cosine only
    head_lr_scale: float = 1.0  # lr multiplier for the adapter, projector and predictor

    def __post_init__(self):
        check(self.reconstruction or self.contrastive, "reconstruction",
              "and contrastive cannot both be false")
        check(0 < self.mask_ratio < 1, "mask_ratio", "must be in (0, 1)")
        check(self.tau > 0, "tau", "must be positive")
        check(0 <= self.ema_start <= self.ema_end <= 1, "ema_start", "must be <= ema_end <= 1")
        check(self.head_lr_scale > 0, "head_lr_scale", "must be positive")
        check(self.adapter_pool >= 1, "adapter_pool", "must be >= 1")


class CMUNet(PretrainMethod):
    name = "cmunet"

    def __init__(self, cfg: CMUNetConfig, width: int, view_size: int):
        super().__init__()
        if view_size % cfg.patch or view_size % 16:
            raise ValueError(f"view_size {view_size} must be a multiple of 16 and of the patch")
        if view_size % cfg.adapter_pool:
            raise ValueError(f"view_size {view_size} must be a multiple of cmunet.adapter_pool "
                             f"{cfg.adapter_pool}")
        self.cfg, self.view_size = cfg, view_size
        self.shift = cfg.shift if cfg.shift >= 0 else round(31 * view_size / 224)
        self.momentum = cfg.ema_start
        self.encoder = Encoder(width)
        if cfg.reconstruction:
            self.decoder = Decoder(width)  # the pixel decoder D_p
            self.pixel_head = nn.Conv2d(width, 1, kernel_size=1)
        if cfg.contrastive:
            self.feature_decoder = Decoder(width)  # D_f
            self.adapter = (adapter(width) if cfg.adapter == "conv-bn-relu"
                            else nn.Conv2d(width, 16 * width, kernel_size=1))
            self.projector = MLP(16 * width, cfg.mlp_hidden, cfg.mlp_out)  # g_s
            self.predictor = MLP(cfg.mlp_out, cfg.mlp_hidden, cfg.mlp_out)  # q
            self.momentum_encoder = frozen_copy(self.encoder)  # E_t
            self.momentum_projector = frozen_copy(self.projector)  # g_t
        # contrastive-only runs export the feature decoder as the decoder
        self.parts = {"encoder": "encoder",
                      "decoder": "decoder" if cfg.reconstruction else "feature_decoder"}
        self.lr_scales = {name: cfg.head_lr_scale for name in ("adapter", "projector", "predictor")}

    def views(self, images: torch.Tensor, gen: torch.Generator):
        """(online view, target view, patch mask) for a batch of base images."""
        n, device, s, p = images.shape[0], images.device, self.view_size, self.shift
        boxes = random_boxes(n, gen, device, self.cfg.crop_scale)
        flips = random_flips(n, gen, device)
        zero = torch.zeros(n, 2, device=device)
        shifts = torch.randint(0, p + 1, (n, 2), generator=gen, device=device)
        online = crop(images, boxes, flips, s, base=s + p, offsets=zero)
        target = crop(images, boxes, flips, s, base=s + p, offsets=shifts)
        noisy = torch.rand(n, 1, 1, 1, generator=gen, device=device) < self.cfg.noise_p
        noise = torch.randn(target.shape, generator=gen, device=device, dtype=target.dtype)
        target = target + noisy * self.cfg.noise_std * noise
        mask = random_patch_mask(n, s // self.cfg.patch, self.cfg.mask_ratio, gen, device)
        return online, target, mask

    def forward(self, images: torch.Tensor, gen: torch.Generator):
        online, target, mask = self.views(images, gen)
        masked = online * (1 - pixel_mask(mask, self.cfg.patch)).to(online.dtype)
        features = self.encoder(masked.contiguous(memory_format=torch.channels_last))
        logs, loss = {}, 0.0
        if self.cfg.reconstruction:
            recon = self.pixel_head(self.decoder(features))
            logs["loss_rec"] = masked_patch_mse(recon, online, mask, self.cfg.patch,
                                                self.cfg.norm_pix_loss)
            loss = loss + logs["loss_rec"]
        if self.cfg.contrastive:
            query = self.predictor(self.projector(self.online_embedding(features)))
            with torch.no_grad():
                key = self.momentum_projector(self.target_embedding(target))
            logs["loss_con"], health = global_info_nce(query, key, self.cfg.tau)
            logs.update(health)
            loss = loss + self.cfg.lambda_con * logs["loss_con"]
        logs["loss"] = loss
        return loss, logs

    def online_embedding(self, features: list[torch.Tensor]) -> torch.Tensor:
        """g_s's input: D_f's output through the adapter, pooled -> (N, 16w)."""
        decoded = self.feature_decoder(features)
        if self.cfg.adapter == "linear-pooled":
            return self.adapter(spatial_mean(decoded)).flatten(1)
        if self.cfg.adapter_pool > 1:
            decoded = F.avg_pool2d(decoded, self.cfg.adapter_pool)
        return spatial_mean(self.adapter(decoded)).flatten(1)

    def target_embedding(self, target: torch.Tensor) -> torch.Tensor:
        """g_t's input: E_t's bottleneck of the target view, pooled -> (N, 16w)."""
        return spatial_mean(self.momentum_encoder(target)[-1]).flatten(1)

    def after_step(self, progress: float) -> dict[str, float]:
        if not self.cfg.contrastive:
            return {}
        if self.cfg.ema_schedule == "cosine":
            self.momentum = cosine_momentum(progress, self.cfg.ema_start, self.cfg.ema_end)
        ema_update(self.momentum_encoder, self.encoder, self.momentum)
        ema_update(self.momentum_projector, self.projector, self.momentum)
        return {"ema_momentum": self.momentum}

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict]:
        if not self.cfg.reconstruction:
            return []
        online, target, mask = self.views(images, gen)
        keep = 1 - pixel_mask(mask, self.cfg.patch).to(online.dtype)
        recon = self.pixel_head(self.decoder(self.encoder(online * keep)))
        if self.cfg.norm_pix_loss:  # show the prediction in image units, patch by patch
            recon = denormalize_patches(recon, online, self.cfg.patch)
        rows = []
        for i in range(images.shape[0]):
            rows.append({"input": to_numpy(online[i, 0]), "masked": to_numpy((online * keep)[i, 0]),
                         "reconstruction": to_numpy((recon * (1 - keep) + online * keep)[i, 0]),
                         "target view": to_numpy(target[i, 0])})
        return rows


def adapter(width: int) -> nn.Sequential:
    """1x1 conv w -> 16w, BN, ReLU: per pixel, before pooling (non-linear, so the pooled
    output is not confined to a (w+1)-dimensional slice as a linear map of pooled features)."""
    return nn.Sequential(nn.Conv2d(width, 16 * width, kernel_size=1, bias=False),
                         nn.BatchNorm2d(16 * width), nn.ReLU(inplace=True))


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to (N, C, 1, 1) whose gradient keeps the input's channels_last
    layout: ``mean``'s backward writes an NCHW gradient, and the ReLU backward that meets it with
    channels_last activations took 6x its usual time (2 % of a w16 128² step on a CPU)."""
    return F.avg_pool2d(x, kernel_size=x.shape[2:])


def denormalize_patches(pred: torch.Tensor, reference: torch.Tensor, patch: int) -> torch.Tensor:
    """Undo per-patch normalisation of ``pred`` with the statistics of ``reference``'s patches."""
    b, c, h, w = reference.shape
    ref = reference.float().reshape(b, c, h // patch, patch, w // patch, patch)
    mean = ref.mean(dim=(3, 5), keepdim=True)
    std = (ref.var(dim=(3, 5), keepdim=True) + 1e-6).sqrt()
    out = pred.float().reshape(ref.shape) * std + mean
    return out.reshape(b, c, h, w)
