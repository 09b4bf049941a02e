"""The cross-validated fine-tuning search (Ray Tune), the retraining of its winner and its registry.

    python launch/tune.py --config configs/tune/cpu.yaml data.shards=SHARDS init=EXPORT out=OUT

One search, in order (see docs/tuning.md):

1. The fine-tuning pool of ``data.ratio`` (or the images given, e.g. a label budget of the
   study) is split into ``search.folds`` folds by patient
   (:func:`patient_folds`); the initial weights are built once (:func:`build_model`: the export's
   encoder and decoder, or seeded random weights).
2. Each hyper-parameter configuration (``search.lr`` x ``search.batch_size``, a grid or random
   draws) is one Ray trial, :func:`run_trial`: every fold is fine-tuned with :func:`fit` from the
   SAME initial state dict, and the objective ``cv_dice`` is the mean over folds of the best
   validation Dice (:func:`cross_validate`). Each finished fold's score is saved in the trial's
   Ray checkpoint: a trial retried after a failure (``search.max_failures``) or continued after
   an interruption trains only its unfinished folds.
3. The completed trial with the highest ``cv_dice`` wins; a winning value at an edge of its grid
   is warned about (:func:`edge_of_grid`). Its configuration is retrained on the whole pool
   for the median of its folds' best epochs, without validation; the weights after the last
   epoch are written to ``OUT/model``.
4. That model is exported to ONNX (``OUT/model.onnx``, checked against onnxruntime; ``onnx``),
   evaluated once on the test split (``OUT/test``) -- after every choice was made -- and
   registered as a pyfunc model (``tracking.register_as``, alias ``alias``), with the ONNX model
   logged beside it.

MLflow: one parent run per search (the flattened config, the winner's scores, the test metrics,
``trials.csv``, the tag ``grid_edge``) and one child run per trial (per-fold best Dice and best
epoch, ``cv_dice`` and its std), written by :class:`TrialLog` where Tune's driver loop runs, so
that trials on other machines need no access to the tracking store.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from ray import tune
from ray.tune import ResultGrid
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cmunet.config import check, dump_config, flatten, save_config
from cmunet.log import logger
from cmunet.outdir import check_out, check_private
from cmunet.preempt import Interrupted
from cmunet.data import location
from cmunet.data.augment import AugmentConfig
from cmunet.data.splits import load_splits, pool_keys
from cmunet.tracking.mlflow_run import Tracker, TrackingConfig, resolve_uri
from cmunet.tracking.registry import is_mlflow_uri
from cmunet.training.finetune import (DataConfig, EvalConfig, FinetuneConfig, FitResult,
                                      TrainConfig, build_model, cpu_state, fit, patients_of,
                                      save_outputs)

LOG = logger(__name__)
Folds = list[tuple[list[str], list[str]]]  # per fold: (training keys, validation keys)
Report = Callable[[dict], None]


@dataclass
class SearchConfig:
    lr: list[float] = field(default_factory=lambda: [1e-2, 1e-3, 1e-4, 1e-5])
    batch_size: list[int] = field(default_factory=lambda: [16, 32])
    mode: Literal["grid", "random"] = "grid"  # grid: every lr x batch_size once
    samples: int = 8  # random mode: configurations drawn (lr log-uniform in [min, max] of lr)
    asha: bool = False  # stop poor trials early (ASHA on the running cv_dice, reported per epoch)
    grace_period: int = 0  # ASHA: epochs (over folds) before a trial may be stopped; 0 = one fold
    folds: int = 3  # cross-validation folds, grouped by patient
    max_failures: int = 2  # retries of a failed trial
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials (0.5: two per GPU)
    max_concurrent: int = 0  # trials at once (0 = as many as the resources allow)
    address: str = ""  # "" = a local Ray started here; "auto" or ray://HOST:10001 = a cluster
    num_cpus: int = 0  # local Ray only: CPUs it may use (0 = every core)
    temp_dir: str = "/tmp/ray-cmunet"  # local Ray only: its session folder (short: socket paths)
    storage: str = ""  # Ray Tune's result folder ("" = OUT/ray); shared or s3:// on a cluster
    verbose: int = 1  # Ray Tune's console output: 0 quiet, 1 trial status tables, 2 + results

    def __post_init__(self):
        check(len(self.lr) > 0 and all(v > 0 for v in self.lr), "lr", "must be positive values")
        check(len(self.batch_size) > 0 and all(v > 0 for v in self.batch_size), "batch_size",
              "must be positive values")
        check(self.samples > 0, "samples", "must be positive")
        check(self.grace_period >= 0, "grace_period", "must be >= 0")
        check(self.folds >= 2, "folds", "must be >= 2")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        check(self.gpus_per_trial >= 0, "gpus_per_trial", "must be >= 0")
        check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0")
        check(self.num_cpus >= 0, "num_cpus", "must be >= 0")


@dataclass
class TuneConfig:
    """The fine-tuning settings of :class:`FinetuneConfig` (same keys, except ``model``) plus the
    search. ``search.lr`` and ``search.batch_size`` replace ``train.lr`` and ``train.batch_size`` in
    every trial; ``data.val_fraction`` is not used (the folds are the validation sets)."""

    init: str = "none"  # pre-training export, runs:/ or models:/ URI, or "none"
    out: str = ""  # output folder
    seed: int = 0  # initial weights, folds, batch order, augmentations, random draws
    model_width: int = 64  # UNet width with init=none
    alias: str = "champion"  # alias given to the registered winner ("" = none)
    onnx: bool = True  # also export the winner to OUT/model.onnx, checked with onnxruntime
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="cmunet-tune", register_as="cmunet"))

    def __post_init__(self):
        check(self.model_width > 0, "model_width", "must be positive")
        check(self.eval.pool == "test", "eval.pool",
              "must be test: the search evaluates its winner once, on the test split")
        check(self.search.grace_period <= self.search.folds * self.train.epochs,
              "search.grace_period", "must be <= search.folds x train.epochs")


def finetune_settings(cfg: TuneConfig, **train: Any) -> FinetuneConfig:
    """The fine-tuning config of the search, ``train`` fields replaced (lr, batch_size, ...)."""
    return FinetuneConfig(init=cfg.init, out=cfg.out, seed=cfg.seed, model_width=cfg.model_width,
                          data=cfg.data, train=replace(cfg.train, **train), augment=cfg.augment,
                          eval=cfg.eval, tracking=cfg.tracking)


# ---- folds and cross-validation ----------------------------------------------------------------

def patient_folds(keys: Sequence[str], patient_of: dict[str, str], k: int, seed: int,
                  warn: Callable[[str], None] = print) -> Folds:
    """``k`` (training, validation) splits of ``keys`` whose validation sets partition the keys and
    never share a patient with their training set.

    Patients, in a seeded order, largest first, each go to the fold with the fewest images so far,
    so folds hold about the same number of images. With fewer patients than folds, frames are
    dealt out instead and ``warn`` says so: validation then shares patients with training.
    """
    if len(keys) < k:
        raise ValueError(f"the fine-tuning pool has {len(keys)} image(s), fewer than "
                         f"search.folds={k}: lower search.folds or choose a larger data.ratio")
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(patient_of[key], []).append(key)
    folds: list[list[str]] = [[] for _ in range(k)]
    if len(groups) >= k:
        patients = sorted(groups)
        rng.shuffle(patients)
        for patient in sorted(patients, key=lambda p: -len(groups[p])):  # stable: seeded ties
            min(folds, key=len).extend(groups[patient])
    else:
        warn(f"warning: the fine-tuning pool has {len(groups)} patient(s), fewer than "
             f"search.folds={k}; folding frames instead (validation is not patient-independent)")
        order = sorted(keys)
        rng.shuffle(order)
        for i, key in enumerate(order):
            folds[i % k].append(key)
    return [(sorted(set(keys) - set(fold)), sorted(fold)) for fold in folds]


@dataclass
class FoldScore:
    dice: float  # best validation Dice of the fold
    epoch: int  # its epoch (1-based)


def cv_metrics(scores: Sequence[FoldScore], current: float | None = None) -> dict[str, float]:
    """What a trial reports: ``cv_dice``, the mean best validation Dice of the finished folds
    (and, while a fold runs, its best so far: ``current``); ``cv_dice_std``, their sample SD over
    finished folds; ``folds_done``; ``foldK_dice`` and ``foldK_best_epoch`` of each finished
    fold."""
    dices = [s.dice for s in scores]
    metrics = {"cv_dice": float(np.mean(dices + ([current] if current is not None else []))),
               "cv_dice_std": float(np.std(dices, ddof=1)) if len(dices) > 1 else 0.0,
               "folds_done": len(scores)}
    for k, score in enumerate(scores, start=1):
        metrics[f"fold{k}_dice"] = score.dice
        metrics[f"fold{k}_best_epoch"] = score.epoch
    return metrics


def cross_validate(cfg: FinetuneConfig, folds: Folds, initial_state: dict[str, torch.Tensor],
                   report: Report | None = None, every_epoch: bool = False,
                   device: torch.device | None = None,
                   done: Sequence[FoldScore] = ()) -> dict[str, float]:
    """Fine-tune every fold from the same ``initial_state`` (never from the previous fold's
    weights) and return :func:`cv_metrics` of all folds.

    ``done``: the scores of the first folds, already finished (an interrupted trial's, read back
    by :func:`run_trial`); only the folds after them are trained. Every fold starts from the same
    seed, so the result is the one of an uninterrupted run.

    ``report`` receives the metrics after every fold (the last report is the final result), or
    with ``every_epoch`` after every epoch of every fold (folds x epochs reports), which is what
    an early stopping scheduler needs: at a given report count, every trial has trained the same
    folds for the same epochs, so their running ``cv_dice`` are comparable. Either way the report
    that ends fold k is the first with ``folds_done`` = k.
    """
    scores = list(done)
    for train_keys, val_keys in folds[len(scores):]:
        on_epoch = None
        if report is not None and every_epoch:
            on_epoch = _epoch_reporter(scores, cfg.train.epochs, report)
        result = fit(cfg, train_keys, val_keys, initial_state, on_epoch, device)
        scores.append(FoldScore(result.best_val_dice, result.best_epoch))
        if report is not None and not every_epoch:
            report(cv_metrics(scores))
    metrics = cv_metrics(scores)
    if report is not None and len(done) == len(folds):  # nothing left to train: the result again
        report(metrics)
    return metrics


def _epoch_reporter(scores: list[FoldScore], epochs: int, report: Report) -> Callable[[dict], None]:
    """``fit``'s ``on_epoch``: report the running metrics, the fold's best so far included (as a
    finished fold at its last epoch)."""
    best = FoldScore(-1.0, 0)

    def on_epoch(row: dict) -> None:
        if row["val_dice"] > best.dice:  # the same rule as fit's choice of the best epoch
            best.dice, best.epoch = row["val_dice"], row["epoch"]
        if row["epoch"] == epochs:
            report(cv_metrics([*scores, best]))
        else:
            report(cv_metrics(scores, current=best.dice))

    return on_epoch


def run_trial(config: dict, *, settings: FinetuneConfig, folds: Folds,
              initial_state: dict[str, torch.Tensor], every_epoch: bool, threads: int) -> None:
    """What each Ray trial runs: :func:`cross_validate` with the trial's ``lr`` and
    ``batch_size``, reporting to Ray Tune (with the id of the Ray node it runs on).

    The report that ends a fold carries a Ray checkpoint of the finished folds' scores, each
    under its :func:`fold_key`; a trial restored after an interruption (or retried after a
    failure) reads them back and trains only the folds after them."""
    torch.set_num_threads(threads)
    cfg = replace(settings, train=replace(settings.train, lr=float(config["lr"]),
                                          batch_size=int(config["batch_size"])))
    weights = state_digest(initial_state)
    keys = [fold_key(cfg, fold, weights) for fold in folds]
    done = finished_folds(tune.get_checkpoint(), keys)
    if done:
        LOG.info(f"trial lr={cfg.train.lr:g} batch={cfg.train.batch_size}: folds 1-{len(done)} of "
              f"{len(folds)} finished before, not trained again")
    node = ray.get_runtime_context().get_node_id()
    cross_validate(cfg, folds, initial_state, _checkpointing_report(keys, len(done), node),
                   every_epoch, ray_device(), done)


FOLDS_FILE = "folds.json"  # in a trial's checkpoint: [{"key", "dice", "epoch"}] of finished folds


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


# ---- the search on Ray -------------------------------------------------------------------------

class TrialLog(tune.Callback):
    """One MLflow child run per trial under the search's run ``parent_run_id``: the trial's
    hyper-parameters, every metric it reports, its failed attempts and how it ended.

    Tune calls it where its driver loop runs: in this process, or on the head node when connected
    with ``ray://`` (the tracking URI must then be reachable from there, e.g. an MLflow server).
    """

    def __init__(self, tracking: TrackingConfig, parent_run_id: str, folds: int,
                 shards: str = ""):
        self.tracking, self.parent_run_id, self.folds = tracking, parent_run_id, folds
        self.shards = [shards] if shards else []
        self._runs: dict[str, Tracker] = {}  # made as trials start (the Tuner pickles us first)
        self._folds_done: dict[str, int] = {}
        self._failures: dict[str, int] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self._runs:  # a retry: same run
            return
        lr, batch = trial.config["lr"], trial.config["batch_size"]
        self._runs[trial.trial_id] = Tracker(
            self.tracking, run_name=f"trial-{trial.trial_id} lr={lr:.3g} batch={batch}",
            parent_run_id=self.parent_run_id, shards=self.shards, system_metrics=False,
            params={"train.lr": lr, "train.batch_size": batch, "trial_id": trial.trial_id})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k.startswith(("cv_", "fold"))}
        if metrics:  # not Ray's own bookkeeping results
            self._folds_done[trial.trial_id] = int(metrics["folds_done"])
            self._runs[trial.trial_id].log_metrics(metrics, step=result["training_iteration"])

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failures[trial.trial_id] = self._failures.get(trial.trial_id, 0) + 1
        self._runs[trial.trial_id].set_tags({"failed_attempts": self._failures[trial.trial_id]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = self._folds_done.get(trial.trial_id) == self.folds
        self._close(trial.trial_id, *(("COMPLETED", "FINISHED") if done else ("STOPPED", "KILLED")))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial.trial_id, "ERROR", "FAILED")

    def _close(self, trial_id: str, outcome: str, status: str) -> None:
        run = self._runs[trial_id]
        run.set_tags({"outcome": outcome})
        run.close(status)


@contextmanager
def ray_session(search: SearchConfig) -> Iterator[None]:
    """Ray for the search: a cluster (``search.address``) or a local instance started here and
    shut down afterwards; an instance already running in this process is used as it is.

    The local instance listens on 127.0.0.1 only (:func:`loopback_node`) and requires a token
    (Ray's token authentication: other users of the machine reach 127.0.0.1 too): a random one
    made for this session and kept in this process's environment (its workers inherit it), never
    written to a file, unless RAY_AUTH_MODE / RAY_AUTH_TOKEN are set (docs/multinode.md)."""
    if ray.is_initialized():
        yield
        return
    with ray_token(local=not search.address):
        if search.address:
            ray.init(address=search.address, logging_level=logging.WARNING)
        else:
            with loopback_node():
                ray.init(num_cpus=search.num_cpus or None, include_dashboard=False,
                         _node_ip_address="127.0.0.1",
                         _temp_dir=str(Path(search.temp_dir).resolve()),
                         logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def loopback_node() -> Iterator[None]:
    """Let ``ray.init(_node_ip_address="127.0.0.1")`` keep that address.

    Ray's GCS server, raylet, agents and workers bind their servers to 127.0.0.1 when the node's
    address is 127.0.0.1, and to every interface otherwise. But ``ray.init`` replaces a loopback
    ``_node_ip_address`` by the machine's routable address
    (``ray._private.services.resolve_ip_for_localhost``) unless Ray clusters are disabled
    (``ray_constants.ENABLE_RAY_CLUSTER``, read once from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when
    ray is imported; True on Linux). It is False only while ``ray.init`` runs; the processes Ray
    starts are given the address explicitly. tests/test_listeners.py checks every listener."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def ray_token(local: bool = True) -> Iterator[None]:
    """For a ``local`` Ray: RAY_AUTH_MODE=token with a random RAY_AUTH_TOKEN (unless the user set
    them) for the session, the workers it starts included; restored afterwards."""
    import os
    import secrets

    from ray._raylet import AuthenticationTokenLoader, Config

    if not local:
        yield
        return
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ValueError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: the local Ray of the "
                         "search runs only with token authentication; unset RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    Config.initialize("")  # Ray caches its settings and token: read them again
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def param_space(search: SearchConfig) -> dict:
    if search.mode == "grid":
        return {"lr": tune.grid_search(list(search.lr)),
                "batch_size": tune.grid_search(list(search.batch_size))}
    low, high = min(search.lr), max(search.lr)
    return {"lr": tune.loguniform(low, high) if low < high else low,
            "batch_size": tune.choice(list(search.batch_size))}


def search(cfg: TuneConfig, settings: FinetuneConfig, folds: Folds,
           initial_state: dict[str, torch.Tensor], parent_run_id: str | None,
           trainable: Callable[..., None] = run_trial) -> list[dict]:
    """Run the trials on Ray (in an active :func:`ray_session`); return :func:`trials_table`.

    ``trainable`` is the function each trial runs (default :func:`run_trial`, which tests wrap).
    With a ``parent_run_id``, :class:`TrialLog` records the trials in MLflow.
    """
    s = cfg.search
    scheduler = None
    if s.asha:
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=len(folds) * cfg.train.epochs,
                                  grace_period=s.grace_period or cfg.train.epochs)
    function = tune.with_parameters(trainable, settings=settings, folds=folds,
                                    initial_state=initial_state, every_epoch=s.asha,
                                    threads=max(1, int(s.cpus_per_trial)))
    function = tune.with_resources(function, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    path = f"{(s.storage or str(Path(cfg.out) / 'ray')).rstrip('/')}/search"
    if tune.Tuner.can_restore(path):  # a relaunch: finished trials are kept, the rest resumed
        if "://" not in path:  # Ray unpickles its state: only from files this user wrote
            check_private(Path(path), "the search's saved state")
        tuner = tune.Tuner.restore(path, function, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(s))
        return trials_table(_fit(tuner, path), len(folds))
    tuner = tune.Tuner(
        function,
        param_space=param_space(s),
        tune_config=tune.TuneConfig(
            metric="cv_dice", mode="max", scheduler=scheduler,
            num_samples=s.samples if s.mode == "random" else 1,
            search_alg=BasicVariantGenerator(max_concurrent=s.max_concurrent,
                                             random_state=cfg.seed)),
        run_config=tune.RunConfig(
            name="search", storage_path=s.storage or str(Path(cfg.out) / "ray"),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            callbacks=([TrialLog(cfg.tracking, parent_run_id, len(folds), cfg.data.shards)]
                       if parent_run_id else []),
            verbose=s.verbose))
    return trials_table(_fit(tuner, path), len(folds))


def _fit(tuner: tune.Tuner, path: str) -> ResultGrid:
    """``tuner.fit()``; SIGTERM and SIGINT stop it as Tune stops on SIGUSR1: trials are stopped,
    the experiment state saved and :class:`Interrupted` raised (relaunch to continue)."""
    import os
    import signal
    import threading

    received = []
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()

    def handler(signum, frame):
        if received:  # a second signal: stop now
            raise KeyboardInterrupt
        received.append(signum)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    disabled = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # SIGINT stays ours during fit
    try:
        results = tuner.fit()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if disabled is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
    if received:
        raise Interrupted(f"search stopped by {signal.Signals(received[0]).name}; its state is "
                          f"in {path}: relaunch the same command (same out=) to continue, "
                          "finished trials are not run again")
    return results


def trials_table(results: ResultGrid, folds: int) -> list[dict]:
    """One row per trial, by trial id: ``trial_id``, ``lr``, ``batch_size``, ``status``
    (COMPLETED: all folds; STOPPED: early, by ASHA; ERROR: failed on every attempt), the last
    reported :func:`cv_metrics` and the ``error``."""
    rows = []
    for result in results:
        metrics = result.metrics
        row = {"trial_id": metrics["trial_id"], "lr": result.config["lr"],
               "batch_size": result.config["batch_size"],
               **{k: v for k, v in metrics.items() if k.startswith(("cv_", "fold"))}}
        if result.error is not None:
            lines = [line for line in str(result.error).splitlines() if line.strip()]
            row["status"], row["error"] = "ERROR", lines[-1] if lines else repr(result.error)
        else:
            row["status"] = "COMPLETED" if metrics.get("folds_done") == folds else "STOPPED"
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def choose(table: Sequence[dict]) -> dict:
    """The completed trial with the highest ``cv_dice`` (ties: the first trial)."""
    completed = [row for row in table if row["status"] == "COMPLETED"]
    if not completed:
        raise RuntimeError("no trial completed all its folds (see trials.csv and the Ray log "
                           "above); check the data and the lr range")
    return max(completed, key=lambda row: row["cv_dice"])


def edge_of_grid(best: dict, search: SearchConfig) -> list[str]:
    """One warning per searched dimension (:func:`param_space`) of two or more values whose
    winning value is the smallest or the largest of them: the optimum may lie beyond the grid.
    A message starts with its short form, up to the first ": " (:func:`edge_labels`), e.g.
    ``lr=0.001 (top of [0.0001, 0.001])``. A two-value grid always has its winner on an edge;
    in random mode a drawn lr lies inside its range and is flagged only at an end of it."""
    messages = []
    for name in param_space(search):
        grid, value = sorted(set(getattr(search, name))), best[name]
        if len(grid) < 2:
            continue
        edge = ("top" if math.isclose(value, grid[-1]) else
                "bottom" if math.isclose(value, grid[0]) else "")
        if edge:
            values = ", ".join(f"{v:g}" for v in grid)
            messages.append(f"{name}={value:g} ({edge} of [{values}]): the optimum may lie "
                            f"beyond the grid; widen search.{name} beyond it")
    return messages


def edge_labels(messages: Sequence[str]) -> str:
    """The short forms of :func:`edge_of_grid`'s messages, joined by "; " ("" for none)."""
    return "; ".join(message.split(": ", 1)[0] for message in messages)


def retrain_epochs(row: dict, folds: int) -> int:
    """The median of the folds' best epochs (rounded half up), at least 1."""
    median = statistics.median(row[f"fold{k}_best_epoch"] for k in range(1, folds + 1))
    return max(1, math.floor(median + 0.5))


# ---- the job -----------------------------------------------------------------------------------

def absolute(cfg: TuneConfig) -> TuneConfig:
    """Every path and the tracking URI made absolute (trials run in their own folders)."""
    init = cfg.init
    if init != "none" and not is_mlflow_uri(init):
        init = str(Path(init).resolve())
    return replace(cfg, init=init, out=str(Path(cfg.out).resolve()),
                   data=replace(cfg.data, shards=location.absolute(cfg.data.shards)),
                   tracking=replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)))


