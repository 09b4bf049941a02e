"""The study: pre-training arms x label budgets x seeds, each cell scored once on the test split.

For every arm (a method, or a named variant of one) and seed, pre-training runs once on the
split's pre-training pool (``launch/pretrain.py`` in a subprocess, so a multi-rank launcher can be
used) -- or on other folders (``data.pretrain_shards``), never on a test image; a budget given as
another PT-FT ratio pre-trains on that ratio's own pool, disjoint from its labels; for every label
budget the cross-validated search (:func:`cmunet.training.tune.run_tune`)
fine-tunes from that export on the budget's images, retrains the winner on all of them and
evaluates it once on the test split. Cells whose test metrics exist are skipped, and pre-training
resumes from its checkpoints, so an interrupted study continues where it stopped. Everything is
logged to one MLflow experiment; ``results.csv``, ``results.md`` and ``dice_vs_budget.png`` are
written at the end (and can be rebuilt from the cells at any time with ``--report``).

Label budgets (``budgets``): ``all`` (the fine-tuning pool of ``data.ratio``), a PT-FT ratio
(``79-1``: that ratio's fine-tuning pool) or a number of labelled images, drawn round-robin from
the pool's patients in the splits' seeded patient order: one frame per patient per round, frames
chosen by the cell's seed, so that few labels still come from several patients (and from several
patients per cross-validation fold) and smaller budgets are subsets of larger ones.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np

from cmunet.config import load_config, save_config
from cmunet.data.overlap import refuse_test_overlap
from cmunet.data import location
from cmunet.data.splits import load_splits, parse_ratio, pool_keys
from cmunet.log import logger
from cmunet.outdir import check_out
from cmunet.dose import dose_arms, dose_report
from cmunet.study_labels import selected_keys
from cmunet.study_config import (Cell, StudyConfig, StudyData, arm_of, cells, pretrain_name,
                                 pretrain_ratio)
from cmunet.study_stats import UNKNOWN, format_gain, grid_edge_line, mean_std, paired_gain
from cmunet.tracking.uri import resolve_uri
from cmunet.training.tune_results import edge_labels
from cmunet.paths import config_file
from cmunet.training.launcher import job_overrides, pretrain_command, run_logged

LOG = logger(__name__)
METRICS = ("dice", "cldice", "iou", "hd", "add")
UNDEFINED = ("hd", "add")  # undefined (None) for an empty prediction: counted, never averaged


class Deferred(Exception):
    """A cell waits for a pre-training that runs elsewhere (``defer_pretraining``)."""


def budget_keys(splits: dict, ratio: str, budget: str, patient_of: dict[str, str],
                seed: int) -> list[str]:
    """The labelled images of a budget (see the module docstring)."""
    if budget == "all":
        return pool_keys(splits, "finetune", ratio)
    if not budget.isdigit():
        parse_ratio(budget)
        return pool_keys(splits, "finetune", budget)
    pool = set(pool_keys(splits, "finetune", ratio))
    n = int(budget)
    if n > len(pool):
        raise ValueError(f"budget {n} exceeds the {len(pool)} labelled images of the {ratio} pool")
    rng = random.Random(seed)
    frames = {}
    for patient in splits["finetune_order"]:
        keys = sorted(k for k in pool if patient_of[k] == patient)
        rng.shuffle(keys)
        if keys:
            frames[patient] = keys
    chosen: list[str] = []
    while len(chosen) < n:
        for patient, keys in frames.items():
            if keys and len(chosen) < n:
                chosen.append(keys.pop(0))
    return sorted(chosen)


def pretrain_data(cfg: StudyConfig) -> list[str]:
    """Pre-training overrides for ``data.pretrain_shards``: those folders only (``data.shards``
    still names the test split they are checked against)."""
    if not cfg.data.pretrain_shards:
        return []
    folders = ", ".join(location.absolute(f) for f in cfg.data.pretrain_shards)
    return ["data.pool=none", f"data.extra_shards=[{folders}]"]


# ---- running -------------------------------------------------------------------------------

def run_study(cfg: StudyConfig, log=LOG.info) -> Path:
    if not cfg.out:
        raise ValueError("out is not set: give the study folder, e.g. out=runs/study")
    check_out(cfg.out, {"data.shards": cfg.data.shards, **{
        f"data.pretrain_shards[{i}]": f for i, f in enumerate(cfg.data.pretrain_shards)}})
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, tracking=replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)))
    if not cfg.data.shards:
        cfg = replace(cfg, data=replace(cfg.data, shards=str(synthetic_shards(cfg.data, out))))
    save_config(cfg, out / "study.yaml")
    if cfg.report_only:
        return report(cfg, out)
    refuse_test_overlap(cfg.data.shards, cfg.data.pretrain_shards)  # before any cell starts
    todo = cells(cfg)
    for number, cell in enumerate(todo, start=1):
        done = out / "cells" / cell.name / "test" / "metrics.json"
        if done.exists():
            log(f"[{number}/{len(todo)}] {cell.name}: done, skipped")
            continue
        try:
            export = pretrain(cfg, cell, out, log)
        except Deferred as why:
            log(f"[{number}/{len(todo)}] {cell.name}: deferred, {why}")
            continue
        log(f"[{number}/{len(todo)}] {cell.name}")
        finetune(cfg, cell, export, out, log)
    return report(cfg, out)


def synthetic_shards(data: StudyData, out: Path) -> Path:
    """Synthetic angiograms and their shards in OUT/data (made once)."""
    from cmunet.data.sharding import ShardConfig, build_shards
    from cmunet.data.synth import generate

    shards = out / "data" / "shards"
    if not (shards / "manifest.json").exists():
        images = out / "data" / "synthetic"
        generate(images, count=data.synthetic_count, size=data.synthetic_size, seed=0,
                 overwrite=True)
        build_shards(ShardConfig.for_folder(images, shards, overwrite=True), log=lambda *_: None)
    return shards


def pretrain(cfg: StudyConfig, cell: Cell, out: Path, log) -> str:
    """The cell's pre-training export (trained now unless it exists), or "none"."""
    arm = arm_of(cfg, cell.arm)
    if arm.share:
        shared = replace(cell, arm=arm.share)
        if not arm.export:
            return pretrain(cfg, shared, out, log)
        export = out / "pretrain" / pretrain_name(cfg, shared)[0] / "exports" / arm.export
        if not (export / "model.safetensors").exists():
            if cfg.defer_pretraining:
                raise Deferred(f"{export} does not exist yet")
            pretrain(cfg, shared, out, log)
        if not (export / "model.safetensors").exists():
            raise FileNotFoundError(f"{export} was not written by the pre-training of "
                                    f"{arm.share}: add its epoch to train.export_epochs")
        return str(export)
    if arm.method == "none":
        return "none"
    seed = cfg.seeds[0] if cfg.pretrain_once else cell.seed
    name, run_name = pretrain_name(cfg, cell)
    folder = out / "pretrain" / name
    export = folder / "export"
    if (export / "model.safetensors").exists():
        return str(export)
    if cfg.defer_pretraining:
        raise Deferred(f"{export} does not exist yet")
    config = config_file(cfg.pretrain_config.format(method=arm.method))
    command = pretrain_command(cfg.pretrain_launcher, config, [
        *job_overrides(cfg.data.shards, pretrain_ratio(cfg, cell.budget), folder, cfg.tracking,
                       run_name),
        f"seed={seed}", *pretrain_data(cfg), *cfg.pretrain_overrides, *arm.pretrain])
    log(f"  pre-training: {shlex.join(command)}")
    run_logged(command, folder / "stdout.log", f"pre-training {name}")
    return str(export)


