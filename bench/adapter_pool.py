#!/usr/bin/env python
"""The CM-UNet adapter's cost by ``cmunet.adapter_pool``: forward + backward of the conv-bn-relu
adapter and the global pool on a batch of feature-decoder outputs, at each pooling factor,
printed as seconds per step and the ratio to every-pixel (factor 1), all from one run.

    python bench/adapter_pool.py [--width 16] [--size 128] [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cmunet.methods.cmunet import adapter, spatial_mean


def seconds_per_step(width: int, size: int, batch: int, pool: int, repeats: int) -> float:
    torch.manual_seed(0)
    layer = adapter(width).to(memory_format=torch.channels_last)
    features = torch.randn(batch, width, size, size).contiguous(memory_format=torch.channels_last)

    def step():
        x = features.clone().requires_grad_(True)
        pooled = F.avg_pool2d(x, pool) if pool > 1 else x
        spatial_mean(layer(pooled)).sum().backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"adapter w{args.width} -> {16 * args.width}, {args.batch} x {args.size}², "
          f"{torch.get_num_threads()} thread(s)")
    print("| adapter_pool | s/step | ratio to 1 |\n|---|---|---|")
    base = None
    for pool in (1, 2, 4, 8):
        t = seconds_per_step(args.width, args.size, args.batch, pool, args.repeats)
        base = base or t
        print(f"| {pool} | {t:.4f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
