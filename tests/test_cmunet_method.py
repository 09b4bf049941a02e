"""The CM-UNet module: gradients everywhere, EMA outside the optimizer, masks, views, LR rule."""

from __future__ import annotations

import pytest
import torch

from cmunet.methods.cmunet import CMUNet, CMUNetConfig, spatial_mean
from cmunet.methods.heads import ema_update
from cmunet.training.optim import make_optimizer, param_groups, scaled_lr, warmup_cosine


def small(**kw) -> CMUNet:
    torch.manual_seed(0)
    return CMUNet(CMUNetConfig(mlp_hidden=32, mlp_out=16, **kw), width=4, view_size=64)


def images(n=4, size=80):
    torch.manual_seed(1)
    return torch.randn(n, 1, size, size)


def test_every_trainable_parameter_gets_a_gradient():
    method = small()
    loss, logs = method(images(), torch.Generator().manual_seed(0))
    loss.backward()
    assert {"loss_rec", "loss_con", "loss"} <= set(logs)
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_heads_run_in_fp32_under_bf16_autocast():
    """The projector/predictor MLPs leave autocast: fp32 output, and the same numbers as the
    head computes on the same (bf16-valued) input without autocast."""
    from cmunet.methods.heads import MLP

    torch.manual_seed(0)
    head, x = MLP(8, 32, 16), torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(x)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, head(x.float()))


def test_ema_modules_are_outside_the_optimizer_and_follow_the_rule():
    method = small()
    optimizer = make_optimizer(method, 1e-3, 0.05, (0.9, 0.95))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    ema = list(method.momentum_encoder.parameters()) + list(method.momentum_projector.parameters())
    assert ema and not any(id(p) in in_optimizer for p in ema)
    loss, _ = method(images(), torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    online = [p.clone() for p in method.encoder.parameters()]
    logs = method.after_step(progress=0.0)
    m = logs["ema_momentum"]
    assert m == pytest.approx(0.996)
    for t0, s, t1 in zip(before, online, method.momentum_encoder.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.momentum_encoder.parameters()))


def test_ema_copies_buffers():
    a, b = small(), small()
    b.encoder.stem[1].running_mean.fill_(3.0)
    ema_update(a.encoder, b.encoder, 0.99)
    assert torch.equal(a.encoder.stem[1].running_mean, b.encoder.stem[1].running_mean)


