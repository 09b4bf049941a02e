"""The demo: the whole pipeline on synthetic angiograms, from nothing to segmented new images.

1. synthetic angiograms with vessel masks, plus a few frames of new patients kept for the end;
2. WebDataset shards, manifest and patient-grouped splits;
3. CM-UNet pre-training on the pre-training pool, 2 ranks under ``deepspeed`` (gloo on CPU);
4. the Ray Tune cross-validated search on the (small) fine-tuning pool, twice: from random weights
   and from the pre-training export; each winner is retrained and evaluated once on the test split;
5. the pre-trained winner is registered in MLflow with the alias ``champion``;
6. ``models:/NAME@champion`` segments the held-out frames (masks, overlays, diameters.csv).

Everything lands in ``out`` (MLflow store ``out/mlflow.db``); a stage whose output exists is
skipped, so an interrupted demo continues where it stopped (delete ``out`` to start over).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cmunet.config import check, load_config, save_config
from cmunet.log import logger
from cmunet.tracking.mlflow_run import TrackingConfig
from cmunet.tracking.uri import resolve_uri
from cmunet.paths import config_file
from cmunet.training.launcher import job_overrides, pretrain_command, run_logged

LOG = logger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo"
    synthetic_count: int = 160  # frames (4 per synthetic patient)
    synthetic_size: int = 128
    held_out: int = 4  # frames of new patients, segmented at the end
    ratio: str = "70-10"  # PT-FT split: 112 unlabelled frames, 16 labelled (4 patients), 32 test
    pretrain_config: str = "configs/pretrain/cmunet-cpu.yaml"
    pretrain_launcher: str = "deepspeed --num_gpus 2"  # "" = one process (plain Python)
    pretrain_overrides: list[str] = field(default_factory=lambda: [
        "train.epochs=40", "train.warmup_epochs=4",
        "train.figure_every=10", "train.checkpoint_every=100"])
    tune_config: str = "configs/tune/cpu.yaml"
    tune_overrides: list[str] = field(default_factory=lambda: [
        "train.epochs=30", "search.folds=3", "search.verbose=0", "eval.overlays=4"])
    # register_as: the pre-trained search's winner is registered under it (alias champion)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="cmunet-demo", register_as="cmunet-demo"))

    def __post_init__(self):
        check(self.synthetic_count >= 40, "synthetic_count", "must be >= 40 (10 patients)")
        check(self.held_out >= 1, "held_out", "must be >= 1")
        check(bool(self.tracking.enabled and self.tracking.register_as), "tracking",
              "must be enabled with register_as set: the demo segments with the registered model")


def stage(title: str) -> None:
    LOG.info(f"\n== {title}")


def run_demo(cfg: DemoConfig) -> dict:
    start = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a short log
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(cfg.tracking.uri or f"sqlite:///{out / 'mlflow.db'}")
    cfg = replace(cfg, out=str(out), tracking=replace(cfg.tracking, uri=uri))
    save_config(cfg, out / "demo.yaml")

    stage(f"1/6 synthetic angiograms: {cfg.synthetic_count} + {cfg.held_out} held-out frames "
          f"of {cfg.synthetic_size}^2")
    images, held_out = synthesize(cfg, out)
    stage("2/6 shards: preprocessing, manifest, patient-grouped splits")
    shards = make_shards(cfg, images, out / "shards")
    stage(f"3/6 CM-UNet pre-training ({cfg.pretrain_launcher or 'one process'})")
    export = pretrain(cfg, shards, out / "pretrain")
    stage("4/6 cross-validated fine-tuning search (Ray Tune), without and with pre-training")
    scratch = tune(cfg, shards, "none", out / "finetune-scratch", register=False)
    pretrained = tune(cfg, shards, str(export), out / "finetune-pretrained", register=True)
    stage(f"5/6 registered: models:/{cfg.tracking.register_as}@champion")
    LOG.info(f"  version {pretrained['registered']['version']} of {cfg.tracking.register_as} "
             f"(alias champion) in {uri}")
    stage("6/6 segmentation of the held-out frames with models:/"
          f"{cfg.tracking.register_as}@champion")
    held_dice = segment(cfg, held_out, out / "segment")

    summary = {
        "test_dice_scratch": scratch["test"]["test_dice"],
        "test_dice_pretrained": pretrained["test"]["test_dice"],
        "held_out_dice": held_dice,
        "model": f"models:/{cfg.tracking.register_as}@champion",
        "seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(cfg, out, summary, scratch, pretrained)
    return summary


def synthesize(cfg: DemoConfig, out: Path) -> tuple[Path, Path]:
    from cmunet.data.synth import generate

    images, held_out = out / "synthetic", out / "held-out"
    for folder, count, seed in ((images, cfg.synthetic_count, 0), (held_out, cfg.held_out, 1)):
        if (folder / "meta.csv").exists():
            LOG.info(f"  {folder} exists, kept")
            continue
        generate(folder, count=count, size=cfg.synthetic_size, seed=seed, workers=2,
                 overwrite=True)
    LOG.info(f"  {images}/images, masks, meta.csv; held-out frames (another seed: new patients) "
             f"in {held_out}")
    return images, held_out


def make_shards(cfg: DemoConfig, images: Path, shards: Path) -> Path:
    from cmunet.data.sharding import ShardConfig, build_shards
    from cmunet.data.splits import load_splits

    if not (shards / "manifest.json").exists():
        build_shards(ShardConfig.for_folder(images, shards, ratios=[cfg.ratio], overwrite=True),
                     log=lambda *_: None)
    manifest = json.loads((shards / "manifest.json").read_text())
    pools = load_splits(shards / "splits.json")
    split = pools["ratios"][cfg.ratio]
    LOG.info(f"  {manifest['count']} samples of {manifest['patients']} patients in "
             f"{len(manifest['shards'])} shards; split {cfg.ratio}: pre-training "
             f"{len(split['pretrain']['keys'])} (unlabelled use), fine-tuning "
             f"{len(split['finetune']['keys'])} labelled, test {len(pools['test']['keys'])}")
    return shards


def pretrain(cfg: DemoConfig, shards: Path, folder: Path) -> Path:
    export = folder / "export"
    if (export / "model.safetensors").exists():
        LOG.info(f"  {export} exists, kept")
        return export
    command = pretrain_command(cfg.pretrain_launcher, config_file(cfg.pretrain_config), [
        *job_overrides(shards, cfg.ratio, folder, cfg.tracking, "demo pre-training"),
        *cfg.pretrain_overrides])
    LOG.info(f"  {shlex.join(command)}\n  (log: {folder / 'stdout.log'})")
    run_logged(command, folder / "stdout.log", "pre-training")
    losses = _last_row(folder / "log.csv")
    if losses:
        LOG.info("  last epoch: " + ", ".join(f"{k} {float(v):.4f}" for k, v in losses.items()
                                              if "loss" in k))
    LOG.info(f"  export: {export}; reconstructions: {folder / 'figures'}")
    return export


def _last_row(path: Path) -> dict[str, str]:
    import csv

    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    return rows[-1] if rows else {}


def tune(cfg: DemoConfig, shards: Path, init: str, folder: Path, register: bool) -> dict:
    from cmunet.training.pretrain_config import PretrainConfig
    from cmunet.training.tune import run_tune
    from cmunet.training.tune_config import TuneConfig

    if (folder / "result.json").exists():
        LOG.info(f"  {folder} exists, kept")
        return json.loads((folder / "result.json").read_text())
    width = load_config(PretrainConfig, config_file(cfg.pretrain_config), cfg.pretrain_overrides)
    tune_cfg = load_config(TuneConfig, config_file(cfg.tune_config), [
        *job_overrides(shards, cfg.ratio, folder, cfg.tracking,
                       f"demo search init={'pre-trained' if register else 'none'}"),
        f"init={init}", f"model_width={width.model.width}",
        f"tracking.register_as={cfg.tracking.register_as if register else ''}",
        f"alias={'champion' if register else ''}", *cfg.tune_overrides])
    LOG.info(f"  init={init}")
    return run_tune(tune_cfg, log=lambda m: LOG.info(f"  {m}"))


def segment(cfg: DemoConfig, held_out: Path, out: Path) -> float:
    """Segment the held-out frames with the champion; their mean Dice against the true masks."""
    from cmunet.data.io import read_frames, read_mask
    from cmunet.evaluation.metrics import dice
    from cmunet.inference.model import load_model
    from cmunet.inference.predict import SegmentOptions
    from cmunet.inference.segment import run_segment

    model = load_model(f"models:/{cfg.tracking.register_as}@champion", cfg.tracking.uri)
    report = run_segment(model, held_out / "images", out, SegmentOptions(), progress=False)
    scores = []
    for name in report.images:
        image = read_frames(held_out / "images" / f"{name}.png")[0].pixels
        truth = read_mask(held_out / "masks" / f"{name}.png", image.shape) > 0
        predicted = read_mask(out / "masks" / f"{name}.png", image.shape) > 0
        scores.append(dice(predicted, truth))
    LOG.info(f"  {len(report.images)} frames -> {out}/masks, overlays, diameters.csv; "
             f"Dice against their synthetic masks {np.mean(scores):.3f}")
    return float(np.mean(scores))


def print_summary(cfg: DemoConfig, out: Path, summary: dict, scratch: dict,
                  pretrained: dict) -> None:
    store = cfg.tracking.uri
    lines = [
        "", "== summary",
        f"test Dice without pre-training {summary['test_dice_scratch']:.3f} "
        f"(lr {scratch['best']['lr']:g}, {scratch['epochs']} epochs)",
        f"test Dice with CM-UNet pre-training {summary['test_dice_pretrained']:.3f} "
        f"(lr {pretrained['best']['lr']:g}, {pretrained['epochs']} epochs)",
        f"held-out frames segmented by {summary['model']}: Dice {summary['held_out_dice']:.3f}",
        "(one seed on synthetic data: a demonstration of the pipeline, not a comparison; see "
        "docs/results.md for the study on real angiograms)",
        "figures:",
        f"  pre-training reconstructions  {out / 'pretrain' / 'figures'}",
        f"  test overlays, Bland-Altman   {out / 'finetune-pretrained' / 'test'}",
        f"  segmented held-out frames     {out / 'segment' / 'overlays'}",
        f"MLflow UI: tools/mlflow_ui.sh --store {store} --artifacts {out / 'mlartifacts'}"
        "   (then open http://127.0.0.1:5000)",
        f"demo finished in {summary['seconds'] / 60:.1f} min; outputs in {out}",
    ]
    LOG.info("\n".join(lines))
