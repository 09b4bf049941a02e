#!/usr/bin/env python
"""Shard building and loading throughput at 512².

* shard building: images/s per core with the full preprocessing (read, fit, border inpainting,
  unsharp mask, mask smoothing, PNG encoding, hashing), one process, then every core;
* loading: images/s per data-loader worker for decode + z-score + augmentation (random crop,
  flips, rotation, noise, blur, brightness/contrast: the fine-tuning pipeline), in a process
  forked with the training jobs' process settings, like their data-loader workers.

Synthetic 512² angiograms are generated first (no private data needed).

    python bench/shard_throughput.py [--count 96]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from cmunet.data.sharding import ShardConfig, build_shards
from cmunet.data.stream import ShardStream
from cmunet.data.synth import generate


def shard_rate(folder: Path, out: Path, workers: int) -> float:
    cfg = ShardConfig.for_folder(folder, out, workers=workers, overwrite=True)
    start = time.perf_counter()
    manifest = build_shards(cfg, log=lambda *_: None)
    return manifest["count"] / (time.perf_counter() - start)


def loader_rate(shards: Path, transform, batches: int = 12, batch: int = 8) -> float:
    stream = ShardStream(shards, None, batch, seed=0, with_masks=True, transform=transform,
                         shuffle_buffer=16)
    it = iter(stream)
    next(it)  # open the first shard
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def worker_rates(shards: Path) -> tuple[float, float]:
    """Loading rates without and with augmentation, in a process forked after the training
    jobs' process settings (:func:`cmunet.training.precision.speedups`), as their data-loader
    workers are."""
    import torch

    from cmunet.data.augment import AugmentConfig, make_augment
    from cmunet.training.precision import speedups

    speedups(torch.device("cpu"))
    return loader_rate(shards, None), loader_rate(shards, make_augment(AugmentConfig()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=96)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "syn", count=args.count, size=512, seed=0, workers=cores)
        one = shard_rate(tmp / "syn", tmp / "shards", workers=1)
        every = shard_rate(tmp / "syn", tmp / "shards", workers=cores)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            plain, augmented = pool.apply(worker_rates, (tmp / "shards",))
    results = {"shard_img_s_per_core": one, "shard_img_s_all_cores": every, "cores": cores,
               "load_img_s_per_worker": plain, "load_aug_img_s_per_worker": augmented}
    print(f"shard building at 512², full preprocessing: {one:.1f} img/s on 1 core, "
          f"{every:.1f} img/s on {cores} cores (goal >= 20 img/s per core)")
    print(f"loading per worker: decode + z-score {plain:.1f} img/s, "
          f"+ fine-tuning augmentation {augmented:.1f} img/s")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
