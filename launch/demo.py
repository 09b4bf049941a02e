#!/usr/bin/env python
"""The demo: the toolkit end to end on synthetic angiograms, with no arguments and no private data.

    make demo            (or: python launch/demo.py [--out demo])

Stages: synthetic angiograms -> WebDataset shards -> a look at the streaming loader. Everything
lands in the output folder (default ./demo); MLflow runs go to ./mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cmunet.data.sharding import ShardConfig, build_shards
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import ShardStream, make_loader
from cmunet.data.synth import generate


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo", help="output folder (default ./demo)")
    parser.add_argument("--count", type=int, default=96, help="synthetic images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()

    stage(f"1/3 synthetic angiograms: {args.count} images of {args.size}^2")
    generate(out / "synthetic", count=args.count, size=args.size, seed=0, workers=2,
             overwrite=True)

    stage("2/3 shards: preprocessing, manifest, patient-grouped splits")
    shards = out / "shards"
    manifest = build_shards(ShardConfig(images=str(out / "synthetic/images"),
                                        masks=str(out / "synthetic/masks"),
                                        meta=str(out / "synthetic/meta.csv"), out=str(shards),
                                        overwrite=True), log=lambda *_: None)
    splits = load_splits(shards / "splits.json")
    print(f"{manifest['count']} samples, {manifest['patients']} patients, "
          f"{len(manifest['shards'])} shards; intensity mean {manifest['mean']:.1f}, "
          f"std {manifest['std']:.1f}; test split {len(splits['test']['keys'])} images")
    for ratio, pools in splits["ratios"].items():
        print(f"  PT-FT {ratio:>6}: pre-training {len(pools['pretrain']['keys']):3d} images, "
              f"fine-tuning {len(pools['finetune']['keys']):3d} images")

    stage("3/3 streaming loader: 2 workers, resampled shards, 5 batches of 8")
    stream = ShardStream(shards, pool_keys(splits, "pretrain", "79-1"), 8, seed=0)
    for i, batch in enumerate(make_loader(stream, num_workers=2, steps_per_epoch=5)):
        image = batch["image"]
        print(f"  batch {i}: {tuple(image.shape)} z-scored, mean {image.mean():+.2f}, "
              f"std {image.std():.2f}, keys {', '.join(batch['key'][:3])}, ...")

    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
