"""The CUDA/NCCL path checked on CPU: what differs on a GPU is simulated (autocast reporting,
CUDA availability, Ray's GPU ids), the rest runs for real (DeepSpeed on one gloo rank)."""

from __future__ import annotations

import os
import types

import pytest
import torch

from cmunet.config import load_config
from cmunet.training.pretrain_config import PretrainConfig

from conftest import ROOT


def tiny_config(method: str = "cmunet", *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, ROOT / "configs/pretrain/cmunet-cpu.yaml", [
        f"method={method}", f"model.sync_batch_norm={str(method.startswith('cmunet')).lower()}",
        "view_size=32", "model.width=4", "cmunet.mlp_hidden=16",
        "cmunet.mlp_out=8", "cmunet.patch=8", "train.micro_batch=2", "train.precision=bf16",
        *overrides])


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo process group, destroyed afterwards."""
    from cmunet.training.distributed import free_port, init_distributed, shutdown

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    info = init_distributed()
    yield info
    shutdown(wait=False)


def test_step_runs_convolutions_in_bf16_when_autocast_reports_like_cuda(one_rank, monkeypatch):
    """On CUDA the argument-less ``torch.is_autocast_enabled()`` is true inside an autocast
    region, and DeepSpeed's engine then switches autocast off. Simulated on CPU (the question is
    answered for this device), the step's convolutions must still run in bf16."""
    import deepspeed

    from cmunet.methods import build_method
    from cmunet.training.optim import deepspeed_config, make_optimizer
    from cmunet.training.pretrain import _Run, _Window
    from cmunet.training.precision import activation_dtypes, use_bf16

    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *device: real(*device) if device else real("cpu"))
    cfg = tiny_config()
    device = one_rank.device
    bf16 = use_bf16(device, "bf16")
    method = build_method(cfg)
    method.autocast_device = "cpu"
    engine, *_ = deepspeed.initialize(model=method,
                                      optimizer=make_optimizer(method, 1e-3, 0.05, (0.9, 0.95)),
                                      config=deepspeed_config(2, 1, 1, 0, 0.0))
    run = types.SimpleNamespace(cfg=cfg, state={"step": 0}, info=one_rank, engine=engine,
                                bf16=bf16, window=_Window())
    dtypes = activation_dtypes(engine.module,
                               lambda: _Run._micro_step(run, torch.randn(2, 1, 36, 36), 0))
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())


def test_collectives_wait_an_hour_by_default(one_rank):
    """DeepSpeed's default (10 min) is shorter than rank 0's figures, probe and export."""
    from datetime import timedelta

    group = torch.distributed.distributed_c10d._get_default_group()
    assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(hours=1)
    assert tiny_config().train.collective_timeout_s == 3600


# ---- the device each process uses ----------------------------------------------------------------

def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_local_rank_wraps_onto_the_gpus_the_process_sees(monkeypatch):
    from cmunet.training.precision import default_device

    fake_gpus(monkeypatch, 1)  # SLURM --gpu-bind / Kubernetes: one visible GPU per process
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda", 0)
    fake_gpus(monkeypatch, 4)
    assert default_device() == torch.device("cuda", 3)


def test_missing_master_addr_on_several_nodes_is_an_error(monkeypatch):
    from cmunet.training.distributed import free_port, init_distributed

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                        "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        init_distributed(timeout_s=60)
    assert not torch.distributed.is_initialized()


