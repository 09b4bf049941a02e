"""Losses of the pre-training methods: small functions, each tested against a hand computation."""

from __future__ import annotations

import math

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


def global_info_nce(query: torch.Tensor, target: torch.Tensor,
                    tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE against the targets of all ranks (all-gathered): negatives = the global batch.
    Returns the loss and the branch's health (:func:`contrastive_health`)."""
    keys = gather_batch(target.detach())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    offset = rank * query.shape[0]
    return info_nce(query, keys, tau, offset), contrastive_health(query, keys, tau, offset)


@torch.no_grad()
def contrastive_health(query: torch.Tensor, keys: torch.Tensor, tau: float,
                       offset: int = 0) -> dict[str, torch.Tensor]:
    """Whether a contrastive branch learns, next to the value each figure has when it does not.

    * ``con_top1``: the fraction of (local) queries whose most similar key among the global
      batch is their own positive, against ``con_top1_chance`` = 1 / the number of keys;
    * ``query_std``, ``key_std``: the standard deviation over the batch of the l2-normalised
      queries (local) and keys (global), averaged over dimensions: about ``std_healthy`` =
      1/sqrt(d) for embeddings spread over the sphere, 0 when they collapse to one point
      (SimSiam's monitor);
    * ``loss_con_chance``: :func:`info_nce` when every similarity is equal (a collapsed or
      untrained branch), 2 tau log(number of keys).
    """
    q = F.normalize(query.detach().float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    top1 = ((q @ k.t()).argmax(dim=1) == labels).float().mean()
    n, d = k.shape
    constant = {"con_top1_chance": 1 / n, "std_healthy": 1 / math.sqrt(d),
                "loss_con_chance": 2 * tau * math.log(n)}
    return {"con_top1": top1, "query_std": q.std(dim=0).mean(), "key_std": k.std(dim=0).mean(),
            **{name: torch.tensor(value, device=q.device) for name, value in constant.items()}}
