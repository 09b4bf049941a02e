"""MLflow tracking for every job: one run per job, written from rank 0 only, off the training path.

Metrics are queued and sent in batches by a background thread, so a slow tracking server never
stalls a training step. The default store is an embedded SQLite file ``mlflow.db`` in the working
directory (absolute URI, so that Ray trials running in other folders write to the same store),
with artifacts in ``mlartifacts/`` beside it. Open it with ``mlflow ui --backend-store-uri
sqlite:///$PWD/mlflow.db`` (see docs/tracking.md).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmunet.log import logger

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network calls from the toolkit


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<working directory>/mlflow.db
    experiment: str = "cmunet"
    run_name: str = ""  # "" = the output folder's name
    register_as: str = ""  # registered model name for this job's exports/models ("" = none)


def resolve_uri(uri: str) -> str:
    """An absolute tracking URI: the default SQLite file, or relative sqlite paths made absolute."""
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder or file path
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None  # a server decides


class Tracker:
    """An MLflow run, or a no-op when ``enabled`` is False (ranks other than 0, tracking off)."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None, enabled: bool = True,
                 parent_run_id: str | None = None, run_id: str | None = None):
        self.enabled = enabled and cfg.enabled
        self.run_id: str | None = None
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(
            cfg.experiment, artifact_location=_artifact_root(self.uri)))
        if run_id is None:
            all_tags = {"mlflow.runName": cfg.run_name or run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id, tags=all_tags)
            run_id = run.info.run_id
        self.run_id = run_id
        if params:
            self.log_params(params)
        self._queue: queue.Queue = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()

    # ---- queued (asynchronous) ------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            now = int(time.time() * 1000)
            self._queue.put(("metrics", [(k, float(v), now, step) for k, v in metrics.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (its files) once the queue reaches it."""
        if self.enabled:
            self._queue.put(("artifact", (str(path), artifact_path)))

    def register(self, artifact_path: str, name: str, tags: dict) -> None:
        """Register the logged folder ``artifact_path`` as a new version of model ``name``, once
        the queue has uploaded it."""
        if self.enabled and name:
            from cmunet.tracking.registry import register_folder

            self._queue.put(("call", lambda: register_folder(self.client, self.run_id,
                                                             artifact_path, name, tags)))

    def _drain(self) -> None:
        from mlflow.entities import Metric

        pending: list = []
        while True:
            try:
                item = self._queue.get(timeout=2.0)
            except queue.Empty:
                item = None
            if item is not None and item[0] == "metrics":
                pending.extend(item[1])
            if pending and (item is None or item[0] != "metrics" or len(pending) >= 500):
                self._send(lambda: [self.client.log_batch(self.run_id, metrics=[
                    Metric(k, v, t, s) for k, v, t, s in pending[i:i + 1000]])
                    for i in range(0, len(pending), 1000)])
                pending = []
            if item is not None and item[0] == "artifact":
                path, artifact_path = item[1]
                send = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
                self._send(lambda: send(self.run_id, path, artifact_path))
            if item is not None and item[0] == "call":
                self._send(item[1])
            if item is not None and item[0] == "flush":
                item[1].set()
            if item is not None and item[0] == "stop":
                return

    def _send(self, action) -> None:
        try:
            action()
        except Exception as err:  # tracking must never kill training; report at close
            self._errors.append(err)

    # ---- immediate ---------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def flush(self, timeout: float = 300) -> None:
        """Wait until everything queued so far has been sent."""
        if self.enabled:
            done = threading.Event()
            self._queue.put(("flush", done))
            done.wait(timeout)

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._queue.put(("stop", None))
        self._thread.join(timeout=300)
        self.client.set_terminated(self.run_id, status=status)
        self.enabled = False
        if self._errors:
            logger(__name__).warning(f"warning: {len(self._errors)} MLflow calls failed; first: {self._errors[0]!r}")