def test_reconstruction_loss_covers_exactly_the_masked_patches():
    method = small(contrastive=False)
    online, _, mask = method.views(images(), torch.Generator().manual_seed(3))
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 4  # one mask per image
    from cmunet.methods.losses import masked_patch_mse
    pred = torch.zeros_like(online)
    base = masked_patch_mse(pred, online, mask, 16)
    visible = ~mask[0]
    r, c = [int(i) for i in visible.nonzero()[0]]
    changed = pred.clone()
    changed[0, 0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 100.0
    assert masked_patch_mse(changed, online, mask, 16) == base  # visible patch: no effect
    r, c = [int(i) for i in mask[0].nonzero()[0]]
    changed[0, 0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 100.0
    assert masked_patch_mse(changed, online, mask, 16) > base


def test_views_overlap_but_are_shifted():
    method = small()
    ramp = torch.linspace(0, 1, 80).view(1, 1, 1, 80).expand(2, 1, 80, 80).contiguous()
    online, target, _ = method.views(ramp, torch.Generator().manual_seed(5))
    assert online.shape == target.shape == (2, 1, 64, 64)
    assert not torch.allclose(online, target, atol=1e-3)  # shifted (and partly noisy)


def test_ablations_build_only_their_branch():
    rec, con = small(contrastive=False), small(reconstruction=False)
    assert not hasattr(rec, "feature_decoder") and not hasattr(con, "pixel_head")
    state = con.export_state()  # contrastive-only: the feature decoder is exported as decoder
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    torch.testing.assert_close(state["decoder.ups.0.up.weight"],
                               con.feature_decoder.ups[0].up.weight)


@pytest.mark.parametrize("micro, accum, world, expected", [
    (32, 1, 8, 1.5e-4), (32, 1, 16, 3e-4), (16, 2, 8, 1.5e-4), (8, 4, 1, 1.5e-4 * 32 / 256),
    (64, 4, 1, 1.5e-4),
])
def test_lr_rule(micro, accum, world, expected):
    assert scaled_lr(1.5e-4, micro, accum, world) == pytest.approx(expected)


def test_no_weight_decay_on_biases_and_norms():
    method = small()
    decay, no_decay = param_groups(method, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert all(p.ndim > 1 for p in decay["params"])
    assert method.encoder.stem[1].weight in no_decay["params"]  # BN weight


def test_warmup_then_cosine_per_step():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_spatial_mean_is_the_mean_and_keeps_the_gradient_channels_last():
    x = torch.randn(2, 8, 12, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    pooled = spatial_mean(x)
    assert pooled.shape == (2, 8, 1, 1)
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3), keepdim=True))
    seen = {}
    y = torch.relu(x)
    y.register_hook(lambda g: seen.setdefault("grad", g))
    spatial_mean(y).square().sum().backward()
    assert seen["grad"].is_contiguous(memory_format=torch.channels_last)


def projector_inputs(adapter: str, views: int = 384, batch: int = 16, size: int = 64,
                     adapter_pool: int = 4):
    """(online, target) projector inputs of a random-weight width-16 CM-UNet on ``views``
    random views, in training mode as in a step: g_s's input (adapter, pooled) and g_t's."""
    from cmunet.methods.masking import pixel_mask

    torch.manual_seed(0)
    method = CMUNet(CMUNetConfig(adapter=adapter, adapter_pool=adapter_pool, mlp_hidden=64,
                                 mlp_out=32), width=16, view_size=size)
    gen, online, target = torch.Generator().manual_seed(0), [], []
    with torch.no_grad():
        for _ in range(views // batch):
            a, b, mask = method.views(torch.randn(batch, 1, size + 16, size + 16), gen)
            masked = a * (1 - pixel_mask(mask, 16)).to(a.dtype)
            online.append(method.online_embedding(method.encoder(masked)))
            target.append(method.target_embedding(b))
    return torch.cat(online).double(), torch.cat(target).double()


def span_report(online: torch.Tensor, target: torch.Tensor, tolerance: float = 1e-3):
    """(numerical rank of the centred online inputs: singular values above ``tolerance`` times
    the largest, the fraction of the centred target inputs' variance outside their span)."""
    online, target = online - online.mean(0), target - target.mean(0)
    _, s, vt = torch.linalg.svd(online, full_matrices=False)
    basis = vt[: int((s > tolerance * s[0]).sum())]
    outside = target - target @ basis.t() @ basis
    return basis.shape[0], float(outside.square().sum() / target.square().sum())


@pytest.mark.slow
@pytest.mark.parametrize("adapter,adapter_pool", [("conv-bn-relu", 4), ("conv-bn-relu", 1),
                                                  ("linear-pooled", 4)])
def test_online_projector_sees_the_space_of_the_target_projector(adapter, adapter_pool):
    """Width 16, 384 random views: g_s's input has rank >= 90 % of its 256 dimensions and at
    most 25 % of g_t's input variance lies outside its span, with the adapter on the 4x4-pooled
    grid (the default) and at every pixel. The old layout (a linear adapter after pooling) fails
    both: rank w = 16, over 90 % outside."""
    online, target = projector_inputs(adapter, adapter_pool=adapter_pool)
    assert online.shape[1] == target.shape[1] == 256
    rank, outside = span_report(online, target)
    if adapter == "conv-bn-relu":
        assert rank >= 0.9 * 256 and outside <= 0.25, (rank, outside)
    else:
        assert rank <= 17 and outside > 0.9, (rank, outside)


def test_constant_ema_schedule_keeps_the_momentum():
    method = small(ema_schedule="constant", ema_start=0.99)
    assert method.after_step(0.0)["ema_momentum"] == method.after_step(0.9)["ema_momentum"] == 0.99
    cosine = small(ema_start=0.99)
    assert cosine.after_step(0.9)["ema_momentum"] > 0.99


def test_head_lr_scale_gives_the_heads_their_own_lr():
    method = small(head_lr_scale=0.1)
    optimizer = make_optimizer(method, 1e-3, 0.05, (0.9, 0.95))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in method.named_parameters():
        if p.requires_grad:
            head = name.startswith(("adapter", "projector", "predictor"))
            assert lr_of[id(p)] == pytest.approx(1e-4 if head else 1e-3), name
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # the schedule scales both
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([5e-5, 5e-4])


def test_every_step_logs_the_contrastive_health():
    loss, logs = small()(images(), torch.Generator().manual_seed(0))
    for name in ("con_top1", "con_top1_chance", "query_std", "key_std", "std_healthy",
                 "loss_con_chance"):
        assert logs[name].ndim == 0, name
    assert logs["con_top1_chance"].item() == pytest.approx(1 / 4)  # 4 images, one rank
    assert 0 <= logs["con_top1"].item() <= 1
