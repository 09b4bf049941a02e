"""The baselines and ablations: wiring, gradients, exports, and each method's loss by hand.

Method-specific behaviour (SparK's sparsity, Genesis's transformations, MoCo's queue) is tested in
the sections below; everything runs in-process at width 4 and 64-pixel views, except one real
2-rank DeepSpeed job for MoCo (its queue must stay the same on every rank).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cmunet.config import load_config
from cmunet.methods import build_method
from cmunet.methods.genesis import bezier_remap, local_pixel_shuffle, paint
from cmunet.methods.moco import gaussian_blur, jitter, moco_loss
from cmunet.methods.spark import masked_batch_norm, sparse_encode
from cmunet.models.export import load_into
from cmunet.models.unet import UNet
from cmunet.training.distributed import free_port
from cmunet.training.optim import make_optimizer, param_groups
from cmunet.training.pretrain_config import METHOD_NAMES, PretrainConfig
from conftest import ROOT, load_tool

WIDTH, SIZE = 4, 64
TRAINED = [m for m in METHOD_NAMES if m != "none"]


def tiny(method: str, *overrides: str, seed: int = 0):
    """The method as the launcher builds it, at width 4 and 64-pixel views."""
    cfg = load_config(PretrainConfig, None, [
        f"method={method}", f"model.width={WIDTH}", f"view_size={SIZE}", "cmunet.mlp_hidden=32",
        "cmunet.mlp_out=16", "moco.queue_size=12", "moco.mlp_out=8", *overrides])
    torch.manual_seed(seed)
    return build_method(cfg)


def batch(n: int = 4, size: int = 80, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zero_head(method) -> None:
    with torch.no_grad():
        method.pixel_head.weight.zero_()
        method.pixel_head.bias.zero_()


# ---- every method ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shipped_configs_load_and_build(method):
    for name in (f"{method}-cpu.yaml", f"{method}.yaml"):
        cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / name)
        assert cfg.method == method
        with torch.device("meta"):
            build_method(cfg)


@pytest.mark.parametrize("method", TRAINED)
def test_one_step_gives_every_trainable_parameter_a_gradient(method):
    module = tiny(method)
    optimizer = make_optimizer(module, 1e-3, 0.05, (0.9, 0.95))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    loss, logs = module(batch(), gen())
    assert "loss" in logs and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    module.after_step(0.5)
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert id(p) in in_optimizer, name
        else:
            assert p.grad is None and id(p) not in in_optimizer, name


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_export_loads_into_the_fine_tuning_unet(method):
    module = tiny(method)
    state = module.export_state()
    model = UNet(WIDTH)
    report = load_into(model, state)
    decoder = sorted(k for k in model.state_dict() if k.startswith("decoder."))
    assert report.unexpected == []
    if method == "moco":  # encoder only: the decoder stays at its initialisation
        assert sorted(report.missing) == decoder
        assert all(k.startswith("encoder.") for k in report.loaded)
    else:
        assert report.missing == []
        assert sorted(k for k in report.loaded if k.startswith("decoder.")) == decoder
    for key in report.loaded:
        torch.testing.assert_close(model.state_dict()[key], state[key])


def test_parameter_table_in_the_docs_is_current(tmp_path):
    doc = ROOT / "docs" / "methods.md"
    copy = tmp_path / "methods.md"
    copy.write_text(doc.read_text())
    assert load_tool("param_table")(["--write", str(copy)]) == 0
    assert copy.read_text() == doc.read_text(), \
        "the table is stale: python tools/param_table.py --write docs/methods.md"


# ---- none and the CM-UNet ablations ------------------------------------------------------------

def test_none_exports_the_seeded_initialisation_and_trains_nothing():
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/none-cpu.yaml",
                      ["train.epochs=5", "train.zero_stage=1", "seed=7"])
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.zero_stage) == (0, 0, 0)
    module = tiny("none", seed=7)
    assert not any(p.requires_grad for p in module.parameters())
    torch.manual_seed(7)
    reference = UNet(WIDTH).state_dict()
    state = module.export_state()
    assert set(state) == {k for k in reference if not k.startswith("head.")}
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key
    with pytest.raises(RuntimeError, match="no pre-training step"):
        module(batch(), gen())


@pytest.mark.parametrize("method, built, absent", [
    ("cmunet-rec", "pixel_head", "feature_decoder"),
    ("cmunet-con", "feature_decoder", "pixel_head"),
])
def test_ablations_are_cmunet_with_one_branch(method, built, absent):
    cfg = load_config(PretrainConfig, None, [f"method={method}", "cmunet.contrastive=true",
                                             "cmunet.reconstruction=true"])
    assert (cfg.cmunet.reconstruction, cfg.cmunet.contrastive) == (method == "cmunet-rec",
                                                                   method == "cmunet-con")
    module = tiny(method)
    assert type(module).__name__ == "CMUNet"
    assert hasattr(module, built) and not hasattr(module, absent)
    loss, logs = module(batch(), gen())
    term = logs["loss_rec"] if method == "cmunet-rec" else logs["loss_con"]
    terms = {k for k in logs if k.startswith("loss") and not k.endswith("_chance")}
    assert terms == {"loss", "loss_rec" if method == "cmunet-rec" else "loss_con"}
    assert ("con_top1" in logs) == (method == "cmunet-con")  # health only with the branch
    assert loss.item() == pytest.approx(term.item())


# ---- MAE ----------------------------------------------------------------------------------

def test_mae_loss_by_hand():
    module = tiny("mae")
    zero_head(module)  # the prediction is 0 everywhere
    loss, _ = module(batch(), gen(3))
    # a zero prediction against per-patch normalised targets: mean square = (n - 1) / n, n = 256
    assert loss.item() == pytest.approx(255 / 256, rel=1e-4)
    module = tiny("mae", "mae.norm_pix_loss=false")
    zero_head(module)
    view, mask = module.views(batch(), gen(3))
    loss, _ = module(batch(), gen(3))
    masked = [view[i, 0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
              for i in range(4) for r in range(4) for c in range(4) if mask[i, r, c]]
    assert len(masked) == 4 * round(0.75 * 16)  # 75 % of the patches of every image
    expected = torch.stack([(p ** 2).mean() for p in masked]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- SparK --------------------------------------------------------------------------------

def spark_inputs(seed: int = 0):
    module = tiny("spark")
    x = batch(4, SIZE, seed)
    mask = torch.rand(4, 4, 4, generator=gen(seed)) < 0.6
    mask[:, 0, 0], mask[:, 3, 3] = True, False  # at least one masked and one visible patch
    return module, x, mask


def test_spark_leaks_nothing_from_masked_pixels_at_any_scale():
    module, x, mask = spark_inputs()
    visible = ~mask
    pixels = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]
    changed = torch.where(pixels, 100 * torch.randn_like(x), x)
    before = sparse_encode(module.encoder, x, visible)
    after = sparse_encode(module.encoder, changed, visible)
    assert len(before) == 5
    for scale, (a, b) in enumerate(zip(before, after)):
        keep = torch.nn.functional.interpolate(visible[:, None].float(), size=a.shape[-2:])
        torch.testing.assert_close(a * keep, b * keep, msg=f"scale {scale}")
        assert (a * (1 - keep)).abs().max() == 0 and (b * (1 - keep)).abs().max() == 0
        assert (a * keep).abs().sum() > 0


def test_spark_sparse_encoder_equals_the_dense_one_when_nothing_is_masked():
    module, x, _ = spark_inputs()
    everything = torch.ones(4, 4, 4, dtype=torch.bool)
    for train in (True, False):
        module.train(train)
        sparse = sparse_encode(module.encoder, x, everything)
        dense = module.encoder(x)
        for a, b in zip(sparse, dense):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_masked_batch_norm_uses_visible_statistics_and_updates_running_ones():
    bn = torch.nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    visible = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])
    where = visible.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (2, 4, 4)
    rows = x.permute(0, 2, 3, 1)[where]  # 12 visible positions x 3 channels
    out = masked_batch_norm(bn, x, visible)
    expected = (rows - rows.mean(0)) / (rows.var(0, unbiased=False) + bn.eps).sqrt()
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[where], expected)
    assert out.permute(0, 2, 3, 1)[~where].abs().max() == 0
    torch.testing.assert_close(bn.running_mean, 0.1 * rows.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * rows.var(0, unbiased=True))


def test_spark_loss_by_hand_and_exports_only_the_unet():
    module = tiny("spark")
    zero_head(module)
    loss, _ = module(batch(), gen(3))
    assert loss.item() == pytest.approx(255 / 256, rel=1e-4)  # see test_mae_loss_by_hand
    assert {k.split(".")[0] for k in module.export_state()} == {"encoder", "decoder"}


def test_spark_mask_tokens_get_no_weight_decay():
    module = tiny("spark")
    decay, no_decay = param_groups(module, 0.05)
    tokens = {id(p) for p in module.mask_tokens}
    assert len(tokens) == 5 and tokens <= {id(p) for p in no_decay["params"]}
    assert not tokens & {id(p) for p in decay["params"]}
    assert any(p is module.densify_projs[0].weight for p in decay["params"])  # convs still decay


# ---- Models Genesis -------------------------------------------------------------------------

def test_genesis_transforms_the_input_only_and_flips_both():
    images = batch()
    off = ("genesis.shuffle_p=0", "genesis.nonlinear_p=0", "genesis.paint_p=0")
    x0, t0 = tiny("genesis", *off).views(images, gen())
    x1, t1 = tiny("genesis", "genesis.shuffle_p=1", "genesis.nonlinear_p=1",
                  "genesis.paint_p=1").views(images, gen())
    torch.testing.assert_close(t0, t1)  # the target is the same crop whatever the transforms
    torch.testing.assert_close(x0, t0)  # no transformation: the input is the target
    assert all(not torch.allclose(a, b) for a, b in zip(x1, t1))  # every input transformed
    ramp = torch.linspace(0, 1, 80)
    ramps = (ramp[None, :] + 2 * ramp[:, None]).expand(4, 1, 80, 80).contiguous()
    _, kept = tiny("genesis", "genesis.flip_p=0", *off).views(ramps, gen())
    assert (kept.diff(dim=-1) > 0).all() and (kept.diff(dim=-2) > 0).all()
    x, flipped = tiny("genesis", "genesis.flip_p=1", *off).views(ramps, gen())
    assert (flipped.diff(dim=-1) < 0).all() and (flipped.diff(dim=-2) < 0).all()
    torch.testing.assert_close(x, flipped)  # the flip is in the input as well


def test_genesis_loss_by_hand():
    module = tiny("genesis")
    zero_head(module)
    loss, _ = module(torch.full((2, 1, 80, 80), 3.0), gen())
    assert loss.item() == pytest.approx(9.0)  # the target is 3 everywhere, the prediction 0


def test_local_pixel_shuffle_only_moves_pixels_within_small_blocks():
    h = w = SIZE
    x = torch.arange(2 * h * w, dtype=torch.float).view(2, 1, h, w)
    out = local_pixel_shuffle(x, torch.tensor([True, False]), gen())
    assert torch.equal(out[1], x[1])  # not selected: untouched
    source = out[0, 0].long()  # each value names the pixel it came from
    assert source.min() >= 0 and source.max() < h * w
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = SIZE // 10
    assert (source // w - rows).abs().max() < block and (source % w - cols).abs().max() < block
    assert (source != rows * w + cols).float().mean() > 0.5  # most pixels moved


def test_bezier_remap_is_monotonic_in_unit_range():
    u = torch.rand(16, 1, 8, 8, generator=gen())
    out = bezier_remap(u, torch.ones(16, dtype=torch.bool), gen())
    assert out.min() >= 0 and out.max() <= 1
    directions = set()
    for a, b in zip(u.flatten(1), out.flatten(1)):
        steps = b[a.argsort()].diff()
        assert (steps >= -1e-5).all() or (steps <= 1e-5).all()
        directions.add(bool((steps >= -1e-5).all()))
    assert directions == {True, False}  # both increasing and inverting maps occur
    ends = bezier_remap(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2), torch.ones(1, dtype=torch.bool),
                        gen(5))
    assert sorted(ends.flatten().tolist()) == pytest.approx([0.0, 1.0], abs=1e-6)
    assert torch.equal(bezier_remap(u, torch.zeros(16, dtype=torch.bool), gen()), u)


def test_in_painting_fills_boxes_and_out_painting_keeps_boxes():
    n = 64
    u = torch.full((n, 1, SIZE, SIZE), 0.5)
    yes, no = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    changed = (paint(u, yes, no, gen()) != 0.5).float().mean(dim=(1, 2, 3))
    assert changed.max() <= 5 * (SIZE // 3) ** 2 / SIZE**2 and changed.mean() > 0.05
    kept = (paint(u, no, yes, gen()) == 0.5).float().mean(dim=(1, 2, 3))
    smallest = (SIZE - 4 * SIZE // 7) ** 2 / SIZE**2
    assert kept.min() >= smallest and kept.max() < 1
    assert torch.equal(paint(u, no, no, gen()), u)


# ---- MoCo ---------------------------------------------------------------------------------

def test_moco_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    tau = 0.2
    # query 0: logits [1, 0, 1, -1] / tau, positive first; query 1: [0, 1, 0, 0] / tau
    l0 = -math.log(math.exp(5) / (math.exp(5) + 1 + math.exp(5) + math.exp(-5)))
    l1 = -math.log(1 / (1 + math.exp(5) + 1 + 1))
    assert moco_loss(q, k, queue, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


@pytest.mark.slow
def test_moco_queue_is_fifo_and_excludes_the_current_batch():
    module = tiny("moco")  # queue of 12 keys, batch of 4
    images = batch()
    for step in range(4):
        queue_before, ptr = module.queue.clone(), int(module.queue_ptr)
        loss, _ = module(images, gen(step))
        g = gen(step)  # the same draws again: the step's views, query and keys
        query_view, key_view = module.view(images, g), module.view(images, g)
        with torch.no_grad():
            q = module.queries(query_view)
            k, everyone = module.keys(key_view, g)
        assert torch.equal(k, everyone)  # one rank: the global batch is this one
        assert loss.item() == pytest.approx(moco_loss(q, k, queue_before, 0.2).item(), rel=1e-5)
        slots = [(ptr + i) % 12 for i in range(4)]
        torch.testing.assert_close(module.queue[slots], k)  # the oldest 4 replaced ...
        others = [i for i in range(12) if i not in slots]
        assert torch.equal(module.queue[others], queue_before[others])  # ... nothing else
        assert int(module.queue_ptr) == (ptr + 4) % 12


def test_moco_one_rank_encodes_in_shuffled_bn_sub_batches():
    module = tiny("moco")  # moco.bn_splits 2 by default
    x = batch(8, SIZE)
    seen = {"key": [], "query": []}
    module.momentum_encoder.register_forward_pre_hook(lambda m, a: seen["key"].append(a[0]))
    module.encoder.register_forward_pre_hook(lambda m, a: seen["query"].append(a[0]))
    with torch.no_grad():
        keys, _ = module.keys(x, gen(0))
        queries = module.queries(x)
    key_parts, query_parts = list(seen["key"]), list(seen["query"])
    assert [len(part) for part in key_parts] == [4, 4]  # two BN batches ...
    order = [next(i for i in range(8) if torch.equal(image, x[i]))
             for image in torch.cat(key_parts)]
    assert sorted(order) == list(range(8)) and set(order[:4]) != {0, 1, 2, 3}  # ... shuffled
    with torch.no_grad():  # each sub-batch is its own BN batch, and key i is image i's
        parts = torch.cat([module.embed(module.momentum_encoder, module.momentum_projector, p)
                           for p in key_parts])
        whole = module.embed(module.momentum_encoder, module.momentum_projector, x)
    torch.testing.assert_close(keys[order], parts)
    assert not torch.allclose(keys, whole, atol=1e-4)  # not one batch (train-mode BN)
    assert [len(p) for p in query_parts] == [4, 4]  # queries: contiguous sub-batches
    torch.testing.assert_close(torch.cat(query_parts), x)
    torch.testing.assert_close(queries[:4], module.queries(x[:4].repeat(2, 1, 1, 1))[:4])
    module.eval()  # batch-independent BN: keys come back in the images' order
    with torch.no_grad():
        torch.testing.assert_close(module.keys(x, gen(1))[0], module.embed(
            module.momentum_encoder, module.momentum_projector, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="bn_splits"):
        tiny("moco", "moco.bn_splits=3").keys(x[:5], gen())


def test_moco_key_encoder_moves_by_its_momentum():
    module = tiny("moco")
    optimizer = make_optimizer(module, 1e-2, 0.05, (0.9, 0.95))
    loss, _ = module(batch(), gen())
    loss.backward()
    optimizer.step()
    keys = [p.clone() for p in module.momentum_encoder.parameters()]
    module.after_step(0.1)
    for k0, q, k1 in zip(keys, module.encoder.parameters(), module.momentum_encoder.parameters()):
        torch.testing.assert_close(k1, 0.999 * k0 + 0.001 * q)
    assert any(not torch.equal(a, b) for a, b in zip(keys, module.momentum_encoder.parameters()))


def test_moco_augmentations():
    x = batch(3, 32)
    on = torch.tensor([True, True, False])
    out = jitter(x, on, 0.4, 0.4, gen())
    assert torch.equal(out[2], x[2])
    for a, b in zip(x[:2], out[:2]):  # stays in the image's own range
        assert b.min() >= a.min() - 1e-5 and b.max() <= a.max() + 1e-5
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]), 2.0)
    torch.testing.assert_close(blurred[0], x[0])  # sigma 0: unchanged
    assert blurred[2].std() < blurred[1].std() < x[1].std()  # white noise: smoothed, more so
    torch.testing.assert_close(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.05,
                               rtol=0)


def _moco_rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    module = tiny("moco", "moco.queue_size=20")  # 3 steps x 8 keys: wraps around
    written, gathers = [], []
    real_all_gather = dist.all_gather

    def counted(*args, **kwargs):
        gathers[-1] += 1
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counted
    for step in range(3):
        images = batch(4, 80, seed=10 * step + rank)  # every rank its own images
        gathers.append(0)
        module(images, gen(100 * step + rank))
        written.append(module.queue.clone())
    dist.all_gather = real_all_gather
    # batch-independent keys (eval-mode BN with statistics equal on both ranks): the keys of the
    # shuffled global batch, encoded on whichever rank, must come back to their own images
    for bn in module.momentum_encoder.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
    module.momentum_encoder.eval()
    view = batch(4, SIZE, seed=99 + rank)
    with torch.no_grad():
        shuffled, everyone = module.keys(view, gen(rank))
        local = module.embed(module.momentum_encoder, module.momentum_projector, view)
    out[rank] = {"queues": written, "ptr": int(module.queue_ptr), "gathers": gathers,
                 "unshuffled": torch.allclose(shuffled, local, atol=1e-5),
                 "mine in everyone": torch.equal(everyone[4 * rank:4 * rank + 4], shuffled)}
    dist.destroy_process_group()


@pytest.mark.slow
def test_moco_queue_is_identical_on_two_gloo_ranks():
    out = mp.Manager().dict()
    mp.spawn(_moco_rank, args=(free_port(), out), nprocs=2)
    for a, b in zip(out[0]["queues"], out[1]["queues"]):
        assert torch.equal(a, b)
    assert out[0]["ptr"] == out[1]["ptr"] == 3 * 8 % 20
    assert out[0]["unshuffled"] and out[1]["unshuffled"]
    assert out[0]["mine in everyone"] and out[1]["mine in everyone"]
    assert out[0]["gathers"] == [2, 2, 2]  # the key views and the keys, once each


@pytest.mark.slow
def test_moco_deepspeed_two_ranks(tiny_shards, tmp_path):
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "deepspeed"), "--num_gpus", "2", f"--master_port={free_port()}",
         str(ROOT / "launch/pretrain.py"),
         "--config", str(ROOT / "configs/pretrain/moco-cpu.yaml"), f"data.shards={tiny_shards}",
         "out=OUT", "view_size=64", "model.width=8", "moco.queue_size=36", "moco.mlp_out=16",
         "data.num_workers=1", "train.micro_batch=4", "train.epochs=2", "train.log_every=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "2 rank(s) on cpu" in result.stdout + result.stderr
    export = tmp_path / "OUT" / "export"
    assert {k.split(".")[0] for k in load_file(export / "model.safetensors")} == {"encoder"}
    checkpoint = sorted((tmp_path / "OUT" / "checkpoints").glob("step_*"))[-1]
    steps = int(checkpoint.name.split("_")[1])
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert int(module["queue_ptr"]) == steps * 2 * 4 % 36  # global batches (2 ranks x 4) enqueued


@pytest.mark.slow
def test_none_runs_through_the_launcher_and_exports_the_seeded_unet(tiny_shards, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
         str(ROOT / "configs/pretrain/none-cpu.yaml"), f"data.shards={tiny_shards}", "out=OUT",
         "model.width=8", "view_size=64", "train.epochs=1", "seed=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "0 steps" in result.stdout
    state = load_file(tmp_path / "OUT" / "export" / "model.safetensors")
    torch.manual_seed(3)
    reference = UNet(8).state_dict()
    assert set(state) == {k for k in reference if not k.startswith("head.")}
    for key, value in state.items():
        assert torch.equal(value, reference[key].float()), key