def label_encoder(cfg: StudyConfig, cell: Cell, init: str, out: Path, log) -> str:
    """The export whose encoder picks the cell's labels: ``label_encoder``'s (an arm, trained now
    unless its export exists, or an export path), else the cell's own initialisation."""
    name = arm_of(cfg, cell.arm).label_encoder
    if not name:
        return init
    if "/" in name:  # an export of a pre-training run elsewhere
        return location.absolute(name)
    return pretrain(cfg, replace(cell, arm=name), out, log)


def finetune(cfg: StudyConfig, cell: Cell, init: str, out: Path, log) -> dict:
    """The cross-validated search on the cell's labels, then one test evaluation."""
    from cmunet.training.finetune import patients_of
    from cmunet.training.tune import run_tune
    from cmunet.training.tune_config import TuneConfig

    arm = arm_of(cfg, cell.arm)
    splits = load_splits(location.join(cfg.data.shards, "splits.json"))
    patient_of = patients_of(cfg.data.shards)
    if arm.labels == "random":
        keys = budget_keys(splits, cfg.data.ratio, cell.budget, patient_of, cell.seed)
    else:
        encoder = label_encoder(cfg, cell, init, out, log)
        keys = selected_keys(cfg.data.shards, splits, cfg.data.ratio, cell.budget, arm.labels,
                             cell.seed, encoder, patient_of, out, log)
    tune_cfg = load_config(TuneConfig, config_file(cfg.tune_config), [
        *job_overrides(cfg.data.shards, cfg.data.ratio, out / "cells" / cell.name, cfg.tracking,
                       f"tune {cell.name}"),
        f"init={init}", f"seed={cell.seed}", "tracking.register_as=", "alias=", "onnx=false",
        *cfg.tune_overrides, *arm.tune])
    if cfg.min_samples_seen:
        per_fold = len(keys) * (tune_cfg.search.folds - 1) / tune_cfg.search.folds
        epochs = max(tune_cfg.train.epochs, math.ceil(cfg.min_samples_seen / per_fold))
        tune_cfg = replace(tune_cfg, train=replace(tune_cfg.train, epochs=epochs))
    log(f"  fine-tuning search on {len(keys)} labelled images, init {init}, "
        f"{tune_cfg.train.epochs} epochs per fold")
    return run_tune(tune_cfg, log=lambda m: log(f"  {m}"), keys=keys)


