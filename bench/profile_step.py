#!/usr/bin/env python
"""Where a CM-UNet pre-training step spends its time: a torch.profiler breakdown.

One rank (or 2 gloo ranks with --ranks 2, rank 0 reported), the benchmark's step (DeepSpeed
engine, views, both branches, backward, optimizer, EMA) on random images. Two views of the same
profile: the step's phases (inclusive wall time of labelled regions) and every operator's own
(self) time grouped by kind; "Python and framework" is the step's wall time that no operator
accounts for (interpreter, DeepSpeed engine code, autograd bookkeeping).

    python bench/profile_step.py [--width 16 --size 128 --batch 16] [--steps 5] [--ranks 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch
import torch.multiprocessing as mp

import pretrain_throughput
from cmunet.training.distributed import free_port

KINDS = [  # (kind, substrings of operator names), first match wins
    ("convolution", ("conv",)),
    ("normalisation", ("batch_norm",)),
    ("matmul (heads, InfoNCE)", ("addmm", "::mm", "matmul", "linear", "bmm")),
    ("communication (all-gather, all-reduce)", ("allreduce", "all_reduce", "allgather",
                                                "all_gather", "broadcast", "c10d", "gloo")),
    ("optimizer and EMA arithmetic", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("copies and layout", ("copy_", "::to", "contiguous", "clone", "_to_copy", "empty",
                           "cat", "zero_", "fill_")),
]
PHASES = ["views and masks", "forward", "backward", "optimizer step", "EMA"]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other operators")


def _labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def _worker(rank: int, world: int, port: int, case: tuple, steps: int, out) -> None:
    from cmunet.training.distributed import init_distributed, shutdown
    from cmunet.training.precision import speedups

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed()
    speedups(info.device)
    engine_step = pretrain_throughput.cmunet_step(case, "bf16", world, info.device)
    ds, method = engine_step.engine, engine_step.engine.module
    method.views = _labelled(method.views, "views and masks")
    method.after_step = _labelled(method.after_step, "EMA")
    ds.forward = _labelled(ds.forward, "forward")
    ds.backward = _labelled(ds.backward, "backward")
    ds.step = _labelled(ds.step, "optimizer step")
    engine_step(0)
    engine_step(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            engine_step(2 + i)
        wall = (time.perf_counter() - start) / steps
    if rank == 0:
        averages = prof.key_averages()
        phases = {e.key: e.cpu_time_total / steps / 1e6 for e in averages if e.key in PHASES}
        kinds: dict[str, float] = {}
        top: dict[str, list] = {}
        for e in averages:
            if e.key not in PHASES:
                kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
                top.setdefault(kind_of(e.key), []).append((e.self_cpu_time_total / steps / 1e6,
                                                           e.key))
        kinds = {k: v / steps / 1e6 for k, v in kinds.items()}
        kinds["Python and framework (no operator)"] = max(wall - sum(kinds.values()), 0.0)
        top = {k: sorted(v, reverse=True)[:4] for k, v in top.items()}
        out["result"] = {"wall": wall, "phases": phases, "kinds": kinds, "top": top}
    shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=1)
    args = parser.parse_args(argv)
    out = mp.Manager().dict()
    case = (args.width, args.size, args.batch)
    mp.spawn(_worker, args=(args.ranks, free_port(), case, args.steps, out), nprocs=args.ranks)
    result = dict(out["result"])
    wall = result["wall"]
    print(f"CM-UNet step, w={args.width}, {args.size}² views, micro-batch {args.batch}, "
          f"{args.ranks} rank(s), bf16: {wall * 1e3:.1f} ms per step (mean of {args.steps})\n")
    print("| phase (inclusive) | ms / step | share |\n| --- | ---: | ---: |")
    for name in PHASES:
        seconds = result["phases"].get(name, 0.0)
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / wall:.1%} |")
    print("\n| operator kind (self time) | ms / step | share | largest operators (ms) |\n"
          "| --- | ---: | ---: | --- |")
    for name, seconds in sorted(result["kinds"].items(), key=lambda kv: -kv[1]):
        largest = ", ".join(f"{op} {t * 1e3:.1f}" for t, op in result["top"].get(name, []))
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / wall:.1%} | {largest} |")
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(0 if main() else 1)
