"""MoCo v2 on the UNet encoder (He et al., "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020; Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020).

Two views of every image with v2's augmentations, adapted to grayscale: random resized crop
(scale 0.2-1.0) and horizontal flip; brightness and contrast jitter (strength 0.4, p 0.8) as
torchvision applies them to an image in [0, 1] (each image is mapped to [0, 1] by its own minimum
and maximum and back, since ours are z-scored); Gaussian blur (sigma 0.1-2.0 pixels, p 0.5).
Saturation, hue and random grayscale do nothing to a grayscale image and are left out.

Query: the encoder's bottleneck, globally average pooled, through v2's 2-layer MLP head
(Linear-ReLU-Linear, hidden = the 16w bottleneck width as v2's hidden = its feature width, 128
out). Key: the same through the momentum encoder and head (EMA with a constant 0.999, outside the
optimizer), with v2's shuffled BatchNorm: across ranks, the key batch is all-gathered, permuted
by a permutation every rank shares, each rank encodes its share as one BN batch, and the keys are
un-permuted; on ONE rank (where the original's shuffle is the identity and keys and queries share
one BN batch, the leak shuffled BN exists to stop) the batch is split into ``bn_splits`` BN
sub-batches as if on that many GPUs -- queries in contiguous ones, keys in sub-batches of a random
permutation, un-permuted afterwards (MoCo's single-GPU demo does the same). Loss: InfoNCE with tau 0.2 whose negatives are the QUEUE only —
keys of earlier batches; the current keys, all-gathered in rank order, are enqueued after the
loss (first in, first out), so the queue is the same on every rank and never holds the current
batch. Export: the encoder only; fine-tuning initialises the decoder at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cmunet.config import check
from cmunet.methods.base import PretrainMethod, to_numpy
from cmunet.methods.heads import ema_update, frozen_copy
from cmunet.methods.losses import gather_batch
from cmunet.methods.views import crop, random_boxes, random_flips
from cmunet.models.unet import Encoder


@dataclass
class MoCoConfig:
    queue_size: int = 4096  # K negatives; MoCo's 65536 would repeat a small pool many times over
    tau: float = 0.2  # v2's temperature (the reference code used v1's 0.07)
    momentum: float = 0.999
    mlp_hidden: int = 0  # 0 = the bottleneck width 16w
    mlp_out: int = 128
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels
    # one rank only: BN sub-batches of queries and (shuffled) keys, as MoCo on this many GPUs;
    # several ranks: each rank's share is one BN batch and this is unused; 1 = no shuffled BN
    bn_splits: int = 2

    def __post_init__(self):
        check(self.queue_size >= 1, "queue_size", "must be >= 1")
        check(self.tau > 0, "tau", "must be positive")
        check(0 <= self.momentum <= 1, "momentum", "must be in [0, 1]")
        check(self.mlp_hidden >= 0, "mlp_hidden", "must be >= 0 (0 = the bottleneck width 16w)")
        check(self.mlp_out >= 1, "mlp_out", "must be >= 1")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
              "must be [low, high] with 0 < low <= high <= 1")
        check(0 <= self.jitter_p <= 1 and 0 <= self.blur_p <= 1, "jitter_p",
              "and blur_p must be probabilities in [0, 1]")
        check(0 <= self.brightness < 1 and 0 <= self.contrast < 1, "brightness",
              "and contrast must be in [0, 1)")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur_sigma",
              "must be [low, high] with 0 < low <= high")
        check(self.bn_splits >= 1, "bn_splits", "must be >= 1")


def jitter(x: torch.Tensor, apply: torch.Tensor, brightness: float, contrast: float,
           gen: torch.Generator) -> torch.Tensor:
    """torchvision's brightness then contrast jitter of (B, 1, H, W) images where ``apply``:
    on u = the image mapped to [0, 1] by its own range, u <- clip(b u), u <- clip(c u + (1 - c)
    mean(u)) with b, c uniform in [1 - strength, 1 + strength]; then mapped back."""
    n = x.shape[0]
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    factors = 1 + (2 * torch.rand(n, 2, 1, 1, generator=gen, device=x.device) - 1) * \
        torch.tensor([brightness, contrast], device=x.device)[:, None, None]
    u = ((x - low) / span * factors[:, :1]).clamp(0, 1)
    c = factors[:, 1:]
    u = (c * u + (1 - c) * u.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    return torch.where(apply[:, None, None, None], low + span * u, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each (1, H, W) image of ``x`` with its own sigma (B,), separably, reflecting borders;
    a sigma of 0 leaves the image unchanged. Kernel radius ceil(3 max_sigma)."""
    n, _, h, w = x.shape
    radius = max(1, math.ceil(3 * max_sigma))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-taps**2 / (2 * sigma[:, None].clamp_min(1e-6) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma ~ 0 -> a delta
    images = F.pad(x.reshape(1, n, h, w), (radius,) * 4, mode="reflect")
    images = F.conv2d(images, kernel.view(n, 1, 1, -1), groups=n)
    images = F.conv2d(images, kernel.view(n, 1, -1, 1), groups=n)
    return images.view_as(x)


class MoCo(PretrainMethod):
    name = "moco"
    parts = {"encoder": "encoder"}

    def __init__(self, cfg: MoCoConfig, width: int, view_size: int):
        super().__init__()
        if view_size % 16:
            raise ValueError(f"view_size {view_size} must be a multiple of 16")
        self.cfg, self.view_size = cfg, view_size
        self.encoder = Encoder(width)
        feature = self.encoder.widths[-1]
        hidden = cfg.mlp_hidden or feature
        self.projector = nn.Sequential(nn.Linear(feature, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, cfg.mlp_out))
        self.momentum_encoder = frozen_copy(self.encoder)
        self.momentum_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.mlp_out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def view(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One v2-augmented view of every image."""
        c, n, dev = self.cfg, images.shape[0], images.device
        boxes = random_boxes(n, gen, dev, c.crop_scale)
        x = crop(images, boxes, random_flips(n, gen, dev), self.view_size).float()
        x = jitter(x, torch.rand(n, generator=gen, device=dev) < c.jitter_p, c.brightness,
                   c.contrast, gen)
        low, high = c.blur_sigma
        sigma = low + (high - low) * torch.rand(n, generator=gen, device=dev)
        blurred = torch.rand(n, generator=gen, device=dev) < c.blur_p
        x = gaussian_blur(x, torch.where(blurred, sigma, 0.0), high)
        return x.to(images.dtype).contiguous(memory_format=torch.channels_last)

    def embed(self, encoder: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(projector(encoder(x)[-1].mean(dim=(2, 3))).float(), dim=1)

    def sub_batches(self, n: int) -> int:
        """BN batches a rank's ``n`` queries (and keys) are encoded in: ``bn_splits`` on one rank,
        else 1 (each rank is one BN batch)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return 1
        if n < 2 * self.cfg.bn_splits:
            raise ValueError(f"moco.bn_splits={self.cfg.bn_splits} needs at least 2 images per "
                             f"BN sub-batch, but the micro-batch has {n}: lower moco.bn_splits "
                             "or raise train.micro_batch")
        return self.cfg.bn_splits

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Online embeddings, in contiguous BN sub-batches on one rank (:meth:`sub_batches`)."""
        return torch.cat([self.embed(self.encoder, self.projector, part)
                          for part in x.tensor_split(self.sub_batches(x.shape[0]))])

    @torch.no_grad()
    def keys(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum keys of ``x`` with shuffled BN. Returns (this rank's keys, the global batch's
        keys in rank order). One rank: ``bn_splits`` BN sub-batches of a random permutation,
        un-permuted. Several ranks: each rank encodes a random share of the global batch (a
        permutation drawn on rank 0 and broadcast), from one gather of the encoded shares."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            order = torch.randperm(x.shape[0], generator=gen, device=x.device)
            keys = torch.cat([self.embed(self.momentum_encoder, self.momentum_projector, part)
                              for part in x[order].tensor_split(self.sub_batches(x.shape[0]))])
            keys = keys[order.argsort()]
            return keys, keys
        everything = gather_batch(x)
        order = torch.randperm(everything.shape[0], generator=gen, device=x.device)
        dist.broadcast(order, src=0)
        rank, n = dist.get_rank(), x.shape[0]
        mine = order[rank * n:(rank + 1) * n]
        shuffled = gather_batch(self.embed(self.momentum_encoder, self.momentum_projector,
                                           everything[mine]))
        keys = shuffled[order.argsort()]
        return keys[rank * n:(rank + 1) * n], keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch's keys (rank order) over the oldest entries (first in, first
        out)."""
        size = self.queue.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"moco.queue_size {size} is smaller than the global batch "
                             f"{keys.shape[0]}: raise it")
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(self, images: torch.Tensor, gen: torch.Generator):
        query_view, key_view = self.view(images, gen), self.view(images, gen)
        q = self.queries(query_view)
        k, everyone = self.keys(key_view, gen)
        loss = moco_loss(q, k, self.queue.clone(), self.cfg.tau)
        self.enqueue(everyone)
        return loss, {"loss": loss}

    def after_step(self, progress: float) -> dict[str, float]:
        ema_update(self.momentum_encoder, self.encoder, self.cfg.momentum)
        ema_update(self.momentum_projector, self.projector, self.cfg.momentum)
        return {}

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict]:
        a, b = self.view(images, gen), self.view(images, gen)
        return [{"query view": to_numpy(a[i, 0]), "key view": to_numpy(b[i, 0])}
                for i in range(a.shape[0])]


def moco_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor,
              tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: for L2-normalised query i, the positive is key i and the negatives are the
    K queue entries; cross-entropy over [q.k_i, q.queue] / tau with the positive at index 0."""
    positive = (query * key).sum(dim=1, keepdim=True)
    negatives = query @ queue.t()
    logits = torch.cat([positive, negatives], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long,
                                               device=query.device))