# ---- reporting -----------------------------------------------------------------------------

def collect(cfg: StudyConfig, out: Path) -> list[dict]:
    """One row per finished cell, from the cells' files. ``grid_edge``: where the search's winner
    sat on an edge of its grid (:func:`cmunet.training.tune_results.edge_labels`; "" nowhere,
    :data:`UNKNOWN` for a search that did not record it)."""
    rows = []
    for cell in cells(cfg):
        folder = out / "cells" / cell.name
        metrics_file = folder / "test" / "metrics.json"
        if not metrics_file.exists():
            continue
        metrics = json.loads(metrics_file.read_text())
        result = json.loads((folder / "result.json").read_text())
        row = {"arm": cell.arm, "method": arm_of(cfg, cell.arm).method,
               "labels": arm_of(cfg, cell.arm).labels, "budget": cell.budget,
               "n_labels": len(json.loads((folder / "model" / "result.json").read_text())
                               ["train_keys"]),
               "seed": cell.seed, "cv_dice": result["best"]["cv_dice"],
               "lr": result["best"]["lr"], "batch_size": result["best"]["batch_size"],
               "epochs": result["epochs"], "params_m": _params(cfg, out, cell)}
        for name in METRICS:
            row[name] = (metrics.get(name) or {}).get("mean")
        row["n_test"] = metrics.get("n_images")
        for name in UNDEFINED:  # test images without a value: a model outputting nothing is seen
            row[f"{name}_undefined"] = (metrics.get(name) or {}).get("n_undefined")
        row["tune_run_id"] = result.get("parent_run_id")
        row["grid_edge"] = edge_labels(result["grid_edge"]) if "grid_edge" in result else UNKNOWN
        rows.append(row)
    return rows


def _params(cfg: StudyConfig, out: Path, cell: Cell) -> float:
    """Parameters (millions) of the arm's pre-training model; the plain UNet for 'none'."""
    from cmunet.methods import build_method
    from cmunet.models.unet import UNet, count_parameters
    from cmunet.training.pretrain_config import PretrainConfig

    arm = arm_of(cfg, cell.arm)
    if arm.share:
        return _params(cfg, out, replace(cell, arm=arm.share))
    config = out / "pretrain" / pretrain_name(cfg, cell)[0] / "config.yaml"
    if arm.method == "none" or not config.exists():
        tune_cfg = json.loads((out / "cells" / cell.name / "model" / "result.json").read_text())
        return count_parameters(UNet(tune_cfg["width"])) / 1e6
    return count_parameters(build_method(load_config(PretrainConfig, config))) / 1e6


def report(cfg: StudyConfig, out: Path) -> Path:
    rows = collect(cfg, out)
    if not rows:
        raise RuntimeError(f"no finished cell in {out / 'cells'}")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(table(cfg, rows))
    figure(cfg, rows, out / "dice_vs_budget.png")
    loss_curves(sorted((out / "pretrain").glob("*/log.csv")), out / "pretrain_losses.png")
    if dose_arms(cfg, out):
        dose_report(cfg, out, rows)
    return out