def run_tune(cfg: TuneConfig, log: Callable[[str], None] = LOG.info,
             trainable: Callable[..., None] = run_trial,
             keys: Sequence[str] | None = None) -> dict:
    """The whole search (see the module docstring); writes ``cfg.out`` and returns result.json.

    ``keys`` restricts the search to these images (a label budget drawn from the fine-tuning
    pool); by default it is the whole fine-tuning pool of ``data.ratio``. ``trainable`` is the
    function each trial runs (see :func:`search`).
    """
    if not cfg.out:
        raise ValueError("out is not set: give the output folder, e.g. out=runs/tune")
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the folder written by tools/shard.py")
    cfg = absolute(cfg)
    check_out(cfg.out, {"data.shards": cfg.data.shards,
                        "init": None if cfg.init == "none" or is_mlflow_uri(cfg.init) else cfg.init})
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
    log(f"best: trial {best['trial_id']}, lr {best['lr']:.3g}, batch {best['batch_size']}: "
        f"cv Dice {best['cv_dice']:.4f} ± {best['cv_dice_std']:.4f}; retraining on the whole "
        f"pool ({len(pool)} images) for {epochs} epochs")
    final = replace(finetune_settings(cfg, lr=float(best["lr"]), batch_size=int(best["batch_size"]),
                                      epochs=epochs), out=str(Path(cfg.out) / "model"))
    s = cfg.search
    task = ray.remote(_retrain).options(num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial)
    return final, ray.get(task.remote(final, pool, initial_state, max(1, int(s.cpus_per_trial))))


