"""``--dry-run``: what a pre-training job would do, without starting ranks or DeepSpeed.

Reads the manifest and splits, resolves the pool, the global batch, the learning rate and the
number of steps as :mod:`cmunet.training.pretrain` does, and names the checkpoint it would
resume from. Views larger than the shards' images (``view_size``, plus CM-UNet's pixel-shift
margin: the base its two views are cut from) are refused. The world size is WORLD_SIZE (set by launchers), else 1, else ``world_size``.
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
    location.configure(cfg.data.remote)
    stream = pretrain_stream(cfg, 0, world)
    refuse_large_views(cfg, {source.folder: source.size for source in stream.sources})
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


def refuse_large_views(cfg: PretrainConfig, sizes: dict[str, int | None]) -> None:
    """A ValueError when the views (for CM-UNet: the base they are cut from, view_size plus the
    pixel-shift margin) are larger than the images of a folder (``sizes``: folder -> side)."""
    if cfg.method == "none":  # no views
        return
    margin = 0
    if cfg.method.startswith("cmunet"):  # as CMUNet resolves cmunet.shift
        margin = cfg.cmunet.shift if cfg.cmunet.shift >= 0 else round(31 * cfg.view_size / 224)
    side = cfg.view_size + margin
    for folder, size in sizes.items():
        if size is not None and side > size:
            base = f" + cmunet.shift {margin} = {side} px" if margin else " px"
            raise ValueError(f"view_size {cfg.view_size}{base} is larger than the {size}-px "
                             f"images of {location.public(folder)}: lower view_size (or shard "
                             "the images at a larger --size)")


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
    from cmunet.training.folds import patient_folds
    from cmunet.training.tune_config import local_init, search_state

    s = cfg.search
    check_out(cfg.out, {"data.shards": cfg.data.shards, "init": local_init(cfg)})
    location.configure(cfg.data.remote)
    splits = load_splits(location.join(cfg.data.shards, "splits.json"))
    pool = pool_keys(splits, "finetune", cfg.data.ratio)
    folds = patient_folds(pool, patients_of(cfg.data.shards), s.folds, cfg.seed, lambda m: None)
    if s.mode == "grid":
        weights = [f" unlabelled_weight={w:g}" for w in s.unlabelled_weight] or [""]
        trials = [f"lr={lr:g} batch_size={b}{w}" for lr in s.lr for b in s.batch_size
                  for w in weights]
    else:
        trials = [f"{s.samples} draws: lr log-uniform in [{min(s.lr):g}, {max(s.lr):g}], "
                  f"batch_size in {list(s.batch_size)}"
                  + (f", unlabelled_weight in {list(s.unlabelled_weight)}"
                     if s.unlabelled_weight else "")]
    state = search_state(cfg)
    resume = Path(state).is_dir() and (Path(state) / "tuner.pkl").exists()
    lines = [f"dry run of the search into {cfg.out} (Ray not started)",
             f"fine-tuning pool {cfg.data.ratio}: {len(pool)} images in {len(folds)} folds of "
             f"{', '.join(str(len(v)) for _, v in folds)}",
             f"{len(trials) if s.mode == 'grid' else s.samples} trials x {len(folds)} folds x "
             f"{cfg.train.epochs} epochs, init {cfg.init}:",
             *[f"  {t}" for t in trials],
             f"continues the saved search in {state}" if resume else "a new search"]
    return "\n".join(lines)
