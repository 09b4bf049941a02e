#!/usr/bin/env python
"""All benchmarks in one run (`make bench`), summarised as one table of ratios.

Runs bench/shard_throughput.py, bench/pretrain_throughput.py --quick (CM-UNet, w=16, 128² views,
bf16, 1 and 2 ranks) and bench/inference.py in this process, then prints the machine, a markdown
table ``figure | measured | reference | ratio`` (ratio = measured / reference) built only from
this run's measurements, and the wall time. The defaults take a few minutes on 2 idle cores.

    python bench/run_all.py [--count 96] [--steps 3] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import inference
import pretrain_throughput
import shard_throughput
from cmunet.training.precision import cpu_has_fast_bf16

PRETRAIN_CASE = pretrain_throughput.CASES[0]  # the one --quick measures, in bf16


@dataclass
class Figure:
    name: str
    measured: float
    reference: float
    unit: str

    @property
    def ratio(self) -> float:
        return self.measured / self.reference


def figures(m: dict) -> list[Figure]:
    """The table's rows from the three benchmarks' results ``m["shard"]``, ``m["pretrain"]`` and
    ``m["inference"]`` (the dicts their ``main`` returns)."""
    shard, pretrain, infer = m["shard"], m["pretrain"], m["inference"]
    one, two = (pretrain[pretrain_throughput.key(PRETRAIN_CASE, "bf16", w)] for w in (1, 2))
    intake = two["images_per_s"]  # what 2-rank pre-training consumes
    workers = f"{shard['cores']} workers"
    matmul = pretrain["matmul_flop_s"]["bf16"] / 1e9
    net, precision = f"{infer['size']}² w{infer['width']}", infer["precision"]
    return [
        Figure(f"shard building, {workers} / 2-rank pre-training intake",
               shard["shard_img_s_all_cores"], intake, "img/s"),
        Figure(f"shard building, {workers} / 1 worker",
               shard["shard_img_s_all_cores"], shard["shard_img_s_per_core"], "img/s"),
        Figure("loader headroom: 1 worker with augmentation / 2-rank pre-training intake",
               shard["load_aug_img_s_per_worker"], intake, "img/s"),
        Figure("pre-training FLOP/s, 1 rank / bf16 matmul rate", one["flop_s"] / 1e9, matmul,
               "GFLOP/s"),
        Figure("pre-training FLOP/s, 2 ranks / bf16 matmul rate", two["flop_s"] / 1e9, matmul,
               "GFLOP/s"),
        Figure("pre-training throughput, 2 ranks / 1 rank", intake, one["images_per_s"], "img/s"),
        Figure(f"inference {net}, {precision} time / {precision} compute floor",
               infer["seconds"], infer["floor_seconds"], "s"),
        Figure(f"inference {net}, {precision} speed / fp32 speed",
               1 / infer["seconds"], 1 / infer["fp32_seconds"], "img/s"),
    ]


def number(value: float) -> str:
    """Three significant digits, without an exponent."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def table(rows: list[Figure]) -> str:
    lines = ["| figure | measured | reference | ratio |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.name} | {number(r.measured)} {r.unit} | {number(r.reference)} {r.unit} "
              f"| {number(r.ratio)} |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return (f"{cpu or platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores ({'' if cpu_has_fast_bf16() else 'no '}native "
            f"bf16), torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.2f} at start")


def notes(args: argparse.Namespace) -> str:
    width, size, batch = PRETRAIN_CASE
    return (f"Shards: {args.count} synthetic 512² angiograms, full preprocessing; loader: decode, "
            f"z-score, fine-tuning augmentation. Pre-training: a full CM-UNet step, w={width}, "
            f"{size}² views, micro-batch {batch} per rank, bf16 autocast, timed steps: "
            f"{args.steps}; 2 ranks (gloo) share the cores. Inference: 1x1x{args.size}x"
            f"{args.size}, median of {args.repeats} forward passes; the floor is its FLOPs over "
            "the matmul rate at the same precision.")


def run(title: str, bench, argv: list[str]) -> dict:
    print(f"\n## {title}: {' '.join(argv)}", flush=True)
    return bench(argv)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=96,
                        help="synthetic 512² angiograms to shard and load")
    parser.add_argument("--steps", type=int, default=3, help="timed pre-training steps per run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed inference forward passes per precision")
    parser.add_argument("--size", type=int, default=512, help="inference image side")
    parser.add_argument("--width", type=int, default=64, help="inference UNet width")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    start, host = time.perf_counter(), machine()
    measurements = {
        "shard": run("shard building and loading", shard_throughput.main,
                     ["--count", str(args.count)]),
        "pretrain": run("pre-training", pretrain_throughput.main,
                        ["--quick", "--steps", str(args.steps)]),
        "inference": run("inference", inference.main,
                         ["--repeats", str(args.repeats), "--size", str(args.size),
                          "--width", str(args.width)]),
    }
    report = (f"Machine: {host}\n\n{table(figures(measurements))}\n\n{notes(args)}\n\n"
              f"Wall time: {(time.perf_counter() - start) / 60:.1f} min")
    print(f"\n{report}")
    if args.out:
        args.out.write_text(report + "\n")
    return measurements


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
