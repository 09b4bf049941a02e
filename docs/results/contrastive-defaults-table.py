#!/usr/bin/env python
"""The table of docs/results.md "Choosing the contrastive defaults": per run of
contrastive-defaults-run.sh, means over the last 5 logged epochs of the contrastive health, the
median images/s, and the probe (cmunet.training.probe.probe_exports, seeds 0-2, the fine-tuning
pool only) over the runs' exports and a random initialisation.

    python docs/results/contrastive-defaults-table.py runs/defaults [--no-probe]
        [--probe-seeds 0 1 2] [--probe-runs pool4 sync-bn ema-constant head-lr-0.1]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from cmunet.training.probe import RANDOM_INIT, ProbeConfig, probe_exports

COLUMNS = ("loss_con", "con_top1", "query_std", "key_std")


def health(log: Path, last: int = 5) -> dict[str, float]:
    rows = list(csv.DictReader(log.open()))
    tail = rows[-last:]
    out = {c: statistics.fmean(float(r[c]) for r in tail) for c in COLUMNS}
    out["images_per_s"] = statistics.median(float(r["images_per_s"]) for r in rows)
    out["epochs"] = float(rows[-1]["epoch"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--shards", default="runs/data/xca128")
    parser.add_argument("--probe-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-runs", nargs="+", default=["pool4", "sync-bn", "ema-constant",
                                                             "head-lr-0.1"])
    args = parser.parse_args()
    runs = sorted(p.parent for p in args.folder.glob("*/log.csv"))
    probes = {}
    if not args.no_probe:
        exports = {name: args.folder / name / "export" for name in args.probe_runs}
        probes = probe_exports(exports, args.shards, "50-30", ProbeConfig(), args.probe_seeds,
                               args.folder / "probe-cache.json")
    print(f"| run | epochs | loss_con | con_top1 | query_std / key_std | images/s | probe Dice ({len(args.probe_seeds)} seeds) |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        h = health(run / "log.csv")
        p = probes.get(run.name)
        probe = f"{statistics.fmean(p):.3f} ± {statistics.stdev(p):.3f}" if p else "-"
        print(f"| {run.name} | {h['epochs']:.0f} | {h['loss_con']:.3f} | {h['con_top1']:.3f} | "
              f"{h['query_std']:.3f} / {h['key_std']:.3f} | {h['images_per_s']:.1f} | {probe} |")
    if RANDOM_INIT in probes:
        p = probes[RANDOM_INIT]
        print(f"| {RANDOM_INIT} | - | - | - | - | - | {statistics.fmean(p):.3f} ± {statistics.stdev(p):.3f} |")


if __name__ == "__main__":
    main()
