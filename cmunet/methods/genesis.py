"""Models Genesis on the UNet (Zhou et al., "Models Genesis", Medical Image Analysis 67, 2021):
restore the image from a transformed copy, in 2-D and batched on the device.

View: a random resized crop (scale 0.2-1.0; Models Genesis crops sub-volumes at several scales)
with horizontal and vertical flips, each with p = 0.4 (the original's flip_rate). Flips are
augmentation: they apply to input and target alike. The TARGET is this view; the INPUT is the view
after the Models Genesis transformations, in the original order and with its probabilities:

1. local pixel shuffling (p 0.5): many small blocks (sides 1..S/10) each permuted at random;
   the original draws 10,000 blocks in a 64x64x32 volume, covering it about 1.87 times, and we
   draw as many blocks as cover the image that often (:func:`local_pixel_shuffle`);
2. non-linear intensity transformation (p 0.9): a monotonic cubic Bezier curve through (0, 0) and
   (1, 1) with two random control points, increasing or (half the time) decreasing
   (:func:`bezier_remap`);
3. painting (p 0.9): out-painting (80 % of the time: everything but a few large boxes replaced by
   uniform noise) or in-painting (20 %: up to 5 boxes of sides S/6..S/3 filled with noise)
   (:func:`paint`).

Models Genesis works on intensities in [0, 1]; our images are z-scored, so every image is mapped
to [0, 1] by its own minimum and maximum for the transformations and back afterwards. The UNet
(encoder, decoder, 1x1 conv) restores the view; the loss is the MSE over the whole image. Every
random draw is per image, from the step's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmunet.config import check
from cmunet.methods.base import PretrainMethod, to_numpy
from cmunet.methods.views import crop, random_boxes, random_flips
from cmunet.models.unet import Decoder, Encoder

SHUFFLE_COVER = 10_000 * 3.5 * 3.5 * 2 / (64 * 64 * 32)  # original: blocks x mean block / volume


@dataclass
class GenesisConfig:
    flip_p: float = 0.4  # per axis (the original flips random axes while rand < 0.4)
    shuffle_p: float = 0.5
    nonlinear_p: float = 0.9
    paint_p: float = 0.9
    outpaint_p: float = 0.8  # share of painted images that are out-painted (else in-painted)
    crop_scale: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self):
        for name in ("flip_p", "shuffle_p", "nonlinear_p", "paint_p", "outpaint_p"):
            check(0 <= getattr(self, name) <= 1, name, "must be a probability in [0, 1]")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale",
              "must be [low, high] with 0 < low <= high <= 1")


def _chance(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def _randint(low: int, high: int, shape: tuple, gen: torch.Generator,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive, like Python's random.randint)."""
    return torch.randint(low, high + 1, shape, generator=gen, device=device)


