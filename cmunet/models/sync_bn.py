"""Batch norm over the global batch (every rank's samples), on gloo as on NCCL.

``torch.nn.SyncBatchNorm`` runs on GPUs only; this one works wherever ``torch.distributed``
does, so the CPU tests run the same code as a GPU cluster. In training, with an initialised
process group of more than one rank, the mean and variance are those of the global batch: two
all-reduces (sums and counts, then squared deviations) whose backward all-reduces the
gradients, so every rank's input receives the gradient of the whole batch's loss (as torch's
SyncBatchNorm). Running
statistics are updated with the global (unbiased) variance. Otherwise -- one process, eval mode --
it is plain batch norm. Parameters and buffers are those of ``nn.BatchNorm1d/2d``: state dicts
load either way. CMAE and MoCo v3 synchronise the batch norm of their heads: per-rank statistics
would make what the heads learn depend on the number of GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over dims (0, 2, 3, ...) of the global batch; channels at dim 1."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_full((1,), x.numel() / x.shape[1])
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm*`` in ``module`` by a :class:`GlobalBatchNorm` holding the
    same parameters and buffers (in place); returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(module, name, new.to(next(child.buffers(), torch.empty(0)).device))
        else:
            use_global_batch_norm(child)
    return module