def _retrain(cfg: FinetuneConfig, keys: list[str], initial_state: dict[str, torch.Tensor],
             threads: int) -> FitResult:
    torch.set_num_threads(threads)
    return fit(cfg, keys, [], initial_state, device=ray_device())


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


def save_model(final: FinetuneConfig, result: FitResult, best: dict, pool: list[str]) -> Path:
    """The retrained model's folder, as launch/finetune.py writes one (best.safetensors holds the
    weights after the last epoch), with the cross-validation scores in result.json."""
    folder = Path(final.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(final, folder / "config.yaml")
    cv = {k: v for k, v in best.items() if k.startswith(("cv_", "fold"))}
    save_outputs(result, {"width": final.model_width, "init": final.init,
                          "ratio": final.data.ratio, "epochs": final.train.epochs,
                          "n_train": len(pool), "train_keys": pool, "cv": cv}, final, folder)
    return folder


def evaluate_once(final: FinetuneConfig, model_dir: Path, out: Path,
              log: Callable[[str], None]) -> dict[str, float]:
    """Evaluate the retrained model on the test split (OUT/test); the mean of every metric as
    ``test_<metric>``, and the images where HD / ADD are undefined as ``test_hd_n_undefined``. Its MLflow record is the search's run, not a run of its own."""
    # imported here, not at the top: Ray's trial workers import this module and never evaluate
    from cmunet.evaluation.evaluate import run_evaluation

    metrics = run_evaluation(replace(final, model=str(model_dir), out=str(out),
                                     tracking=replace(final.tracking, enabled=False)), log)
    summaries = {k: v for k, v in metrics.items() if isinstance(v, dict) and "n_undefined" in v}
    return {**{f"test_{k}": v["mean"] for k, v in summaries.items() if v["mean"] is not None},
            **{f"test_{k}_n_undefined": v["n_undefined"] for k, v in summaries.items()
               if k in ("hd", "add")}}


def export_winner(model_dir: Path, path: Path, log: Callable[[str], None]) -> dict | None:
    """The retrained model as ONNX (cmunet/models/onnx_export.py), checked against onnxruntime:
    ``{"path", "opset", "max_abs_diff"}``, or None (with a warning) when the export fails: the
    search's results do not depend on it."""
    from cmunet.evaluation.evaluate import load_finetuned
    from cmunet.models.onnx_export import OPSET, check_onnx, export_onnx

    net = load_finetuned(model_dir)
    try:
        worst = check_onnx(export_onnx(net, path), net)
    except Exception as err:  # an exporter limitation must not lose a finished search
        log(f"warning: no ONNX export: {type(err).__name__}: {str(err).splitlines()[0]}")
        path.unlink(missing_ok=True)
        return None
    log(f"wrote {path} (opset {OPSET}; onnxruntime within {worst:.1e} of PyTorch)")
    return {"path": str(path), "opset": OPSET, "max_abs_diff": worst}


def register(cfg: TuneConfig, parent: Tracker, model_dir: Path, best: dict, epochs: int,
             log: Callable[[str], None], onnx: dict | None = None) -> dict | None:
    """Log ``model_dir`` as the pyfunc model of the search's run, register it as a new version
    of ``tracking.register_as`` and give it ``alias``; log the ``onnx`` export beside it (its URI
    in the version's tag ``onnx``). None when tracking or registering is off."""
    if not (parent.enabled and cfg.tracking.register_as):
        return None
    from mlflow.tracking import MlflowClient

    from cmunet.tracking.segmenter import log_onnx, log_segmenter

    parent.flush()  # the run's queued metrics before the fluent API resumes it
    tags = {"cv_dice": f"{best['cv_dice']:.5f}", "cv_dice_std": f"{best['cv_dice_std']:.5f}",
            "lr": best["lr"], "batch_size": best["batch_size"], "epochs": epochs,
            "init": cfg.init, "ratio": cfg.data.ratio, "width": cfg.model_width}
    name = cfg.tracking.register_as
    version = log_segmenter(cfg.tracking.uri, parent.run_id, model_dir, name, cfg.alias, tags)
    log(f"registered models:/{name}/{version}"
        + (f" as models:/{name}@{cfg.alias}" if cfg.alias else ""))
    registered = {"name": name, "version": version, "alias": cfg.alias}
    if onnx is not None:
        uri = log_onnx(cfg.tracking.uri, parent.run_id, Path(onnx["path"]),
                       {"opset": onnx["opset"], "max_abs_diff": f"{onnx['max_abs_diff']:.2e}"})
        MlflowClient(cfg.tracking.uri).set_model_version_tag(name, version, "onnx", uri)
        registered["onnx"] = uri
    return registered


def write_folds(folds: Folds, patient_of: dict[str, str], path: Path) -> None:
    """folds.json: each fold's validation keys and patients."""
    folds_json = [{"validation": val, "patients": sorted({patient_of[k] for k in val})}
                  for _, val in folds]
    path.write_text(json.dumps(folds_json, indent=1) + "\n")


def write_table(table: Sequence[dict], folds: int, path: Path) -> None:
    """trials.csv: one row per trial (:func:`trials_table`)."""
    columns = ["trial_id", "lr", "batch_size", "status", "cv_dice", "cv_dice_std", "folds_done",
               *[f"fold{k}_{m}" for k in range(1, folds + 1) for m in ("dice", "best_epoch")],
               "error"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(table)