def local_pixel_shuffle(x: torch.Tensor, apply: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Models Genesis's local pixel shuffling of the images where ``apply`` (B,) is True.

    Blocks of random sides 1..S/10 at random places are each filled with a random permutation of
    their own ORIGINAL pixels, one after another, so a later block overwrites an earlier one where
    they overlap: every output pixel is an original pixel of the last block covering it (or
    itself), never from farther away than a block side. ``x`` is (B, 1, H, W); all blocks of all
    images are drawn and applied at once.
    """
    b, _, h, w = x.shape
    m = max(1, min(h, w) // 10)
    blocks = max(1, round(SHUFFLE_COVER * h * w / ((1 + m) / 2) ** 2))
    dev = x.device
    bh, bw = _randint(1, m, (b, blocks), gen, dev), _randint(1, m, (b, blocks), gen, dev)
    y0 = (torch.rand(b, blocks, generator=gen, device=dev) * (h - bh + 1)).long()
    x0 = (torch.rand(b, blocks, generator=gen, device=dev) * (w - bw + 1)).long()
    slot = torch.arange(m * m, device=dev)
    row, col = slot // m, slot % m  # slots of an m x m window, row-major
    inside = (row < bh[..., None]) & (col < bw[..., None])  # (b, blocks, m*m)
    # a random order of each block's inside slots: sort random keys, outside slots last
    keys = torch.rand(b, blocks, m * m, generator=gen, device=dev).masked_fill(~inside, 2.0)
    source = keys.argsort(dim=-1)
    # destination j (< block area) is the j-th inside pixel in raster order
    width = bw[..., None]
    dest = (y0[..., None] + slot // width) * w + x0[..., None] + slot % width
    src = (y0[..., None] + row[source]) * w + x0[..., None] + col[source]
    valid = slot < (bh * bw)[..., None]
    # the last block covering a pixel wins: scatter-max of (block number, source) codes
    n = b * h * w
    base = (torch.arange(b, device=dev) * h * w)[:, None, None]  # flat indices over the batch
    dest, src = base + dest.clamp(max=h * w - 1), base + src.clamp(max=h * w - 1)
    number = torch.arange(blocks, device=dev)[None, :, None]
    code = torch.where(valid & apply[:, None, None], number * n + src, -1)
    best = torch.full((n,), -1, device=dev, dtype=torch.long)
    best.scatter_reduce_(0, dest.flatten(), code.flatten(), reduce="amax")
    index = torch.where(best >= 0, best % n, torch.arange(n, device=dev))
    return x.flatten()[index].view_as(x)


def bezier_remap(u: torch.Tensor, apply: torch.Tensor, gen: torch.Generator,
                 samples: int = 1000) -> torch.Tensor:
    """Models Genesis's non-linear transformation of [0, 1] images where ``apply`` is True.

    A cubic Bezier curve from (0, 0) to (1, 1) with two control points uniform in the unit
    square, sampled at ``samples`` points; its x values are sorted and, half of the time, its y
    values too (an increasing map), else the y values keep their curve order (an inverting map,
    as in the original); pixels are mapped by linear interpolation.
    """
    b, dev = u.shape[0], u.device
    controls = torch.rand(b, 2, 2, generator=gen, device=dev)  # (b, point, xy)
    points = torch.cat([torch.zeros(b, 1, 2, device=dev), controls,
                        torch.ones(b, 1, 2, device=dev)], dim=1)  # P0..P3
    t = torch.linspace(0, 1, samples, device=dev)
    # the original's Bernstein order: weight of P_i is C(3,i) t^(3-i) (1-t)^i; elementwise
    # products, not a matmul, so that autocast cannot round the curve to bf16
    basis = torch.stack([math.comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    curve = (basis[None, :, :, None] * points[:, :, None, :]).sum(dim=1)  # (b, t, xy)
    xs = curve[..., 0].sort(dim=1).values
    increasing = _chance(b, 0.5, gen, dev)
    ys = torch.where(increasing[:, None], curve[..., 1].sort(dim=1).values, curve[..., 1])
    flat = u.flatten(1).contiguous()
    i = torch.searchsorted(xs, flat).clamp(1, samples - 1)
    x_lo, x_hi = xs.gather(1, i - 1), xs.gather(1, i)
    y_lo, y_hi = ys.gather(1, i - 1), ys.gather(1, i)
    frac = ((flat - x_lo) / (x_hi - x_lo).clamp_min(1e-12)).clamp(0, 1)
    mapped = (y_lo + frac * (y_hi - y_lo)).view_as(u)
    return torch.where(apply[:, None, None, None], mapped, u)


def _box_masks(h: int, w: int, top: torch.Tensor, left: torch.Tensor, bh: torch.Tensor,
               bw: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) bool union of the active boxes; arguments (B, K)."""
    rows = torch.arange(h, device=top.device)[None, None, :, None]
    cols = torch.arange(w, device=top.device)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))
    return (inside & active[..., None, None]).any(dim=1, keepdim=True)


