"""``--dry-run``: what a pre-training job would do, without starting ranks or DeepSpeed.

Reads the manifest and splits, resolves the pool, the global batch, the learning rate and the
number of steps as :mod:`cmunet.training.pretrain` does, and names the checkpoint it would
resume from. The world size is WORLD_SIZE (set by launchers), else 1, else ``world_size``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cmunet.data import location
from cmunet.data.splits import load_splits, pool_keys
from cmunet.outdir import check_out
from cmunet.training import checkpoint as ckpt
from cmunet.training.optim import global_batch, scaled_lr
from cmunet.training.pretrain import pretrain_stream
from cmunet.training.pretrain_config import PretrainConfig


def pretrain_plan(cfg: PretrainConfig, world_size: int | None = None) -> dict:
    """The resolved numbers of a pre-training run (raises the errors the run would raise)."""
    t = cfg.train
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_out(cfg.out, {"data.shards": cfg.data.shards})
    stream = pretrain_stream(cfg, 0, world)
    per_folder = {source.folder: source.per_epoch for source in stream.sources}
    main = per_folder.pop(cfg.data.shards, 0) if cfg.data.pool != "none" else 0
    extra, pool = per_folder, stream.epoch_size
    batch = global_batch(t.micro_batch, t.grad_accum, world)
    steps_per_epoch = t.steps_per_epoch or max(1, math.ceil(pool / batch))
    folder = Path(cfg.out) / "checkpoints"
    found = ckpt.find_resumable(folder, ckpt.fingerprint(cfg, world)) if folder.is_dir() else None
    return {"method": cfg.method, "world_size": world, "pool": f"{cfg.data.pool}/{cfg.data.ratio}",
            "pool_images": main, "extra_images": extra, "global_batch": batch,
            "lr": scaled_lr(t.base_lr, t.micro_batch, t.grad_accum, world),
            "steps_per_epoch": steps_per_epoch, "epochs": t.epochs,
            "total_steps": steps_per_epoch * t.epochs,
            "resume_from": str(folder / found[0]) if found else None,
            "resume_step": found[1]["step"] if found else 0, "out": cfg.out}


def describe(plan: dict) -> str:
    extra = ", ".join(f"{k}: {v}" for k, v in plan["extra_images"].items())
    return "\n".join([
        f"dry run of {plan['method']} pre-training into {plan['out']} (nothing started)",
        f"pool {plan['pool']}: {plan['pool_images']} images" + (f" + {extra}" if extra else ""),
        f"world size {plan['world_size']}, global batch {plan['global_batch']}, "
        f"lr {plan['lr']:.3g}",
        f"{plan['steps_per_epoch']} steps/epoch x {plan['epochs']} epochs = "
        f"{plan['total_steps']} steps",
        f"resume from {plan['resume_from']} (step {plan['resume_step']})"
        if plan["resume_from"] else "starts from scratch (no compatible checkpoint)"])


def search_plan(cfg) -> str:
    """What ``launch/tune.py`` would run (TuneConfig ``cfg``): pool, folds and trials, and the
    saved search state it would continue; no Ray is started."""
    from cmunet.training.finetune import patients_of
    from cmunet.training.tune import patient_folds

    s = cfg.search
    from cmunet.tracking.registry import is_mlflow_uri

    init = None if cfg.init == "none" or is_mlflow_uri(cfg.init) else cfg.init
    check_out(cfg.out, {"data.shards": cfg.data.shards, "init": init})
    splits = load_splits(location.join(cfg.data.shards, "splits.json"))
    pool = pool_keys(splits, "finetune", cfg.data.ratio)
    folds = patient_folds(pool, patients_of(cfg.data.shards), s.folds, cfg.seed, lambda m: None)
    if s.mode == "grid":
        trials = [f"lr={lr:g} batch_size={b}" for lr in s.lr for b in s.batch_size]
    else:
        trials = [f"{s.samples} draws: lr log-uniform in [{min(s.lr):g}, {max(s.lr):g}], "
                  f"batch_size in {list(s.batch_size)}"]
    state = f"{(s.storage or str(Path(cfg.out) / 'ray')).rstrip('/')}/search"
    resume = Path(state).is_dir() and (Path(state) / "tuner.pkl").exists()
    lines = [f"dry run of the search into {cfg.out} (Ray not started)",
             f"fine-tuning pool {cfg.data.ratio}: {len(pool)} images in {len(folds)} folds of "
             f"{', '.join(str(len(v)) for _, v in folds)}",
             f"{len(trials) if s.mode == 'grid' else s.samples} trials x {len(folds)} folds x "
             f"{cfg.train.epochs} epochs, init {cfg.init}:",
             *[f"  {t}" for t in trials],
             f"continues the saved search in {state}" if resume else "a new search"]
    return "\n".join(lines)
