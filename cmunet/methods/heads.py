"""Projection/prediction MLPs and the exponential moving average (momentum encoder) update."""

from __future__ import annotations

import math

import torch
from torch import nn

from cmunet.models.sync_bn import GlobalBatchNorm


class MLP(nn.Sequential):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear: the CMAE projector and predictor (two hidden layers).
    Batch norm over the global batch, as CMAE and MoCo v3 (:class:`GlobalBatchNorm`).

    Runs in fp32, also under bf16 autocast. Its products are matrix-vector-like (16-256 rows
    against 2048² weights): their cost is moving the weights, and autocast would add a bf16
    copy of every weight in each forward and an fp32 copy of every weight gradient in the
    backward. At width 16 and 128² views the fp32 heads made the CM-UNet step 2 % faster on a
    CPU (the heads do under 1 % of its FLOPs)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__(
            nn.Linear(dim_in, hidden, bias=False), GlobalBatchNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), GlobalBatchNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, dim_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def cosine_momentum(progress: float, start: float, end: float = 1.0) -> float:
    """EMA momentum rising from ``start`` to ``end`` on a half cosine over training (BYOL)."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * source for parameters; buffers (BN running
    statistics, counters) are copied, not averaged. One multi-tensor kernel each (``_foreach``),
    not one per tensor."""
    targets, sources = list(target.parameters()), list(source.parameters())
    if targets:
        torch._foreach_lerp_(targets, sources, 1 - momentum)
    targets, sources = list(target.buffers()), list(source.buffers())
    if targets:
        torch._foreach_copy_(targets, sources)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradient (a momentum encoder's starting point)."""
    import copy

    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone
