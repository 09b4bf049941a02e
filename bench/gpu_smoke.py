#!/usr/bin/env python
"""GPU readiness: every GPU-facing path once, on whatever CUDA devices this machine has.

    python bench/gpu_smoke.py            (or: make gpu-check)
    python bench/gpu_smoke.py --cpu      the same flow on the CPU at a tiny size (the test)

On synthetic angiograms: 2 pre-training steps through the real launcher (``deepspeed
--num_gpus N`` over NCCL when there are several GPUs, else one process; bf16 on GPUs), a short
fine-tune from its export, one search trial (Ray Tune, 2 folds) and a segmentation with the
search's model. Prints each stage's time and throughput, and whether bf16 autocast is really
active in the pre-training method's and the fine-tuned UNet's layers
(:func:`cmunet.training.precision.activation_dtypes`). Without a GPU and without --cpu it says
so and exits 0. Exit 1 when a stage fails (its log is named).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from cmunet.config import load_config
from cmunet.paths import config_file
from cmunet.training.launcher import pretrain_command, run_logged

# per device kind: synthetic frames, their side, UNet width, pre-training view, micro batch
SIZES = {"cuda": dict(count=80, size=256, width=32, view=224, micro=16),
         "cpu": dict(count=40, size=64, width=8, view=64, micro=4)}
RATIO = "50-30"


def bf16_report(module: torch.nn.Module, run) -> str:
    from cmunet.training.precision import activation_dtypes

    dtypes = activation_dtypes(module, run)
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return f"bf16 active: {dtypes == {torch.bfloat16}} (layer outputs {names})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU at a tiny size (when there is no GPU: the test)")
    parser.add_argument("--out", help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu:
        print("no CUDA device visible (torch.cuda.device_count() == 0): nothing to check; "
              "--cpu runs the same flow on the CPU")
        return 0
    kind = "cpu" if args.cpu else "cuda"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return run(Path(args.out), kind, gpus)
    with tempfile.TemporaryDirectory(prefix="cmunet-gpu-check-") as folder:
        return run(Path(folder), kind, gpus)


def run(out: Path, kind: str, gpus: int) -> int:
    size = SIZES[kind]
    device = torch.device(kind)
    where = (f"{gpus} x {torch.cuda.get_device_name(0)}" if kind == "cuda" else "CPU")
    print(f"device: {where}; torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version())) if kind == 'cuda' else '-'}")
    rows = []
    try:
        shards = make_shards(out, size)
        rows.append(pretrain_stage(out, shards, kind, gpus, size))
        export = out / "pretrain" / "export"
        rows.append(finetune_stage(out, shards, export, device, size))
        rows.append(search_stage(out, shards, export, kind))
        rows.append(segment_stage(out, device))
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        for row in rows:
            print(row)
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print("\n".join(["", "stage        result", *rows]))
    return 0


def make_shards(out: Path, size: dict) -> Path:
    from cmunet.data.sharding import ShardConfig, build_shards
    from cmunet.data.synth import generate

    images, shards = out / "synthetic", out / "shards"
    for folder, count, seed in ((images, size["count"], 0), (out / "new", 4, 1)):
        generate(folder, count=count, size=size["size"], seed=seed, workers=2, overwrite=True)
    build_shards(ShardConfig.for_folder(images, shards, ratios=[RATIO], overwrite=True),
                 log=lambda *_: None)
    return shards


def pretrain_stage(out: Path, shards: Path, kind: str, gpus: int, size: dict) -> str:
    from cmunet.methods import build_method
    from cmunet.training.precision import use_bf16
    from cmunet.training.pretrain_config import PretrainConfig

    name = "configs/pretrain/cmunet.yaml" if kind == "cuda" else "configs/pretrain/cmunet-cpu.yaml"
    overrides = [f"data.shards={shards}", f"data.ratio={RATIO}", f"out={out / 'pretrain'}",
                 f"view_size={size['view']}", f"model.width={size['width']}",
                 "train.epochs=1", "train.warmup_epochs=0", "train.steps_per_epoch=2",
                 f"train.micro_batch={size['micro']}", "train.global_batch=0",
                 "train.log_every=1", "data.num_workers=0", "tracking.enabled=false"]
    launcher = f"deepspeed --num_gpus {gpus}" if kind == "cuda" and gpus > 1 else ""
    command = pretrain_command(launcher, config_file(name), overrides)
    log = out / "pretrain.log"
    start = time.perf_counter()
    run_logged(command, log, "pre-training")
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader((out / "pretrain" / "log.csv").open()))
    rate = float(rows[-1]["images_per_s"]) if rows else float("nan")
    said = next((line.strip() for line in log.read_text().splitlines() if "rank(s) on" in line), "")
    ranks = said.split("|")[1].strip() if "|" in said else "?"
    cfg = load_config(PretrainConfig, config_file(name), overrides)
    device = torch.device(kind)
    method = build_method(cfg).to(device)
    method.autocast_device = kind if use_bf16(device, cfg.train.precision) else None
    images = torch.randn(size["micro"], 1, size["size"], size["size"], device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    bf16 = bf16_report(method, lambda: method(images, gen)[0].backward())
    return (f"pre-train    2 steps, {ranks}{' (NCCL)' if launcher else ''}: "
            f"{rate:.1f} img/s in the last step, {seconds:.0f} s with start-up; {bf16}")


def finetune_stage(out: Path, shards: Path, export: Path, device: torch.device,
                   size: dict) -> str:
    from cmunet.training.finetune import FinetuneConfig, run_finetune
    from cmunet.training.precision import autocast, use_bf16

    cfg = load_config(FinetuneConfig, config_file("configs/finetune/cpu.yaml"), [
        f"data.shards={shards}", f"data.ratio={RATIO}", f"init={export}",
        f"out={out / 'finetune'}", "train.epochs=2", "train.batch_size=4", "eval.overlays=1",
        "tracking.enabled=false"])
    start = time.perf_counter()
    result = run_finetune(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - start
    from cmunet.models.unet import UNet

    net = UNet(size["width"]).to(device)
    images = torch.randn(4, 1, size["size"], size["size"], device=device)
    with autocast(device, use_bf16(device, cfg.train.precision)):
        bf16 = bf16_report(net, lambda: net(images))
    return (f"fine-tune    2 epochs in {seconds:.1f} s, validation Dice "
            f"{result.best_val_dice:.3f}; {bf16}")


def search_stage(out: Path, shards: Path, export: Path, kind: str) -> str:
    from cmunet.training.tune import run_tune
    from cmunet.training.tune_config import TuneConfig

    cfg = load_config(TuneConfig, config_file("configs/tune/cpu.yaml"), [
        f"data.shards={shards}", f"data.ratio={RATIO}", f"init={export}",
        f"out={out / 'search'}", "train.epochs=1", "search.lr=[1.0e-3]",
        "search.batch_size=[4]", "search.folds=2", "search.verbose=0", "eval.overlays=1",
        f"search.gpus_per_trial={1 if kind == 'cuda' else 0}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.register_as=",
        "alias="])
    start = time.perf_counter()
    result = run_tune(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return (f"search       1 trial x 2 folds, retrain and test in {seconds:.0f} s, test Dice "
            f"{result['test'].get('test_dice', float('nan')):.3f}")


def segment_stage(out: Path, device: torch.device) -> str:
    from cmunet.inference.model import load_model
    from cmunet.inference.predict import SegmentOptions
    from cmunet.inference.segment import run_segment

    model = load_model(str(out / "search" / "model"), device=device)
    start = time.perf_counter()
    report = run_segment(model, out / "new" / "images", out / "segment", SegmentOptions(),
                         progress=False)
    seconds = time.perf_counter() - start
    if report.exit_code:
        raise RuntimeError(f"segmentation failed: {report.errors}")
    return (f"segment      {len(report.images)} images in {seconds:.2f} s "
            f"({len(report.images) / seconds:.1f} img/s): {model.describe()}")


if __name__ == "__main__":
    sys.exit(main())
