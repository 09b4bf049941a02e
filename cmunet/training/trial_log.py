"""The search's trials in MLflow: one child run per trial, written where Tune's driver loop runs,
so that trials on other machines need no access to the tracking store."""

from __future__ import annotations

from ray import tune

from cmunet.tracking.mlflow_run import Tracker, TrackingConfig


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
        weight = trial.config.get("unlabelled_weight")
        extra = {} if weight is None else {"unlabelled.weight": weight}
        self._runs[trial.trial_id] = Tracker(
            self.tracking, run_name=f"trial-{trial.trial_id} lr={lr:.3g} batch={batch}"
            + ("" if weight is None else f" unlabelled={weight:g}"),
            parent_run_id=self.parent_run_id, shards=self.shards, system_metrics=False,
            params={"train.lr": lr, "train.batch_size": batch, **extra,
                    "trial_id": trial.trial_id})

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
