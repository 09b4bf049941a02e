"""Losses of the pre-training methods: small functions, each tested against a hand computation."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cmunet.methods.masking import patchify


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int,
                     norm_pix: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss: mean squared error over the MASKED patches only.

    pred, target: (B, C, H, W); mask: (B, H/p, W/p) bool, True = masked. With ``norm_pix`` each
    target patch is normalised by its own mean and variance (MAE's ``norm_pix_loss``).
    """
    pred_p, target_p = patchify(pred.float(), patch), patchify(target.float(), patch)
    if norm_pix:
        mean = target_p.mean(dim=-1, keepdim=True)
        var = target_p.var(dim=-1, keepdim=True)
        target_p = (target_p - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred_p - target_p) ** 2).mean(dim=-1)
    weights = mask.flatten(1).float()
    # 0 when no patch is masked; no check of that here: it would make the host wait for the GPU
    return (per_patch * weights).sum() / weights.sum().clamp_min(1)


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); no gradient flows through it.
    Identity without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def info_nce(query: torch.Tensor, keys: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """InfoNCE with cosine similarity, scaled by 2*tau (MoCo v3 / CMAE).

    query: (B, D) local predictions; keys: (N, D) targets of the GLOBAL batch, where the positive
    of query i is keys[offset + i] and every other key is a negative.
    """
    q = F.normalize(query.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    logits = q @ k.t() / tau
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return 2 * tau * F.cross_entropy(logits, labels)


def global_info_nce(query: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE against the targets of all ranks (all-gathered): negatives = the global batch."""
    keys = gather_batch(target.detach())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return info_nce(query, keys, tau, offset=rank * query.shape[0])
