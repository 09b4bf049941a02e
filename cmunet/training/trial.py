"""What each Ray trial runs (:func:`run_trial`): one configuration cross-validated, each finished
fold's score checkpointed so that a retried or resumed trial trains only its unfinished folds."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
import torch
from ray import tune

from cmunet.config import dump_config
from cmunet.log import logger
from cmunet.training.cross_validation import FoldScore, Report, cross_validate
from cmunet.training.finetune import FinetuneConfig
from cmunet.training.folds import Folds
from cmunet.training.tune_config import trial_settings

LOG = logger(__name__)
FOLDS_FILE = "folds.json"  # in a trial's checkpoint: [{"key", "dice", "epoch"}] of finished folds


def run_trial(config: dict, *, settings: FinetuneConfig, folds: Folds,
              initial_state: dict[str, torch.Tensor], every_epoch: bool, threads: int) -> None:
    """What each Ray trial runs: :func:`cross_validate` with the trial's ``lr`` and
    ``batch_size`` (and ``unlabelled_weight`` where searched), reporting to Ray Tune (with the
    id of the Ray node it runs on).

    The report that ends a fold carries a Ray checkpoint of the finished folds' scores, each
    under its :func:`fold_key`; a trial restored after an interruption (or retried after a
    failure) reads them back and trains only the folds after them."""
    torch.set_num_threads(threads)
    cfg = trial_settings(settings, config)
    weights = state_digest(initial_state)
    keys = [fold_key(cfg, fold, weights) for fold in folds]
    done = finished_folds(tune.get_checkpoint(), keys)
    if done:
        LOG.info(f"trial lr={cfg.train.lr:g} batch={cfg.train.batch_size}: folds 1-{len(done)} of "
                 f"{len(folds)} finished before, not trained again")
    node = ray.get_runtime_context().get_node_id()
    cross_validate(cfg, folds, initial_state, _checkpointing_report(keys, len(done), node),
                   every_epoch, ray_device(), done)


def fold_key(cfg: FinetuneConfig, fold: tuple[list[str], list[str]], weights: str) -> str:
    """What a fold's score depends on, hashed: the trial's resolved fine-tuning config (lr and
    batch size included), the fold's training and validation keys and the initial weights
    (:func:`state_digest`). A saved score is used again only under the same key."""
    text = json.dumps({"config": dump_config(cfg), "train": fold[0], "validation": fold[1],
                       "weights": weights})
    return hashlib.sha256(text.encode()).hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, types, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def finished_folds(checkpoint: tune.Checkpoint | None, keys: Sequence[str]) -> list[FoldScore]:
    """The scores of the first folds saved in a trial's ``checkpoint`` whose keys match ``keys``
    (up to the first that does not); none without a checkpoint."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as folder:
        path = Path(folder) / FOLDS_FILE
        saved = json.loads(path.read_text()) if path.is_file() else []
    done = []
    for key, row in zip(keys, saved):
        if row["key"] != key:
            break
        done.append(FoldScore(float(row["dice"]), int(row["epoch"])))
    return done


def _checkpointing_report(keys: Sequence[str], saved: int, node: str) -> Report:
    """``tune.report``; a report that finishes a fold also carries a checkpoint of the scores of
    every finished fold (:data:`FOLDS_FILE`), written atomically by Ray to the trial's storage."""
    def report(metrics: dict) -> None:
        nonlocal saved
        metrics = {**metrics, "node_id": node}
        finished = int(metrics["folds_done"])
        if finished == saved:
            tune.report(metrics)
            return
        rows = [{"key": keys[k - 1], "dice": metrics[f"fold{k}_dice"],
                 "epoch": metrics[f"fold{k}_best_epoch"]} for k in range(1, finished + 1)]
        with tempfile.TemporaryDirectory(prefix="cmunet-folds-") as folder:
            (Path(folder) / FOLDS_FILE).write_text(json.dumps(rows, indent=1) + "\n")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        saved = finished

    return report


def ray_device() -> torch.device:
    """The device of a Ray trial or task: the GPU Ray assigned it, the CPU when it has none.
    (Ray 2.60 no longer hides the GPUs from tasks given none, so with ``gpus_per_trial: 0``
    every trial would pick ``cuda:0``.) Ray restricts CUDA_VISIBLE_DEVICES to the assigned
    GPUs unless told not to; the index is then the GPU's place among the visible ones."""
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return torch.device("cuda", visible.index(ids[0]) if ids[0] in visible else int(ids[0]))
