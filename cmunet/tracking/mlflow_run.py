"""MLflow tracking for every job: one run per job, written from rank 0 only, off the training path.

Metrics are queued and sent in batches by a background thread, so a slow tracking server never
stalls a training step. The default store is an embedded SQLite file ``mlflow.db`` in the working
directory (absolute URI, so that Ray trials running in other folders write to the same store),
with artifacts in ``mlartifacts/`` beside it. Open it with ``mlflow ui --backend-store-uri
sqlite:///$PWD/mlflow.db`` (see docs/tracking.md).

Provenance, on every run the :class:`Tracker` creates: the git commit of the code
(``mlflow.source.git.commit``) and whether the checkout had uncommitted changes
(``cmunet.git_dirty``), both absent when the code is not a git checkout; the machine's CPU,
memory, disk, network and GPU use as MLflow system metrics (``system/...``, every
``system_metrics_interval`` seconds); and each shard folder the job reads as an MLflow dataset
input (name = the folder's name, digest = a hash of its ``manifest.json``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmunet.config import check
from cmunet.log import logger
from cmunet.tracking.registry import register_folder
from cmunet.tracking.uri import resolve_uri

@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<working directory>/mlflow.db
    experiment: str = "cmunet"
    run_name: str = ""  # "" = the output folder's name
    register_as: str = ""  # registered model name for this job's exports/models ("" = none)
    system_metrics: bool = True  # log CPU, memory, disk, network and GPU use (system/...)
    system_metrics_interval: float = 10.0  # seconds between system metric samples

    def __post_init__(self):
        check(self.system_metrics_interval > 0, "system_metrics_interval", "must be positive")


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None  # a server decides


def code_version() -> dict[str, str]:
    """The git tags of the code that runs: ``mlflow.source.git.commit`` and ``cmunet.git_dirty``
    ("true" when tracked files differ from the commit or untracked files that git does not
    ignore exist); empty when cmunet is not run from a git checkout of its own (an installed
    package, no git)."""
    return dict(_code_version(Path(__file__).resolve().parents[2]))


@functools.lru_cache(maxsize=4)
def _code_version(root: Path) -> tuple[tuple[str, str], ...]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return ()  # cmunet sits inside some other repository (e.g. its virtual environment)
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return ()
    return (("mlflow.source.git.commit", commit), ("cmunet.git_dirty", str(bool(status)).lower()))


def shard_dataset(folder: str | Path):
    """The MLflow dataset entity of a shard folder: name = the folder's name, digest = the first
    16 hex digits of the SHA-256 of its manifest.json, source = the folder, profile = its counts."""
    from mlflow.entities import Dataset

    from cmunet.data import location

    remote = location.is_url(folder)
    where = str(folder).rstrip("/") if remote else Path(folder).resolve()
    raw = location.read_bytes(where, "manifest.json")
    manifest = json.loads(raw)
    profile = {"samples": manifest.get("count"), "labelled": manifest.get("labelled"),
               "size": manifest.get("size")}
    name = where.rsplit("/", 1)[-1] if remote else where.name
    uri = location.public(where) if remote else where.as_uri()
    return Dataset(name=name, digest=hashlib.sha256(raw).hexdigest()[:16],
                   source_type=location.scheme(where) if remote else "local",
                   source=json.dumps({"uri": uri}), profile=json.dumps(profile))


class Tracker:
    """An MLflow run, or a no-op when ``enabled`` is False (ranks other than 0, tracking off).

    A new run is tagged with :func:`code_version`; ``shards`` are logged as dataset inputs of
    ``context`` ("training", "evaluation"); system metrics are sampled from this process's machine
    while the run is open, unless ``system_metrics`` or ``cfg.system_metrics`` is False (Ray trial
    runs, written where Tune's driver runs, turn them off: that is not the trial's machine)."""

    def __init__(self, cfg: TrackingConfig, run_name: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None, enabled: bool = True,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 shards: Sequence[str | Path] = (), context: str = "training",
                 system_metrics: bool = True):
        self.enabled = enabled and cfg.enabled
        self.run_id: str | None = None
        self._monitor = None
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(
            cfg.experiment, artifact_location=_artifact_root(self.uri)))
        resumed = run_id is not None
        if run_id is None:
            all_tags = {"mlflow.runName": cfg.run_name or run_name, **code_version(),
                        **(tags or {})}
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
        if shards:
            self.log_shards(shards, context)
        if system_metrics and cfg.system_metrics:
            self._start_system_metrics(cfg.system_metrics_interval, resumed)

    def _start_system_metrics(self, interval: float, resumed: bool) -> None:
        """MLflow's system metrics monitor on this run (a thread sampling psutil and, where
        present, NVIDIA's or AMD's GPU library); a failure to start it is reported at close."""
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                                 resume_logging=resumed, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # psutil missing, ...: tracking must never stop a job
            self._errors.append(err)
            self._monitor = None

    def log_shards(self, folders: Sequence[str | Path], context: str = "training") -> None:
        """Log shard folders as dataset inputs of this run (:func:`shard_dataset`), once the
        queue reaches them; logging the same folder again is a no-op."""
        if not self.enabled:
            return
        from mlflow.entities import DatasetInput, InputTag

        def send() -> None:
            self.client.log_inputs(self.run_id, datasets=[
                DatasetInput(shard_dataset(folder), [InputTag("mlflow.data.context", context)])
                for folder in folders])

        self._queue.put(("call", send))

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
        if self._monitor is not None:
            self._monitor.finish()  # its last samples, while the run is still RUNNING
        self._queue.put(("stop", None))
        self._thread.join(timeout=300)
        self.client.set_terminated(self.run_id, status=status)
        self.enabled = False
        if self._errors:
            logger(__name__).warning(f"warning: {len(self._errors)} MLflow calls failed; first: {self._errors[0]!r}")
