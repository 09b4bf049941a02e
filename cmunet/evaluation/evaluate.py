"""Evaluate a fine-tuned UNet once on an evaluation pool (the test split by default).

:func:`run_evaluation` loads ``MODEL/best.safetensors`` (width from ``MODEL/result.json``, else
``MODEL/config.yaml``), predicts every labelled image of the pool with batched no-grad inference,
computes the per-image metrics of :mod:`cmunet.evaluation.metrics` (Dice, IoU, clDice, MHD, HD95,
NSD at ``eval.nsd_tolerance`` px, ADD; distances and the NSD also in mm where the manifest knows
the pixel spacing) and writes ``OUT/metrics.json``, ``OUT/per_image.csv``,
``OUT/overlays.png`` and ``OUT/bland_altman.png``, all logged to one MLflow run.

Images without a usable ground truth are left out and counted: unlabelled images of the pool
(tools/shard.py keeps an image unlabelled when its mask is empty or bad) and labelled images whose
mask has no foreground pixel.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import cmunet
from cmunet.config import flatten, read_yaml_mapping, save_config
from cmunet.data import location
from cmunet.data.index import SampleIndex
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet, collate
from cmunet.evaluation.figures import bland_altman_plot, save_overlays
from cmunet.evaluation.metrics import DEFAULT_KEYS, diameter_agreement, image_metrics, summarize
from cmunet.log import logger
from cmunet.models.export import read_weights
from cmunet.models.unet import UNet
from cmunet.outdir import check_out
from cmunet.tracking.mlflow_run import Tracker
from cmunet.training.finetune import WEIGHTS, FinetuneConfig, predict
from cmunet.training.precision import default_device, use_bf16

LOG = logger(__name__)
FILES = ("metrics.json", "per_image.csv", "overlays.png", "bland_altman.png", "config.yaml")


def trained_width(folder: Path) -> int:
    """The UNet width of a fine-tuning output folder (result.json, else config.yaml)."""
    if (folder / "result.json").is_file():
        return int(json.loads((folder / "result.json").read_text())["width"])
    if (folder / "config.yaml").is_file():
        return int(read_yaml_mapping(folder / "config.yaml")["model_width"])
    raise FileNotFoundError(f"{folder} has neither result.json nor config.yaml: is it a folder "
                            "written by launch/finetune.py?")


def load_finetuned(folder: str | Path) -> UNet:
    """The fine-tuned UNet saved in ``folder`` by launch/finetune.py."""
    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: give model=<the out folder of "
                                "launch/finetune.py>")
    width = trained_width(folder)
    model = UNet(width)
    try:
        model.load_state_dict(read_weights(weights))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit a UNet of width {width} (the width recorded in "
                         f"{folder}): {str(err).splitlines()[-1].strip()}") from None
    return model


def usable_samples(shards: str | Path, keys: Sequence[str]) -> tuple[InMemorySet, list[int],
                                                                      dict[str, list[str]]]:
    """The labelled images of ``keys``, the indices of those with a non-empty mask, and the
    excluded keys by reason."""
    index = SampleIndex.open(shards)
    ids, _ = index.find(keys)
    labelled = set(index.keys_of(ids[index["labelled"][ids]]))
    data = InMemorySet(shards, [k for k in keys if k in labelled])
    empty = [i for i, (_, _, mask) in enumerate(data.items) if not mask.any()]
    keep = sorted(set(range(len(data))) - set(empty))
    excluded = {"unlabelled": [k for k in keys if k not in labelled],
                "empty_ground_truth": [data.items[i][0] for i in empty]}
    return data, keep, excluded


def run_evaluation(cfg: FinetuneConfig, log: Callable[[str], None] = LOG.info) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.eval.pool`` of ``cfg.data.shards``; returns metrics.json."""
    for key, value in (("model", cfg.model), ("out", cfg.out), ("data.shards", cfg.data.shards)):
        if not value:
            raise ValueError(f"{key} is not set: evaluation needs model=FINETUNE_OUT out=EVAL "
                             "data.shards=SHARDS")
    out = check_out(cfg.out, {"model": cfg.model, "data.shards": cfg.data.shards})
    location.configure(cfg.data.remote)
    model = load_finetuned(cfg.model)
    keys = pool_keys(load_splits(location.join(cfg.data.shards, "splits.json")), cfg.eval.pool,
                     cfg.data.ratio)
    data, keep, excluded = usable_samples(cfg.data.shards, keys)
    if not keep:
        raise ValueError(f"pool {cfg.eval.pool!r} of {cfg.data.shards} has no image with a "
                         "non-empty ground-truth mask")
    for reason, names in excluded.items():
        if names:
            log(f"excluded {len(names)} images ({reason.replace('_', ' ')}): {', '.join(names)}")
    device = default_device()
    model.to(device, memory_format=torch.channels_last)
    loader = DataLoader(Subset(data, keep), batch_size=cfg.eval.batch_size, collate_fn=collate,
                        num_workers=cfg.data.num_workers)
    preds = predict(model, loader, device, use_bf16(device, cfg.train.precision))
    items = [data.items[i] for i in keep]
    spacings = [data.spacing[i] for i in keep]
    rows = [{"key": key, **image_metrics(pred, mask, spacing, cfg.eval.nsd_tolerance,
                                         cfg.eval.nsd_tolerance_mm)}
            for pred, (key, _, mask), spacing in zip(preds, items, spacings)]
    metrics = summarize_run(cfg, rows, spacings, excluded)
    write_outputs(cfg, out, rows, metrics, items, preds)
    track(cfg, out, metrics)
    log(f"{cfg.eval.pool}: {len(rows)} images, Dice {_fmt(metrics['dice'])}, clDice "
        f"{_fmt(metrics['cldice'])}, IoU {_fmt(metrics['iou'])}, HD {_fmt(metrics['hd'])} "
        f"(undefined for {metrics['hd']['n_undefined']}), ADD {_fmt(metrics['add'])} "
        f"(undefined for {metrics['add']['n_undefined']}); wrote {out}")
    return metrics


