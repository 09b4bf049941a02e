#!/usr/bin/env python
"""Inference time of the paper-size UNet on one 512² angiogram over its compute floor.

The UNet (width 64, 2-class head: 31.04 M parameters) runs in eval mode, channels_last, under
``torch.inference_mode`` and bf16 autocast where the CPU runs bf16 fast (the library's choice for
``precision=auto``), on every core. The time is the median of ``--repeats`` forward passes after
warm-up; fp32 is timed the same way for comparison. The FLOPs of one forward are counted by
torch's FlopCounterMode; the compute floor is FLOPs / the matmul rate measured in the same run at
the same precision, so time / floor says how far the network runs from the machine's matmul peak.

    python bench/inference.py [--repeats 5] [--size 512] [--width 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cmunet.models.unet import UNet, count_parameters
from cmunet.training.precision import autocast, use_bf16
from pretrain_throughput import matmul_rate

CPU = torch.device("cpu")
WARMUP = 2  # untimed passes: oneDNN kernel selection, allocations; the first also counts FLOPs


def forward_time(net: UNet, image: torch.Tensor, repeats: int, bf16: bool) -> tuple[float, int]:
    """Median seconds of one forward pass, and the FLOPs of one."""
    times = []
    with torch.inference_mode(), autocast(CPU, bf16):
        with FlopCounterMode(display=False) as counter:
            net(image)
        for _ in range(WARMUP - 1):
            net(image)
        for _ in range(repeats):
            start = time.perf_counter()
            net(image)
            times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed forward passes per precision")
    parser.add_argument("--size", type=int, default=512,
                        help="image side in pixels (a multiple of 16)")
    parser.add_argument("--width", type=int, default=64, help="UNet width (64: the paper's)")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    bf16 = use_bf16(CPU, "auto")
    precision = "bf16" if bf16 else "fp32"
    rate = matmul_rate(torch.bfloat16 if bf16 else torch.float32, cores)
    torch.manual_seed(0)
    net = UNet(args.width, in_channels=1, out_channels=2)
    net.to(memory_format=torch.channels_last).eval()
    image = torch.randn(1, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    seconds, flops = forward_time(net, image, args.repeats, bf16)
    fp32_seconds = forward_time(net, image, args.repeats, False)[0] if bf16 else seconds
    floor = flops / rate
    results = {"size": args.size, "width": args.width, "precision": precision,
               "params": count_parameters(net), "flops": flops,
               "seconds": seconds, "flop_s": flops / seconds, "matmul_flop_s": rate,
               "floor_seconds": floor, "time_over_floor": seconds / floor,
               "fp32_seconds": fp32_seconds, "speedup_over_fp32": fp32_seconds / seconds}
    print(f"UNet w={args.width} ({results['params'] / 1e6:.2f} M parameters), one {args.size}² "
          f"image, {cores} cores: {flops / 1e9:.1f} GFLOP per forward; {precision} "
          f"{seconds:.3f} s ({flops / seconds / 1e9:.0f} GFLOP/s), {precision} matmul "
          f"{rate / 1e9:.0f} GFLOP/s -> floor {floor:.3f} s, time / floor {seconds / floor:.2f}; "
          f"fp32 {fp32_seconds:.3f} s ({fp32_seconds / seconds:.2f}x the {precision} time)")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