def test_ray_trials_use_the_gpus_ray_gave_them(monkeypatch):
    import ray

    from cmunet.training import tune
    from cmunet.training.trial import ray_device

    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # gpus_per_trial: 0 on a GPU node
    assert ray_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what Ray sets for the task
    assert ray_device() == torch.device("cuda", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])
    assert ray_device() == torch.device("cuda", 1)

    seen = {}
    monkeypatch.setattr(tune, "fit", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    threads = torch.get_num_threads()
    try:
        tune._retrain(None, ["a"], {}, threads)
    finally:
        torch.set_num_threads(threads)
    assert seen["device"] == torch.device("cpu")


def test_segment_device_option(monkeypatch, tmp_path, capsys):
    from conftest import load_tool

    fake_gpus(monkeypatch, 1)
    segment = load_tool("segment")
    code = segment(["--model", str(tmp_path / "none"), "--input", str(tmp_path),
                    "--out", str(tmp_path / "out"), "--device", "cuda:1"])
    assert code == 2 and "sees 1 GPU" in capsys.readouterr().err


# ---- batch and batch norm across GPU counts ------------------------------------------------------

def test_a_global_batch_other_than_the_configs_is_named():
    from cmunet.training.optim import batch_mismatch

    assert batch_mismatch(32, 1, 8, 256) == batch_mismatch(16, 1, 4, 0) == ""
    note = batch_mismatch(16, 1, 8, 256)
    assert "16 x 1 x 8 ranks = 128" in note and "train.global_batch=256" in note
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/cmunet.yaml")
    assert cfg.train.global_batch == 256


def test_heads_use_global_batch_norm_and_the_encoder_can():
    from cmunet.methods import build_method
    from cmunet.models.sync_bn import GlobalBatchNorm

    def norms(method, part):
        return {type(m) for m in getattr(method, part).modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    method = build_method(tiny_config("cmunet", "model.sync_batch_norm=false"))
    assert norms(method, "projector") == norms(method, "momentum_projector") == {GlobalBatchNorm}
    assert norms(method, "encoder") == {torch.nn.BatchNorm2d}
    synced = build_method(tiny_config())  # the cmunet configs' default
    assert norms(synced, "encoder") == norms(synced, "momentum_encoder") == {GlobalBatchNorm}
    assert not any(p.requires_grad for p in synced.momentum_encoder.parameters())
    synced.load_state_dict(method.state_dict())  # same keys: checkpoints load either way


# ---- the step as fast on a GPU as it can be ------------------------------------------------------

def host_syncs(step) -> list[str]:
    """The operators of ``step()`` that make the host wait for the device: reading a value
    (``.item()``, ``bool(tensor)``), ``nonzero`` and boolean-mask indexing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten, found = torch.ops.aten, []
    reads = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            indices = args[1] if func.name().startswith("aten::index") and len(args) > 1 else ()
            if func in reads or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                    for i in indices or ()):
                found.append(func.name())
            return func(*args, **(kwargs or {}))

    with Watch():
        step()
    return found


@pytest.mark.parametrize("method", ["cmunet", "spark", "mae"])
def test_no_host_sync_in_the_step(method):
    from cmunet.methods import build_method

    module = build_method(tiny_config(method, "mae.patch=8"))
    images = torch.randn(2, 1, 36, 36)

    def step():
        loss, _ = module(images, torch.Generator().manual_seed(0))
        loss.backward()
        module.after_step(0.5)

    assert host_syncs(step) == []


def test_fine_tuning_reads_the_loss_once_per_epoch():
    from cmunet.models.unet import UNet
    from cmunet.training.finetune import train_epoch

    model = UNet(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as on a GPU
    batch = {"image": torch.randn(2, 1, 32, 32), "mask": torch.rand(2, 1, 32, 32) > 0.5}
    syncs = host_syncs(lambda: train_epoch(model, [batch] * 3, optimizer, torch.device("cpu"),
                                           False))
    assert syncs == ["aten::_local_scalar_dense"]  # the epoch's mean


def test_ema_is_one_multi_tensor_update():
    from torch.utils._python_dispatch import TorchDispatchMode

    from cmunet.methods.heads import MLP, ema_update, frozen_copy

    source = MLP(4, 8, 2)
    target = frozen_copy(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    expected = [0.9 * t + 0.1 * s for t, s in zip(target.parameters(), source.parameters())]
    ops = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.name().split(".")[0])
            return func(*args, **(kwargs or {}))

    with Watch():
        ema_update(target, source, 0.9)
    assert ops == ["aten::_foreach_lerp_", "aten::_foreach_copy_"]
    for t, e in zip(target.parameters(), expected):
        torch.testing.assert_close(t, e)
    for t, s in zip(target.buffers(), source.buffers()):
        assert torch.equal(t, s)


def test_deepspeed_config_and_gpu_recipes():
    from conftest import ROOT as root
    from cmunet.training.optim import deepspeed_config

    ds = deepspeed_config(32, 1, 8, 0, 0.0)
    assert ds["timers"] == {"throughput": {"enabled": False}}  # no GPU sync per micro-step
    assert ds["wall_clock_breakdown"] is False and "bf16" not in ds and "fp16" not in ds
    assert ds["train_batch_size"] == 256
    for path in sorted((root / "configs/pretrain").glob("*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.train.zero_stage == 0, path.name  # 31 M parameters: no sharding


def test_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    from cmunet.training.precision import use_bf16

    cuda = torch.device("cuda", 0)
    # a V100 / T4: bf16 tensors work (emulated), no bf16 tensor cores
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert not use_bf16(cuda, "auto")
    with pytest.raises(ValueError, match="native bf16"):
        use_bf16(cuda, "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert use_bf16(cuda, "auto")


def test_cuda_settings(monkeypatch):
    from cmunet.training.optim import make_optimizer
    from cmunet.training.precision import speedups

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    speedups(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == before
    try:
        speedups(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matrix products
    finally:
        torch.set_float32_matmul_precision(before)
    model = torch.nn.Linear(2, 2)
    assert make_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults["fused"]  # CPU
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda", 0)))
    assert make_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults["fused"]
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("mps")))
    other = make_optimizer(model, 1e-3, 0.05, (0.9, 0.95)).defaults
    assert not other["fused"] and other["foreach"]


def test_one_rank_engine_skips_the_allreduce_and_steps_the_same(one_rank):
    """On one rank without ZeRO there is nothing to all-reduce: the engine's gradient reduction
    (a flatten, average and copy-back of every gradient) is off, and the weights after two
    steps are bit for bit those of an engine that still runs it."""
    from cmunet.methods import build_method
    from cmunet.training.optim import deepspeed_config, deepspeed_engine, make_optimizer

    weights = {}
    for reduce in (False, True):
        torch.manual_seed(0)
        method = build_method(tiny_config())
        engine, _ = deepspeed_engine(method, make_optimizer(method, 1e-2, 0.05, (0.9, 0.95)),
                                     deepspeed_config(2, 1, 1, 0, 1.0))
        assert not engine.enable_backward_allreduce
        assert engine.module.encoder.stem[0].weight.is_contiguous(
            memory_format=torch.channels_last)
        engine.enable_backward_allreduce = reduce
        for step in range(2):
            loss, _ = engine(torch.randn(2, 1, 36, 36), torch.Generator().manual_seed(step))
            engine.backward(loss)
            engine.step()
        weights[reduce] = [p.detach().clone() for p in engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))
    assert not all(torch.equal(a, b) for a, b in
                   zip(weights[False], build_method(tiny_config()).parameters()))


def test_cpu_training_reuses_freed_buffers_instead_of_faulting_in_new_pages():
    """After ``speedups(cpu)``, allocating and freeing the same 16 MiB and 48 MiB tensors again
    and again costs (almost) no page faults; by default glibc gives the memory back to the
    system (blocks over 32 MiB are always mapped anew) and every round faults in thousands of
    fresh 4 KiB pages. Measured in a fresh interpreter, before and after."""
    import subprocess
    import sys

    script = """
import resource, torch
from cmunet.training.precision import speedups

def faults(numel):
    torch.ones(numel)  # touched
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(numel)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

sizes = (4 << 20, 12 << 20)  # 16 and 48 MiB of float32
before = [faults(n) for n in sizes]
speedups(torch.device("cpu"))
print(*before, *[faults(n) for n in sizes])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    small, large, small_after, large_after = map(int, out.stdout.split())
    assert small > 4000 and large > 10 * 12_000, (small, large)  # 4,096 / 12,288 pages a round
    # 0 seen, once 4,096 for the 48 MiB tensor (the heap grew once)
    assert small_after < small / 10 and large_after < large / 10, (small_after, large_after)
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                          "CMUNET_KEEP_FREED_MEMORY": "0"})
    assert int(off.stdout.split()[3]) > 10 * 12_000  # switched off: glibc's defaults
