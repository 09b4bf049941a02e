"""The trials on Ray Tune (:func:`search`): a new search, or a relaunch that continues the saved
one (only from state this user wrote, or a storage the user trusts), stopped cleanly by SIGTERM
and SIGINT; the trials' outcomes as one table."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ray import tune
from ray.tune import ResultGrid
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cmunet.outdir import check_private
from cmunet.preempt import Interrupted
from cmunet.training.finetune import FinetuneConfig
from cmunet.training.folds import Folds
from cmunet.training.trial import run_trial
from cmunet.training.trial_log import TrialLog
from cmunet.training.tune_config import (OPTIONAL, SEARCHED, SearchConfig, TuneConfig,
                                         search_state, searched, storage_root)

if TYPE_CHECKING:
    import torch


def param_space(search: SearchConfig) -> dict:
    """Ray Tune's space of :func:`searched`: a grid of every value, or random draws (lr
    log-uniform between the smallest and the largest of ``search.lr``, the others one of their
    values)."""
    names = searched(search)
    if search.mode == "grid":
        return {name: tune.grid_search(list(getattr(search, name))) for name in names}
    low, high = min(search.lr), max(search.lr)
    return {"lr": tune.loguniform(low, high) if low < high else low,
            **{name: tune.choice(list(getattr(search, name))) for name in names[1:]}}


def search(cfg: TuneConfig, settings: FinetuneConfig, folds: Folds,
           initial_state: dict[str, torch.Tensor], parent_run_id: str | None,
           trainable: Callable[..., None] = run_trial) -> list[dict]:
    """Run the trials on Ray (in an active :func:`cmunet.training.ray_local.ray_session`); return
    :func:`trials_table`.

    ``trainable`` is the function each trial runs (default :func:`run_trial`, which tests wrap).
    With a ``parent_run_id``, :class:`TrialLog` records the trials in MLflow.
    """
    s = cfg.search
    path = search_state(cfg)
    resume = tune.Tuner.can_restore(path)  # a relaunch: finished trials kept, the rest resumed
    if resume:
        check_resumable(path, s.trust_storage)  # before Ray reads anything of it
    scheduler = None
    if s.asha:
        scheduler = ASHAScheduler(time_attr="training_iteration",
                                  max_t=len(folds) * cfg.train.epochs,
                                  grace_period=s.grace_period or cfg.train.epochs)
    function = tune.with_parameters(trainable, settings=settings, folds=folds,
                                    initial_state=initial_state, every_epoch=s.asha,
                                    threads=max(1, int(s.cpus_per_trial)))
    function = tune.with_resources(function, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    if resume:
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
            name="search", storage_path=storage_root(cfg),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            callbacks=([TrialLog(cfg.tracking, parent_run_id, len(folds), cfg.data.shards)]
                       if parent_run_id else []),
            verbose=s.verbose))
    return trials_table(_fit(tuner, path), len(folds))


def check_resumable(path: str, trust_storage: bool) -> None:
    """Ray unpickles a saved search's state, so whoever could write it could run code here: a
    local (or shared file system) state is resumed only if this user alone wrote it
    (:func:`check_private`); one at a storage URL, whose writers cannot be checked, only with
    ``search.trust_storage``."""
    if "://" not in path:
        check_private(Path(path), "the search's saved state")
    elif not trust_storage:
        raise ValueError(f"{path} holds a saved search that Ray would unpickle, and who wrote "
                         "it cannot be checked: set search.trust_storage=true if only you can "
                         "write there, or start over with another search.storage")


def _fit(tuner: tune.Tuner, path: str) -> ResultGrid:
    """``tuner.fit()``; SIGTERM and SIGINT stop it as Tune stops on SIGUSR1: trials are stopped,
    the experiment state saved and :class:`Interrupted` raised (relaunch to continue)."""
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
    """One row per trial, by trial id: ``trial_id``, ``lr``, ``batch_size`` (and
    ``unlabelled_weight`` where searched), ``status``
    (COMPLETED: all folds; STOPPED: early, by ASHA; ERROR: failed on every attempt), the last
    reported :func:`cmunet.training.cross_validation.cv_metrics` and the ``error``."""
    rows = []
    for result in results:
        metrics = result.metrics
        row = {"trial_id": metrics["trial_id"],
               **{k: v for k, v in result.config.items() if k in (*SEARCHED, *OPTIONAL)},
               **{k: v for k, v in metrics.items() if k.startswith(("cv_", "fold"))}}
        if result.error is not None:
            lines = [line for line in str(result.error).splitlines() if line.strip()]
            row["status"], row["error"] = "ERROR", lines[-1] if lines else repr(result.error)
        else:
            row["status"] = "COMPLETED" if metrics.get("folds_done") == folds else "STOPPED"
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])