def summarize_run(cfg: FinetuneConfig, rows: list[dict], spacings: Sequence,
                  excluded: dict[str, list[str]]) -> dict:
    """metrics.json: the package version, a summary per metric, the diameter agreement (in mm
    when every image has a spacing, else in pixels) and what was evaluated and excluded."""
    units = "mm" if all(s is not None for s in spacings) else "px"
    agreement = diameter_agreement(*diameters(rows, units))
    return {"cmunet_version": cmunet.__version__, "model": cfg.model, "shards": cfg.data.shards,
            "pool": cfg.eval.pool, "n_images": len(rows),
            "n_excluded": {k: len(v) for k, v in excluded.items()},
            "excluded": excluded, **summarize(rows), "pearson_r": {**agreement, "units": units},
            "nsd_tolerance": {"px": cfg.eval.nsd_tolerance, "mm": cfg.eval.nsd_tolerance_mm}}


def diameters(rows: list[dict], units: str) -> tuple[list, list]:
    """Per-image mean diameters (ground truth, prediction) in ``units`` ("mm" or "px")."""
    suffix = "_mm" if units == "mm" else ""
    return [r[f"diam_gt{suffix}"] for r in rows], [r[f"diam_pred{suffix}"] for r in rows]


def write_outputs(cfg: FinetuneConfig, out: Path, rows: list[dict], metrics: dict,
                  items: list, preds: list[np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    columns = ["key"] + [k for k in DEFAULT_KEYS if any(k in r for r in rows)]
    with (out / "per_image.csv").open("w", newline="") as f:  # undefined values are left empty
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    shown = overlay_choice([r["dice"] for r in rows], cfg.eval.overlays)
    save_overlays([{"image": items[i][1], "pred": preds[i], "gt": items[i][2],
                    "title": items[i][0]} for i in shown], out / "overlays.png")
    units = metrics["pearson_r"]["units"]
    bland_altman_plot(*diameters(rows, units), out / "bland_altman.png", units=units)


def overlay_choice(dices: Sequence[float], count: int) -> list[int]:
    """Indices of ``count`` images spread evenly from the worst to the best Dice."""
    order = np.argsort(dices, kind="stable")
    picks = np.linspace(0, len(order) - 1, num=min(count, len(order))).round().astype(int)
    return [int(order[p]) for p in picks]


def track(cfg: FinetuneConfig, out: Path, metrics: dict) -> None:
    """One MLflow run: the config, the mean of every metric, the Pearson r, and the files."""
    tracker = Tracker(cfg.tracking, run_name=f"eval-{Path(cfg.model).name}", params=flatten(cfg),
                      shards=[cfg.data.shards], context="evaluation")
    means = {f"{cfg.eval.pool}_{k}": v["mean"] for k, v in metrics.items()
             if isinstance(v, dict) and v.get("mean") is not None}
    means |= {f"{cfg.eval.pool}_{k}_n_undefined": metrics[k]["n_undefined"] for k in ("hd", "add")}
    if metrics["pearson_r"]["pearson_r"] is not None:
        means[f"{cfg.eval.pool}_pearson_r"] = metrics["pearson_r"]["pearson_r"]
    tracker.log_metrics(means, step=0)
    for name in FILES:
        tracker.log_artifact(out / name)
    tracker.close()


def _fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "undefined"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"
