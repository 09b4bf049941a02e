"""The cross-validated fine-tuning search (Ray Tune), the retraining of its winner and its registry.

    python launch/tune.py --config configs/tune/cpu.yaml data.shards=SHARDS init=EXPORT out=OUT

One search (:func:`run_tune`), in order (see docs/tuning.md):

1. The fine-tuning pool of ``data.ratio`` (or the images given, e.g. a label budget of the
   study) is split into ``search.folds`` folds by patient
   (:func:`cmunet.training.folds.patient_folds`); the initial weights are built once
   (:func:`build_model`: the export's encoder and decoder, or seeded random weights).
2. Each hyper-parameter configuration (``search.lr`` x ``search.batch_size``, x
   ``search.unlabelled_weight`` when it lists values; a grid or random draws) is one Ray trial
   (:func:`cmunet.training.search.search`), running
   :func:`cmunet.training.trial.run_trial`: every fold is fine-tuned with :func:`fit` from the
   SAME initial state dict, and the objective ``cv_dice`` is the mean over folds of the best
   validation Dice (:func:`cmunet.training.cross_validation.cross_validate`). Each finished
   fold's score is saved in the trial's Ray checkpoint: a trial retried after a failure
   (``search.max_failures``) or continued after an interruption trains only its unfinished folds.
3. The completed trial with the highest ``cv_dice`` wins; a winning value at an edge of its grid
   is warned about (:mod:`cmunet.training.tune_results`). Its configuration is retrained on the
   whole pool for the median of its folds' best epochs, without validation (:func:`retrain`);
   the weights after the last epoch are written to ``OUT/model``.
4. That model is exported to ONNX (``OUT/model.onnx``, checked against onnxruntime; ``onnx``),
   evaluated once on the test split (``OUT/test``) -- after every choice was made -- and
   registered as a pyfunc model (``tracking.register_as``, alias ``alias``), with the ONNX model
   logged beside it (:mod:`cmunet.training.winner`).

MLflow: one parent run per search (the flattened config, the winner's scores, the test metrics,
``trials.csv``, the tag ``grid_edge``) and one child run per trial (per-fold best Dice and best
epoch, ``cv_dice`` and its std), written by :class:`cmunet.training.trial_log.TrialLog` where
Tune's driver loop runs, so that trials on other machines need no access to the tracking store.
The local Ray is started by :func:`cmunet.training.ray_local.ray_session`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import ray
import torch

from cmunet.config import flatten, save_config
from cmunet.data import location
from cmunet.data.splits import load_splits, pool_keys
from cmunet.log import logger
from cmunet.outdir import check_out
from cmunet.preempt import Interrupted
from cmunet.tracking.mlflow_run import Tracker
from cmunet.training.finetune import (FinetuneConfig, FitResult, build_model, cpu_state, fit,
                                      patients_of)
from cmunet.training.folds import patient_folds, write_folds
from cmunet.training.ray_local import ray_session
from cmunet.training.search import search
from cmunet.training.trial import ray_device, run_trial
from cmunet.training.tune_config import (TuneConfig, absolute, finetune_settings, local_init,
                                         trial_settings)
from cmunet.training.tune_results import (choose, edge_labels, edge_of_grid, retrain_epochs,
                                          write_table)
from cmunet.training.winner import evaluate_once, export_winner, register, save_model

LOG = logger(__name__)


def run_tune(cfg: TuneConfig, log: Callable[[str], None] = LOG.info,
             trainable: Callable[..., None] = run_trial,
             keys: Sequence[str] | None = None) -> dict:
    """The whole search (see the module docstring); writes ``cfg.out`` and returns result.json.

    ``keys`` restricts the search to these images (a label budget drawn from the fine-tuning
    pool); by default it is the whole fine-tuning pool of ``data.ratio``. ``trainable`` is the
    function each trial runs (see :func:`cmunet.training.search.search`).
    """
    if not cfg.out:
        raise ValueError("out is not set: give the output folder, e.g. out=runs/tune")
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the folder written by tools/shard.py")
    cfg = absolute(cfg)
    location.configure(cfg.data.remote)
    check_out(cfg.out, {"data.shards": cfg.data.shards, "init": local_init(cfg)})
    model, report = build_model(finetune_settings(cfg))
    cfg = replace(cfg, model_width=model.width)  # the resolved config names the width used
    log(f"init: {cfg.init}, width {model.width} "
        + (f"({report.summary()})" if report else f"(random weights, seed {cfg.seed})"))
    initial_state = cpu_state(model)
    splits = load_splits(location.join(cfg.data.shards, "splits.json"))
    pool = sorted(keys) if keys is not None else pool_keys(splits, "finetune", cfg.data.ratio)
    if set(pool) & set(splits["test"]["keys"]):
        raise ValueError("the keys to search on include test-split images: the test split is "
                         "only evaluated, never trained or chosen on")
    patient_of = patients_of(cfg.data.shards)
    folds = patient_folds(pool, patient_of, cfg.search.folds, cfg.seed, log)
    source = f"fine-tuning pool {cfg.data.ratio}" if keys is None else "images given"
    log(f"{source}: {len(pool)} images of {len({patient_of[k] for k in pool})} patients in "
        f"{len(folds)} folds of {', '.join(str(len(val)) for _, val in folds)} images")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_folds(folds, patient_of, out / "folds.json")
    parent_file = out / "parent_run_id"  # a relaunch continues the search's MLflow run
    parent_id = parent_file.read_text().strip() if parent_file.is_file() else None
    parent = Tracker(cfg.tracking, run_name=out.name, params=None if parent_id else flatten(cfg),
                     tags={"job": "tune"}, run_id=parent_id, shards=[cfg.data.shards])
    if parent.run_id:
        parent_file.write_text(parent.run_id + "\n")
    for name in ("config.yaml", "folds.json"):
        parent.log_artifact(out / name)
    try:
        start = time.perf_counter()
        with ray_session(cfg.search):
            table = search(cfg, finetune_settings(cfg), folds, initial_state, parent.run_id,
                           trainable)
            write_table(table, len(folds), out / "trials.csv")
            parent.log_artifact(out / "trials.csv")
            best = choose(table)
            edges = edge_of_grid(best, cfg.search)
            for message in edges:
                log(f"warning: the winner's {message}")
            parent.set_tags({"grid_edge": edge_labels(edges) or "none"})
            final, result = retrain(cfg, best, len(folds), pool, initial_state, log)
        model_dir = save_model(final, result, best, pool)
        onnx = export_winner(model_dir, out / "model.onnx", log) if cfg.onnx else None
        test = evaluate_once(final, model_dir, out / "test", log)
        parent.log_params({"best.trial_id": best["trial_id"], "best.lr": best["lr"],
                           "best.batch_size": best["batch_size"],
                           "best.unlabelled_weight": final.unlabelled.weight,
                           "best.epochs": final.train.epochs})
        parent.log_metrics({"best_cv_dice": best["cv_dice"],
                            "best_cv_dice_std": best["cv_dice_std"], **test}, step=0)
        for row in result.history:
            parent.log_metrics({"retrain_loss": row["train_loss"]}, step=row["epoch"])
        summary = {"best": best, "grid_edge": edges, "epochs": final.train.epochs, "test": test,
                   "parent_run_id": parent.run_id, "n_trials": len(table),
                   "registered": register(cfg, parent, model_dir, best, final.train.epochs, log,
                                          onnx),
                   "onnx": onnx,
                   "seconds": time.perf_counter() - start}
        (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
        parent.log_artifact(out / "result.json")
        parent.log_artifact(out / "test", "test")
    except Interrupted:
        parent.close("KILLED")
        raise
    except BaseException:
        parent.close("FAILED")
        raise
    parent.close()
    log(f"test: Dice {test.get('test_dice', math.nan):.4f}; wrote {out} "
        f"({summary['seconds']:.0f} s)")
    return summary


def retrain(cfg: TuneConfig, best: dict, folds: int, pool: list[str],
            initial_state: dict[str, torch.Tensor],
            log: Callable[[str], None]) -> tuple[FinetuneConfig, FitResult]:
    """Fine-tune the winning configuration on the whole pool from ``initial_state`` for
    :func:`retrain_epochs`, without validation, as a Ray task with a trial's resources (on a
    cluster, where the trials ran). Returns its config (``out`` = OUT/model) and result."""
    epochs = retrain_epochs(best, folds)
    weight = (f", unlabelled weight {best['unlabelled_weight']:g}"
              if "unlabelled_weight" in best else "")
    log(f"best: trial {best['trial_id']}, lr {best['lr']:.3g}, batch {best['batch_size']}"
        f"{weight}: cv Dice {best['cv_dice']:.4f} ± {best['cv_dice_std']:.4f}; retraining on the "
        f"whole pool ({len(pool)} images) for {epochs} epochs")
    final = replace(trial_settings(finetune_settings(cfg, epochs=epochs), best),
                    out=str(Path(cfg.out) / "model"))
    s = cfg.search
    task = ray.remote(_retrain).options(num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)
    return final, ray.get(task.remote(final, pool, initial_state, max(1, int(s.cpus_per_trial))))


def _retrain(cfg: FinetuneConfig, keys: list[str], initial_state: dict[str, torch.Tensor],
             threads: int) -> FitResult:
    torch.set_num_threads(threads)
    return fit(cfg, keys, [], initial_state, device=ray_device())
