#!/usr/bin/env python
"""All benchmarks in one run (`make bench`), summarised as one table of ratios.

Runs bench/shard_throughput.py, bench/pretrain_throughput.py (the CM-UNet step and the bare
UNet step, w=16 at 128² and w=32 at 256², bf16, 1 and 2 ranks) and bench/inference.py in this
process, then prints the machine, a markdown table ``figure | measured | reference | ratio``
(ratio = measured / reference) built only from this run's measurements, and the wall time. The
defaults take a few minutes on 2 idle cores. Goals (docs/benchmarks.md): shard building >= 20
img/s on one worker; loader headroom >= 3; CM-UNet / bare UNet >= 0.9 at 1 rank; 2 ranks / 1
rank >= 0.9 at w16 128².

    python bench/run_all.py [--count 96] [--steps 12] [--repeats 5] [--out FILE]
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
    rows = [
        Figure("shard building at 512², 1 worker", shard["shard_img_s_per_core"], 20.0,
               "img/s"),
        Figure(f"shard building, {workers} / 1 worker",
               shard["shard_img_s_all_cores"], shard["shard_img_s_per_core"], "img/s"),
        Figure("loader headroom: 1 worker with augmentation / 2-rank pre-training intake",
               shard["load_aug_img_s_per_worker"], intake, "img/s"),
    ]
    for case in pretrain_throughput.CASES:
        for world in (1, 2):
            name = pretrain_throughput.key(case, "bf16", world)
            if name not in pretrain:
                continue
            r = pretrain[name]
            label = f"w{case[0]} {case[1]}², {world} rank{'s' if world > 1 else ''}"
            rows += [Figure(f"pre-training step FLOP/s, {label}: CM-UNet / bare UNet",
                            r["flop_s"] / 1e9, r["bare_flop_s"] / 1e9, "GFLOP/s"),
                     Figure(f"pre-training step FLOP/s, {label}: CM-UNet / bf16 matmul",
                            r["flop_s"] / 1e9, matmul, "GFLOP/s")]
    return rows + [
        Figure(f"pre-training throughput w{PRETRAIN_CASE[0]} {PRETRAIN_CASE[1]}², 2 ranks / 1 "
               "rank", intake, one["images_per_s"], "img/s"),
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
    cases = ", ".join(f"w={w} {s}² x {b}" for w, s, b in pretrain_throughput.CASES)
    return (f"Shards: {args.count} synthetic 512² angiograms, full preprocessing; loader: decode, "
            f"z-score, fine-tuning augmentation. Pre-training: a full CM-UNet step and the bare "
            f"UNet step (forward, masked MSE, backward, torch AdamW; same batch, bf16 autocast, "
            f"channels_last) for {cases} views per rank, timed steps: {args.steps}; 2 ranks "
            f"(gloo) share the cores. Inference: 1x1x{args.size}x"
            f"{args.size}, median of {args.repeats} forward passes; the floor is its FLOPs over "
            "the matmul rate at the same precision.")


def run(title: str, bench, argv: list[str]) -> dict:
    print(f"\n## {title}: {' '.join(argv)}", flush=True)
    return bench(argv)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=96,
                        help="synthetic 512² angiograms to shard and load")
    parser.add_argument("--steps", type=int, default=12,
                        help="timed pre-training steps of each kind (CM-UNet, bare) per run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed inference forward passes per precision")
    parser.add_argument("--size", type=int, default=512, help="inference image side")
    parser.add_argument("--width", type=int, default=64, help="inference UNet width")
    parser.add_argument("--quick", action="store_true",
                        help="pre-training at w16 128² only (skip w32 256²)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    start, host = time.perf_counter(), machine()
    measurements = {
        "shard": run("shard building and loading", shard_throughput.main,
                     ["--count", str(args.count)]),
        "pretrain": run("pre-training", pretrain_throughput.main,
                        ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])),
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
