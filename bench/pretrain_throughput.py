#!/usr/bin/env python
"""Pre-training step throughput: images/s and achieved FLOP/s over the bf16 matmul rate.

A full CM-UNet step (views, masking, both branches, backward, DeepSpeed optimizer step, EMA) on
random base images, for w=16 at 128² and w=32 at 256², bf16 autocast and fp32, 1 rank and 2 ranks
(gloo) sharing the machine's cores. FLOPs per step are counted by torch's FlopCounterMode; the
bf16 and fp32 matmul rates are measured in the same run with the same core count.

    python bench/pretrain_throughput.py [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
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


def _worker(rank: int, world: int, port: int, case: tuple, precision: str, steps: int, out):
    import deepspeed
    from torch.utils.flop_counter import FlopCounterMode

    from cmunet.methods import build_method
    from cmunet.training.distributed import init_distributed, shutdown
    from cmunet.training.optim import deepspeed_config, make_optimizer
    from cmunet.training.precision import use_bf16

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed()
    width, size, batch = case
    cfg = _config(width, size, batch, precision)
    torch.manual_seed(0)
    method = build_method(cfg)
    method.autocast_device = info.device.type if use_bf16(info.device, precision) else None
    engine, *_ = deepspeed.initialize(
        model=method, optimizer=make_optimizer(method, 1e-4, 0.05, (0.9, 0.95)),
        config=deepspeed_config(batch, 1, world, 0, 0.0))
    engine.module.to(memory_format=torch.channels_last)
    base = size + round(31 * size / 224)
    images = torch.randn(batch, 1, base, base).contiguous(memory_format=torch.channels_last)

    def step(i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        loss, _ = engine(images, gen)  # bf16 autocast inside the method
        engine.backward(loss)
        engine.step()
        engine.module.after_step(0.5)

    step(0)  # warm-up (allocations, oneDNN kernel selection)
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    torch.distributed.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        out[(case, precision, world)] = (world * batch * steps / seconds,
                                         world * flops * steps / seconds)
    shutdown()


def measure(case, precision: str, world: int, steps: int, out) -> None:
    mp.spawn(_worker, args=(world, free_port(), case, precision, steps, out), nprocs=world)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only w=16 at 128², bf16")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rates = {"bf16": matmul_rate(torch.bfloat16, cores), "fp32": matmul_rate(torch.float32, cores)}
    print(f"matmul rate on {cores} cores: bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s")
    out = mp.Manager().dict()
    cases = CASES[:1] if args.quick else CASES
    precisions = ["bf16"] if args.quick else ["bf16", "fp32"]
    for case in cases:
        for precision in precisions:
            for world in (1, 2):
                measure(case, precision, world, args.steps, out)
    print(f"\n{'case':<16}{'precision':<10}{'ranks':>6}{'img/s':>9}{'GFLOP/s':>10}"
          f"{'/bf16 matmul':>14}{'2r/1r':>8}")
    results = {"matmul_flop_s": rates}
    for case in cases:
        for precision in precisions:
            for world in (1, 2):
                images, flops = out[(case, precision, world)]
                ratio = flops / rates["bf16"]
                scaling = images / out[(case, precision, 1)][0] if world == 2 else float("nan")
                label = f"w={case[0]} {case[1]}²"
                print(f"{label:<16}{precision:<10}{world:>6}{images:>9.2f}{flops / 1e9:>10.1f}"
                      f"{ratio:>14.2f}{scaling:>8.2f}")
                results[key(case, precision, world)] = {"images_per_s": images, "flop_s": flops,
                                                        "flop_ratio": ratio,
                                                        "scaling_2r_1r": scaling}
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
