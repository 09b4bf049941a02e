"""MLflow provenance of every run: the code's git commit and dirty flag, the shard folder as a
dataset input, system metrics; on a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

from mlflow.tracking import MlflowClient

from cmunet.tracking.mlflow_run import Tracker, TrackingConfig, _code_version, code_version
from conftest import ROOT


def git(*args: str, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_run_records_the_code_the_shards_and_the_machine(tmp_path, tiny_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, experiment="provenance", system_metrics_interval=0.1)
    tracker = Tracker(cfg, run_name="tiny", params={"seed": 0}, shards=[tiny_shards])
    tracker.log_metrics({"loss": 1.0}, step=1)
    time.sleep(0.5)  # a few system metric samples
    tracker.close()

    run = MlflowClient(uri).get_run(tracker.run_id)
    commit = git("rev-parse", "HEAD")  # the tests run from a git checkout of cmunet
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["cmunet.git_dirty"] == ("true" if git("status", "--porcelain")
                                                 else "false")
    dataset_input, = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    manifest = (tiny_shards / "manifest.json").read_bytes()
    assert dataset.name == tiny_shards.name
    assert dataset.digest == hashlib.sha256(manifest).hexdigest()[:16]
    assert json.loads(dataset.source) == {"uri": tiny_shards.resolve().as_uri()}
    assert json.loads(dataset.profile)["samples"] == json.loads(manifest)["count"] == 24
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics["loss"] == 1.0 and run.info.status == "FINISHED"

    # resumed: the same run, no second dataset input; system metrics off
    again = Tracker(TrackingConfig(uri=uri, experiment="provenance", system_metrics=False),
                    run_name="tiny", run_id=tracker.run_id, shards=[tiny_shards])
    again.close()
    assert len(MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs) == 1


def test_code_version_is_empty_outside_a_checkout_of_cmunet(tmp_path):
    assert code_version()["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert _code_version(tmp_path) == ()  # not a git checkout
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "venv").mkdir()
    assert _code_version(tmp_path / "venv") == ()  # inside another project's repository


def test_an_unset_tracking_uri_reads_mlflow_tracking_uri(tmp_path, monkeypatch):
    from cmunet.tracking.mlflow_run import resolve_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000")
    assert resolve_uri("") == "http://mlflow-host:5000"
    assert resolve_uri("sqlite:///team.db") == f"sqlite:///{tmp_path / 'team.db'}"  # config wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")  # made absolute, as in configs
    assert resolve_uri("") == f"sqlite:///{tmp_path / 'env.db'}"