def _boxes(b: int, h: int, w: int, low: tuple[int, int], high: tuple[int, int], count: int,
           gen: torch.Generator, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(top, left, height, width, active), each (b, count): boxes with sides in [low, high], at
    least 3 pixels from the border; box k is active while k + 1 successive 0.95 chances hold (the
    original's ``while`` loop)."""
    bh = _randint(low[0], high[0], (b, count), gen, dev)
    bw = _randint(low[1], high[1], (b, count), gen, dev)
    top = 3 + (torch.rand(b, count, generator=gen, device=dev) * (h - bh - 5).clamp_min(1)).long()
    left = 3 + (torch.rand(b, count, generator=gen, device=dev) * (w - bw - 5).clamp_min(1)).long()
    active = (torch.rand(b, count, generator=gen, device=dev) < 0.95).cumprod(dim=1).bool()
    return top, left, bh, bw, active


def paint(u: torch.Tensor, inpaint: torch.Tensor, outpaint: torch.Tensor,
          gen: torch.Generator) -> torch.Tensor:
    """Models Genesis's in-painting (up to 5 boxes, sides S/6..S/3, filled with uniform noise)
    and out-painting (uniform noise outside 1 to 5 boxes of sides S - 4S/7..S - 3S/7) of [0, 1]
    images, per image; ``inpaint`` and ``outpaint`` (B,) are exclusive."""
    b, _, h, w = u.shape
    dev = u.device
    noise = torch.rand(u.shape, generator=gen, device=dev, dtype=u.dtype)
    top, left, bh, bw, active = _boxes(b, h, w, (h // 6, w // 6), (h // 3, w // 3), 5, gen, dev)
    holes = _box_masks(h, w, top, left, bh, bw, active)
    top, left, bh, bw, active = _boxes(b, h, w, (h - 4 * h // 7, w - 4 * w // 7),
                                       (h - 3 * h // 7, w - 3 * w // 7), 5, gen, dev)
    active[:, 0] = True  # out-painting always keeps its first window
    windows = _box_masks(h, w, top, left, bh, bw, active)
    painted = torch.where(inpaint[:, None, None, None] & holes, noise, u)
    return torch.where(outpaint[:, None, None, None] & ~windows, noise, painted)


class Genesis(PretrainMethod):
    name = "genesis"

    def __init__(self, cfg: GenesisConfig, width: int, view_size: int):
        super().__init__()
        if view_size % 16:
            raise ValueError(f"view_size {view_size} must be a multiple of 16")
        self.cfg, self.view_size = cfg, view_size
        self.encoder = Encoder(width)
        self.decoder = Decoder(width)
        self.pixel_head = nn.Conv2d(width, 1, kernel_size=1)

    def views(self, images: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(transformed input, target): the target is the flipped crop, the input its transform."""
        c, n, dev = self.cfg, images.shape[0], images.device
        boxes = random_boxes(n, gen, dev, c.crop_scale)
        boxes[:, 3] *= random_flips(n, gen, dev, c.flip_p)  # a negative half-height flips rows
        target = crop(images, boxes, random_flips(n, gen, dev, c.flip_p), self.view_size).float()
        low = target.amin(dim=(1, 2, 3), keepdim=True)
        span = (target.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
        u = (target - low) / span
        u = local_pixel_shuffle(u, _chance(n, c.shuffle_p, gen, dev), gen)
        u = bezier_remap(u, _chance(n, c.nonlinear_p, gen, dev), gen)
        painted = _chance(n, c.paint_p, gen, dev)
        outpaint = _chance(n, c.outpaint_p, gen, dev)
        u = paint(u, painted & ~outpaint, painted & outpaint, gen)
        return (low + span * u).to(images.dtype), target.to(images.dtype)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_head(self.decoder(self.encoder(x.contiguous(
            memory_format=torch.channels_last))))

    def forward(self, images: torch.Tensor, gen: torch.Generator):
        x, target = self.views(images, gen)
        loss = F.mse_loss(self.restore(x).float(), target.float())
        return loss, {"loss": loss}

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict]:
        x, target = self.views(images, gen)
        restored = self.restore(x)
        return [{"input": to_numpy(x[i, 0]), "restored": to_numpy(restored[i, 0]),
                 "target": to_numpy(target[i, 0])} for i in range(x.shape[0])]