def _with_undefined(rows: list[dict], name: str) -> str:
    """Mean ± std of ``name`` and its undefined images over the rows' test images, "(k/N)"."""
    undefined = sum(r.get(f"{name}_undefined") or 0 for r in rows)
    total = sum(r.get("n_test") or 0 for r in rows)
    return f"{mean_std([r[name] for r in rows])} ({undefined}/{total})"


def _paired_gain(rows: list[dict], arm: str, budget: str, reference: str) -> str:
    gain = paired_gain(rows, arm, budget, reference)
    return "–" if gain is None else format_gain(*gain)


def table(cfg: StudyConfig, rows: list[dict]) -> str:
    """Table-I-style markdown: per budget, one line per arm, mean ± std over seeds."""
    reference = cfg.reference or cfg.arms[0]
    source = (f"; pre-trained on {', '.join(cfg.data.pretrain_shards)}"
              if cfg.data.pretrain_shards else "")
    lines = [f"# Study results ({cfg.data.shards}, split {cfg.data.ratio}{source})", "",
             f"Mean ± std over seeds; HD = modified Hausdorff (px); ADD = artery diameter "
             f"difference (px); gain = paired Dice difference to `{reference}` with a 95% "
             "t interval over seeds. HD and ADD are undefined for an image whose prediction is "
             "empty and left out of their means: (k/N) counts such images among the seeds' N "
             "test images.", "", grid_edge_line(rows), ""]
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    for budget in budgets:
        here = [r for r in rows if r["budget"] == budget]
        labels = sorted({r["n_labels"] for r in here})
        lines += [f"## budget {budget} ({'/'.join(map(str, labels))} labelled images)", "",
                  "| arm | params (M) | Dice | clDice | IoU | HD (undef.) | ADD (undef.) | gain vs "
                  f"{reference} | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for arm in dict.fromkeys(r["arm"] for r in here):
            mine = [r for r in here if r["arm"] == arm]
            cells_ = [_with_undefined(mine, m) if m in UNDEFINED else
                      mean_std([r[m] for r in mine]) for m in METRICS]
            lines.append(f"| {arm} | {mine[0]['params_m']:.2f} | {' | '.join(cells_)} | "
                         f"{_paired_gain(rows, arm, budget, reference)} | {len(mine)} |")
        lines.append("")
    return "\n".join(lines)


def figure(cfg: StudyConfig, rows: list[dict], path: Path) -> Path:
    """Dice against the number of labelled images (the paper's Fig. 3), one line per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm in dict.fromkeys(r["arm"] for r in rows):
        points = {}
        for r in rows:
            if r["arm"] == arm and r["dice"] is not None:
                points.setdefault(r["n_labels"], []).append(r["dice"])
        xs = sorted(points)
        means = [np.mean(points[x]) for x in xs]
        stds = [np.std(points[x], ddof=1) if len(points[x]) > 1 else 0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ticks = sorted({r["n_labels"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled images for fine-tuning")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    tmp.replace(path)
    return path


def loss_curves(logs: list[Path], path: Path) -> Path | None:
    """Each pre-training's loss terms per epoch (means of the logged steps), one panel per arm,
    with the contrastive branch's health where it was logged (retrieval accuracy, chance)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not logs:
        return None
    columns = 4
    rows_ = math.ceil(len(logs) / columns)
    fig = Figure(figsize=(3.2 * min(columns, len(logs)), 2.6 * rows_), dpi=110)
    FigureCanvasAgg(fig)
    for number, log in enumerate(logs, start=1):
        ax = fig.add_subplot(rows_, min(columns, len(logs)), number)
        table_ = list(csv.DictReader(log.open()))
        epochs = sorted({float(r["epoch"]) for r in table_})
        # the losses, the contrastive loss's collapsed value and the retrieval accuracy with
        # its chance value (cmunet.methods.losses.contrastive_health), all in [0, ~1]
        shown = ("loss", "con_top1")
        for name in [c for c in (table_[0] if table_ else {}) if c.startswith(shown)]:
            means = [np.mean([float(r[name]) for r in table_ if float(r["epoch"]) == e])
                     for e in epochs]
            ax.plot(epochs, means, label=name)
        ax.set_title(log.parent.name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path

