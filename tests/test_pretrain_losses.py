"""Pre-training losses against hand computations, and InfoNCE over 2 gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmunet.methods.heads import cosine_momentum
from cmunet.methods.losses import (contrastive_health, global_info_nce, info_nce,
                                   masked_patch_mse)
from cmunet.methods.masking import patchify, pixel_mask, random_patch_mask
from cmunet.training.distributed import free_port


def test_masked_mse_counts_only_masked_patches_by_hand():
    # one 1x4x4 image, 2x2 patches -> 4 patches; patch values chosen by hand
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    pred[0, 0, :2, :2] = 1.0  # patch 0 wrong by 1 everywhere -> MSE 1
    pred[0, 0, :2, 2:] = 3.0  # patch 1 wrong by 3 -> MSE 9
    mask = torch.tensor([[[True, False], [False, False]]])
    assert masked_patch_mse(pred, target, mask, 2, norm_pix=False).item() == pytest.approx(1.0)
    mask = torch.tensor([[[True, True], [False, False]]])
    assert masked_patch_mse(pred, target, mask, 2, norm_pix=False).item() == pytest.approx(5.0)


def test_norm_pix_normalises_each_target_patch():
    target = torch.tensor([[1.0, 3.0], [1.0, 3.0]]).view(1, 1, 2, 2)  # mean 2, unbiased var 4/3
    pred = torch.zeros(1, 1, 2, 2)
    z = 1 / math.sqrt(4 / 3 + 1e-6)  # every normalised value is +-z
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    assert masked_patch_mse(pred, target, mask, 2).item() == pytest.approx(z * z, rel=1e-5)


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tau = 0.5
    # query 0: logits [2, 2] -> CE = log 2; query 1: logits [0, 0] -> CE = log 2
    expected = 2 * tau * math.log(2)
    assert info_nce(q, k, tau).item() == pytest.approx(expected)
    # positives at an offset: query i pairs with key i + 1
    k3 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[0.0, 2.0, 0.0], [2.0, 0.0, 2.0]])
    ce = (-(logits[0, 1] - logits[0].logsumexp(0)) - (logits[1, 2] - logits[1].logsumexp(0))) / 2
    assert info_nce(q, k3, tau, offset=1).item() == pytest.approx(2 * tau * ce.item(), rel=1e-6)


def _rank_loss(rank, port, queries, keys, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = queries.shape[0] // 2
    local = slice(rank * half, (rank + 1) * half)
    loss, health = global_info_nce(queries[local], keys[local], 0.07)
    dist.all_reduce(loss)  # mean over ranks = mean over the global batch
    top1 = health["con_top1"].clone()
    dist.all_reduce(top1)
    out[rank] = (loss.item() / 2, top1.item() / 2, health["con_top1_chance"].item())
    dist.destroy_process_group()


def test_global_info_nce_on_two_gloo_ranks_equals_single_process():
    torch.manual_seed(0)
    queries, keys = torch.randn(8, 16), torch.randn(8, 16)
    out = mp.Manager().dict()
    mp.spawn(_rank_loss, args=(free_port(), queries, keys, out), nprocs=2)
    single = info_nce(queries, keys, 0.07).item()
    top1 = contrastive_health(queries, keys, 0.07)["con_top1"].item()
    for rank in (0, 1):  # the positives sit at each rank's offset among the gathered keys
        assert out[rank][0] == pytest.approx(single, rel=1e-6)
        assert out[rank][1:] == pytest.approx((top1, 1 / 8))


def test_contrastive_health_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    queries = torch.tensor([[2.0, 0.1], [1.0, 0.0], [0.0, -1.0]])  # nearest keys: 0, 0, 2
    health = contrastive_health(queries, keys, tau=0.1)
    assert health["con_top1"].item() == pytest.approx(1 / 3)
    assert health["con_top1_chance"].item() == pytest.approx(1 / 3)
    assert health["loss_con_chance"].item() == pytest.approx(0.2 * math.log(3))
    assert health["std_healthy"].item() == pytest.approx(1 / math.sqrt(2))
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert health["key_std"].item() == pytest.approx(unit.std(dim=0).mean().item())
    # positives at an offset: query i pairs with key i + 1
    assert contrastive_health(keys[1:], keys, 0.1, offset=1)["con_top1"].item() == 1.0


def test_collapsed_embeddings_score_chance_everywhere():
    """All keys equal: every figure sits at its collapsed value."""
    queries, keys = torch.randn(6, 4), torch.ones(6, 4)
    health = contrastive_health(queries, keys, tau=0.2)
    assert health["key_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert info_nce(queries, keys, 0.2).item() == pytest.approx(health["loss_con_chance"].item())
    collapsed = contrastive_health(keys, keys, tau=0.2)
    assert collapsed["query_std"].item() == pytest.approx(0.0, abs=1e-6)


def test_masks_are_per_image_with_the_exact_ratio():
    gen = torch.Generator().manual_seed(0)
    mask = random_patch_mask(16, 8, 0.65, gen, torch.device("cpu"))
    assert (mask.flatten(1).sum(1) == round(0.65 * 64)).all()
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 16  # no two images alike
    pixels = pixel_mask(mask, 16)
    assert pixels.shape == (16, 1, 128, 128) and pixels[0, 0, :16, :16].unique().numel() == 1


def test_patchify_round_trip_layout():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    patches = patchify(x, 2)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right patch, row-major


def test_momentum_schedule_runs_from_start_to_one():
    assert cosine_momentum(0.0, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(0.5, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(1.0, 0.996) == pytest.approx(1.0)
