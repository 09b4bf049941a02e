#!/usr/bin/env python
"""Pre-training step throughput: the CM-UNet step against the bare network's step.

A full CM-UNet step (views, masking, both branches, backward, DeepSpeed optimizer step, EMA) on
random base images, and in the same run the **bare step** of the same UNet: forward, masked MSE,
backward and the same AdamW step on a batch of view-sized images, in the same precision and
memory format, without DeepSpeed, EMA or views. Cases: w=16 at 128² and w=32 at 256², 1 rank and
2 ranks sharing the machine's cores (gloo; the bare step runs as 2 independent processes). Both
steps run in one process with pre-training's process settings, timed in alternation; each
figure is the median step. FLOPs per step are counted by torch's FlopCounterMode. The CM-UNet
step's FLOP/s over the bare step's says whether anything around the network wastes time; the
bf16 and fp32 matmul rates, measured in the same run, are printed beside it.

    python bench/pretrain_throughput.py [--steps 12] [--quick] [--fp32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from cmunet.config import load_config
from cmunet.training.distributed import free_port
from cmunet.training.pretrain_config import PretrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs/pretrain/cmunet-cpu.yaml"
CASES = [(16, 128, 16), (32, 256, 8)]  # width, view size, micro batch per rank


def matmul_rate(dtype: torch.dtype, threads: int, n: int = 2048, repeats: int = 8) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def key(case: tuple, precision: str, world: int) -> str:
    """The name of one measurement in :func:`main`'s results, e.g. ``w=16 128² bf16 2r``."""
    return f"w={case[0]} {case[1]}² {precision} {world}r"


def _config(width: int, size: int, batch: int, precision: str) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, [
        f"model.width={width}", f"view_size={size}", f"train.micro_batch={batch}",
        f"train.precision={precision}", "cmunet.mlp_hidden=2048", "cmunet.mlp_out=256"])


def cmunet_step(case: tuple, precision: str, world: int, device: torch.device):
    """A function running one full CM-UNet step (DeepSpeed engine, views, EMA) per call."""
    from cmunet.methods import build_method
    from cmunet.training.optim import deepspeed_config, deepspeed_engine, make_optimizer
    from cmunet.training.precision import use_bf16

    width, size, batch = case
    torch.manual_seed(0)
    method = build_method(_config(width, size, batch, precision))
    method.autocast_device = device.type if use_bf16(device, precision) else None
    engine, _ = deepspeed_engine(method, make_optimizer(method, 1e-4, 0.05, (0.9, 0.95)),
                                 deepspeed_config(batch, 1, world, 0, 0.0))  # as pre-training's
    base = size + round(31 * size / 224)
    images = torch.randn(batch, 1, base, base).contiguous(memory_format=torch.channels_last)

    def step(i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        loss, _ = engine(images, gen)  # bf16 autocast inside the method
        engine.backward(loss)
        engine.step()
        engine.module.after_step(0.5)
    step.engine = engine
    return step


def bare_step(case: tuple, precision: str, world: int, device: torch.device):
    """A function running one bare UNet step per call: the same network on view-sized images,
    65 % of 16-px patches masked, MSE on them, backward, the same AdamW as pre-training
    (:func:`cmunet.training.optim.make_optimizer`); no DeepSpeed, EMA or views."""
    from cmunet.methods.masking import pixel_mask, random_patch_mask
    from cmunet.models.unet import UNet
    from cmunet.training.optim import make_optimizer
    from cmunet.training.precision import autocast, use_bf16

    width, size, batch = case
    torch.manual_seed(0)
    model = UNet(width, out_channels=1).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-4, 0.05, (0.9, 0.95))  # the same AdamW as pre-training
    bf16 = use_bf16(device, precision)
    images = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    hidden = pixel_mask(random_patch_mask(batch, size // 16, 0.65, torch.Generator(), device),
                        16).contiguous(memory_format=torch.channels_last)
    visible = images * (1 - hidden)

    def step(i: int) -> None:
        with autocast(device, bf16):
            out = model(visible)
        loss = ((out.float() - images) ** 2 * hidden).sum() / hidden.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


STEPS = {"cmunet": cmunet_step, "bare": bare_step}


def _worker(rank: int, world: int, port: int, case: tuple, precision: str, steps: int, out):
    """Both steps in one process, timed in alternation (CM-UNet step, bare step, CM-UNet step,
    ...), so that both see the same machine state; ranks meet at a barrier around every step."""
    from torch.utils.flop_counter import FlopCounterMode

    from cmunet.training.distributed import init_distributed, shutdown
    from cmunet.training.precision import speedups

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed()
    speedups(info.device)  # what pre-training sets, for both steps
    batch = case[2]
    runs = {kind: make(case, precision, world, info.device) for kind, make in STEPS.items()}
    flops, seconds = {}, {kind: [] for kind in runs}
    for kind, step in runs.items():
        step(0)  # warm-up (allocations, oneDNN kernel selection)
        with FlopCounterMode(display=False) as counter:
            step(1)
        flops[kind] = counter.get_total_flops()
    for i in range(steps):
        for kind, step in runs.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            step(2 + i)
            torch.distributed.barrier()
            seconds[kind].append(time.perf_counter() - start)
    if rank == 0:
        for kind in runs:
            median = statistics.median(seconds[kind])  # robust to a step another process slowed
            out[(kind, case, precision, world)] = (world * batch / median,
                                                   world * flops[kind] / median)
    shutdown()


def measure(case, precision: str, world: int, steps: int, out) -> None:
    mp.spawn(_worker, args=(world, free_port(), case, precision, steps, out), nprocs=world)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12,
                        help="timed steps of each kind (the median step counts)")
    parser.add_argument("--quick", action="store_true", help="only w=16 at 128²")
    parser.add_argument("--fp32", action="store_true", help="also measure fp32")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rates = {"bf16": matmul_rate(torch.bfloat16, cores), "fp32": matmul_rate(torch.float32, cores)}
    print(f"matmul rate on {cores} cores: bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s")
    out = mp.Manager().dict()
    cases = CASES[:1] if args.quick else CASES
    precisions = ["bf16", "fp32"] if args.fp32 else ["bf16"]
    for case in cases:
        for precision in precisions:
            for world in (1, 2):
                measure(case, precision, world, args.steps, out)
    print(f"\n{'case':<16}{'precision':<10}{'ranks':>6}{'img/s':>9}{'GFLOP/s':>10}"
          f"{'bare GFLOP/s':>14}{'/bare':>7}{'/matmul':>9}{'2r/1r':>8}")
    results = {"matmul_flop_s": rates}
    for case in cases:
        for precision in precisions:
            for world in (1, 2):
                images, flops = out[("cmunet", case, precision, world)]
                bare_images, bare = out[("bare", case, precision, world)]
                ratio = flops / rates["bf16"]
                scaling = (images / out[("cmunet", case, precision, 1)][0] if world == 2
                           else float("nan"))
                label = f"w={case[0]} {case[1]}²"
                print(f"{label:<16}{precision:<10}{world:>6}{images:>9.2f}{flops / 1e9:>10.1f}"
                      f"{bare / 1e9:>14.1f}{flops / bare:>7.2f}{ratio:>9.2f}{scaling:>8.2f}")
                results[key(case, precision, world)] = {
                    "images_per_s": images, "flop_s": flops, "flop_ratio": ratio,
                    "bare_images_per_s": bare_images, "bare_flop_s": bare,
                    "over_bare": flops / bare, "scaling_2r_1r": scaling}
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
