"""The cross-validated search: patient folds, the same initial weights in every fold, a failed
trial retried on a real local Ray, the MLflow server script, and launch/tune.py end to end up to
``models:/cmunet@champion``."""

from __future__ import annotations

import csv
import json
import shutil
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import tune

import cmunet.training.cross_validation as cross_validation
from cmunet.config import load_config
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet
from cmunet.evaluation.evaluate import load_finetuned
from cmunet.tracking.mlflow_run import Tracker, TrackingConfig
from cmunet.training.finetune import build_model, cpu_state, patients_of
from cmunet.training.cross_validation import FoldScore, cross_validate, cv_metrics
from cmunet.training.folds import patient_folds
from cmunet.training.ray_local import ray_session
from cmunet.training.search import search
from cmunet.training.trial import FOLDS_FILE, finished_folds, fold_key, run_trial, state_digest
from cmunet.training.tune import run_tune
from cmunet.training.tune_config import SearchConfig, TuneConfig, absolute, finetune_settings
from conftest import ROOT, load_tool

CPU_YAML = str(ROOT / "configs" / "tune" / "cpu.yaml")
RATIO = "20-60"  # the wide shards' fine-tuning pool: 15 images of 5 patients
TINY = ["model_width=8", "train.epochs=2", "train.batch_size=4", "search.batch_size=[4]",
        f"data.ratio={RATIO}", "search.num_cpus=2", "search.max_concurrent=2"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wide_shards(tiny_folder, tmp_path_factory) -> Path:
    """The tiny images sharded with a fine-tuning pool of 5 patients (enough for patient folds)."""
    out = tmp_path_factory.mktemp("wide") / "shards"
    code = load_tool("shard")(["--images", str(tiny_folder / "images"), "--masks",
                               str(tiny_folder / "masks"), "--meta", str(tiny_folder / "meta.csv"),
                               "--out", str(out), "--size", "64", "--workers", "1",
                               "--shard-size", "2", f"ratios=[{RATIO}]"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for the module's Ray tests; searches use a running Ray as it is."""
    with ray_session(SearchConfig(num_cpus=2)):
        yield


def tiny_cfg(shards: Path, out: Path, *overrides: str) -> TuneConfig:
    return absolute(load_config(TuneConfig, CPU_YAML, [f"data.shards={shards}", f"out={out}",
                                                       "init=none", *TINY, *overrides]))


def pool_and_folds(cfg: TuneConfig):
    pool = pool_keys(load_splits(Path(cfg.data.shards) / "splits.json"), "finetune",
                     cfg.data.ratio)
    return pool, patient_folds(pool, patients_of(cfg.data.shards), cfg.search.folds, cfg.seed)


# ---- folds ---------------------------------------------------------------------------------------

def test_patient_folds_never_share_a_patient_and_cover_the_pool():
    rng = np.random.default_rng(0)
    patient_of = {f"k{i:03d}": f"p{p}" for i, p in enumerate(rng.integers(0, 9, size=60))}
    keys = sorted(patient_of)
    folds = patient_folds(keys, patient_of, 3, seed=1)
    assert len(folds) == 3
    assert sorted(k for _, val in folds for k in val) == keys  # validation sets partition the pool
    for train, val in folds:
        assert val and sorted(train + val) == keys
        assert not {patient_of[k] for k in train} & {patient_of[k] for k in val}
    largest = max(np.unique(list(patient_of.values()), return_counts=True)[1])
    sizes = [len(val) for _, val in folds]
    assert max(sizes) - min(sizes) <= largest  # balanced by images
    assert patient_folds(keys, patient_of, 3, seed=1) == folds  # seeded


def test_patient_folds_fall_back_to_frames_with_a_warning():
    patient_of = {f"k{i}": f"p{i // 3}" for i in range(6)}  # 2 patients for 3 folds
    warnings: list[str] = []
    folds = patient_folds(sorted(patient_of), patient_of, 3, seed=0, warn=warnings.append)
    assert len(warnings) == 1 and "2 patient(s), fewer than search.folds=3" in warnings[0]
    assert sorted(k for _, val in folds for k in val) == sorted(patient_of)
    assert all(len(val) == 2 for _, val in folds)
    with pytest.raises(ValueError, match="fewer than search.folds=8"):
        patient_folds(sorted(patient_of), patient_of, 8, seed=0)


def test_cv_metrics_mean_std_and_running_fold():
    scores = [FoldScore(0.5, 3), FoldScore(0.7, 5)]
    metrics = cv_metrics(scores)
    assert metrics["cv_dice"] == pytest.approx(0.6)
    assert metrics["cv_dice_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert metrics["folds_done"] == 2 and metrics["fold2_best_epoch"] == 5
    assert cv_metrics(scores, current=0.9)["cv_dice"] == pytest.approx(0.7)  # a fold in progress


@pytest.mark.slow
def test_every_fold_starts_from_the_same_weights(wide_shards, tmp_path, monkeypatch):
    cfg = tiny_cfg(wide_shards, tmp_path, "tracking.enabled=false")
    settings = finetune_settings(cfg)
    model, _ = build_model(settings)
    initial = cpu_state(model)
    reference = {k: v.clone() for k, v in initial.items()}
    received, trained = [], []
    real_fit = cross_validation.fit

    def recording_fit(cfg, train_keys, val_keys, initial_state=None, on_epoch=None, device=None):
        received.append({k: v.clone() for k, v in initial_state.items()})
        result = real_fit(cfg, train_keys, val_keys, initial_state, on_epoch, device)
        trained.append(result.best_state)
        return result

    monkeypatch.setattr(cross_validation, "fit", recording_fit)
    _, folds = pool_and_folds(cfg)
    reports: list[dict] = []
    metrics = cross_validate(settings, folds, initial, reports.append, every_epoch=True)
    assert len(received) == 3
    for state in received:
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert any(not torch.equal(trained[0][k], reference[k]) for k in reference)  # fold 1 trained
    assert len(reports) == 3 * cfg.train.epochs and reports[-1] == metrics
    assert metrics["folds_done"] == 3
    assert metrics["cv_dice"] == pytest.approx(np.mean([metrics[f"fold{k}_dice"]
                                                        for k in (1, 2, 3)]))
    # an interrupted trial that finished fold 1: folds 2 and 3 only, the same reports and result
    fold1 = FoldScore(metrics["fold1_dice"], metrics["fold1_best_epoch"])
    resumed: list[dict] = []
    again = cross_validate(settings, folds, initial, resumed.append, every_epoch=True,
                           done=[fold1])
    assert len(received) == 5 and again == metrics and resumed == reports[cfg.train.epochs:]


def test_a_saved_fold_is_used_again_only_under_the_same_key(wide_shards, tmp_path):
    cfg = finetune_settings(tiny_cfg(wide_shards, tmp_path, "tracking.enabled=false"))
    _, folds = pool_and_folds(tiny_cfg(wide_shards, tmp_path))
    weights = state_digest({"w": torch.zeros(2)})
    keys = [fold_key(cfg, fold, weights) for fold in folds]
    other_lr = fold_key(replace(cfg, train=replace(cfg.train, lr=0.5)), folds[1], weights)
    other_weights = fold_key(cfg, folds[1], state_digest({"w": torch.ones(2)}))
    assert len({*keys, other_lr, other_weights}) == 5
    rows = [{"key": keys[0], "dice": 0.625, "epoch": 2}, {"key": other_lr, "dice": 0.5, "epoch": 1}]
    (tmp_path / FOLDS_FILE).write_text(json.dumps(rows))
    saved = tune.Checkpoint.from_directory(str(tmp_path))
    assert finished_folds(saved, keys) == [FoldScore(0.625, 2)]  # fold 2 was another trial's
    assert finished_folds(None, keys) == []


def test_the_search_refuses_test_split_images(wide_shards, tmp_path):
    cfg = tiny_cfg(wide_shards, tmp_path / "out", "tracking.enabled=false")
    pool, _ = pool_and_folds(cfg)
    test_key = load_splits(wide_shards / "splits.json")["test"]["keys"][0]
    with pytest.raises(ValueError, match="include test-split images"):
        run_tune(cfg, keys=[*pool, test_key])


# ---- Ray -----------------------------------------------------------------------------------------

FLAKY_LR = 1e-2


def failing_first(marker: Path):
    """A trial function that fails the first attempt of the trial with lr=FLAKY_LR (creating
    ``marker``), then runs :func:`run_trial`: failure injection lives here, not in the library."""

    def trainable(config: dict, **kwargs) -> None:
        if config["lr"] == FLAKY_LR and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure of the first attempt")
        run_trial(config, **kwargs)

    return trainable


@pytest.mark.slow
def test_a_trial_that_fails_once_is_retried_and_the_asha_search_completes(wide_shards, tmp_path,
                                                                          local_ray):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="retry")
    cfg = replace(tiny_cfg(wide_shards, tmp_path / "out", f"search.lr=[{FLAKY_LR}, 1.0e-3]",
                           "search.max_failures=1", "search.asha=true"), tracking=tracking)
    settings = finetune_settings(cfg)
    model, _ = build_model(settings)
    _, folds = pool_and_folds(cfg)
    marker = tmp_path / "failed-once"
    parent = Tracker(tracking, run_name="search")
    table = search(cfg, settings, folds, cpu_state(model), parent.run_id, failing_first(marker))
    parent.close()
    assert marker.exists()  # the first attempt failed...
    # ...and the retry ran: every trial ended with a score (ASHA may stop one after a fold)
    assert {row["status"] for row in table} <= {"COMPLETED", "STOPPED"}
    assert "COMPLETED" in {row["status"] for row in table}
    assert all(row["folds_done"] == 3 for row in table if row["status"] == "COMPLETED")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.uri)
    children = client.search_runs([client.get_experiment_by_name("retry").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.run_id}'")
    failures = {float(r.data.params["train.lr"]): r.data.tags.get("failed_attempts")
                for r in children}
    assert failures == {FLAKY_LR: "1", 1e-3: None}  # one child run per trial, retries included
    assert {r.data.tags["outcome"] for r in children} == {row["status"] for row in table}


# ---- MLflow server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, body: dict | None = None) -> dict:
    """GET ``url``, or POST ``body`` as JSON to it; the decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_mlflow_server_script_answers_the_rest_api(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(ROOT / "tools" / "mlflow_ui.sh"), "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
                time.sleep(0.5)
        tracker = Tracker(TrackingConfig(uri=base, experiment="server-test"), run_name="probe",
                          params={"train.lr": 0.001})
        tracker.log_metrics({"cv_dice": 0.5}, step=1)
        tracker.close()
        experiment = rest(f"{base}/api/2.0/mlflow/experiments/get-by-name"
                          "?experiment_name=server-test")["experiment"]
        runs = rest(f"{base}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [tracker.run_id]
        assert runs[0]["data"]["metrics"][0]["key"] == "cv_dice"
        assert (tmp_path / "mlflow.db").is_file()  # the default store: ./mlflow.db
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the script's process group: mlflow + uvicorn
        server.wait(timeout=30)


# ---- the job -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_launch_tune_end_to_end_registers_a_loadable_champion(wide_shards, tmp_path, monkeypatch,
                                                              local_ray):
    monkeypatch.chdir(tmp_path)  # the default tracking store: ./mlflow.db
    assert load_tool("tune")(["--config", CPU_YAML, f"data.shards={wide_shards}", "init=none",
                              "out=OUT", *TINY]) == 0
    out = tmp_path / "OUT"
    result = json.loads((out / "result.json").read_text())
    with (out / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 2 and {t["status"] for t in trials} == {"COMPLETED"}
    best = result["best"]
    assert result["epochs"] == int(np.median([best[f"fold{k}_best_epoch"] for k in (1, 2, 3)]))
    assert (out / "test" / "metrics.json").is_file()
    assert (out / "model" / "best.safetensors").is_file()
    test_keys = set(load_splits(wide_shards / "splits.json")["test"]["keys"])
    assert not test_keys & {k for fold in json.loads((out / "folds.json").read_text())
                            for k in fold["validation"]}

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store, in the working directory
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cmunet-tune")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(result["parent_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.data.metrics["best_cv_dice"] == pytest.approx(best["cv_dice"])
    assert "test_dice" in parent.data.metrics and parent.data.params["search.folds"] == "3"
    assert {"test_hd_n_undefined", "test_add_n_undefined"} <= set(parent.data.metrics)
    assert "trials.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # cpu.yaml's two learning rates: the winner sits on an edge (the one batch size is not searched)
    edge = f"lr={best['lr']:g} ({'top' if best['lr'] == 1e-3 else 'bottom'} of [0.0001, 0.001])"
    [message] = result["grid_edge"]
    assert message.startswith(f"{edge}: ") and message.endswith("widen search.lr beyond it")
    assert parent.data.tags["grid_edge"] == edge
    for child in children:
        metrics = child.data.metrics
        assert {f"fold{k}_{m}" for k in (1, 2, 3) for m in ("dice", "best_epoch")} <= set(metrics)
        assert metrics["cv_dice"] == pytest.approx(np.mean([metrics[f"fold{k}_dice"]
                                                            for k in (1, 2, 3)]))
        assert "cv_dice_std" in metrics and child.info.status == "FINISHED"

    version = client.get_model_version_by_alias("cmunet", "champion")
    assert str(version.version) == result["registered"]["version"]
    assert version.tags["cv_dice"] == f"{best['cv_dice']:.5f}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    model = mlflow.pyfunc.load_model("models:/cmunet@champion")
    assert model.metadata.signature is not None
    data = InMemorySet(wide_shards, sorted(test_keys))
    images = np.stack([data[i]["image"] for i in range(len(data))])  # (N, 1, 64, 64) z-scored
    probability = model.predict(images)
    mask = model.predict(images, params={"mask": True})
    assert probability.shape == mask.shape == (len(data), 64, 64)
    assert probability.dtype == np.float32 and 0 <= probability.min() <= probability.max() <= 1
    with torch.no_grad():  # the same UNet as the fine-tuning output folder
        reference = load_finetuned(out / "model").eval()(torch.from_numpy(images)).argmax(1)
    np.testing.assert_array_equal(mask, reference.numpy().astype(np.float32))
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(
        "models:/cmunet@champion", dst_path=str(tmp_path / "download"))).rglob("*")}
    assert {"best.safetensors", "preprocessing.json", "MLmodel"} <= files

    # the ONNX model beside it: the same probabilities through onnxruntime (tests/test_onnx.py)
    assert result["onnx"]["path"] == str(out / "model.onnx") and result["onnx"]["opset"] == 18
    assert result["onnx"]["max_abs_diff"] <= 1e-4
    assert version.tags["onnx"] == result["registered"]["onnx"]
    onnx_model = mlflow.pyfunc.load_model(version.tags["onnx"])
    np.testing.assert_allclose(onnx_model.predict(images)["probability"], probability, atol=1e-4)
    assert client.get_logged_model(version.tags["onnx"].split("/")[-1]).source_run_id == \
        parent.info.run_id

    # provenance: the code and the shards on the parent and the trials; system metrics on the
    # parent only (the trials' runs are written by Tune's driver, not on the trial's machine)
    for run in (parent, *children):
        run = client.get_run(run.info.run_id)
        assert "mlflow.source.git.commit" in run.data.tags
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == [wide_shards.name]
        assert any(k.startswith("system/") for k in run.data.metrics) == (run is parent or
                                                                          run.info.run_id ==
                                                                          parent.info.run_id)


def result_rows(trial: Path) -> list[dict]:
    """The results a trial reported (its result.json, one JSON object a line)."""
    path = trial / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_sigterm_mid_search_then_relaunch_skips_finished_trials_and_folds(wide_shards, tmp_path):
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    cmd = [sys.executable, str(ROOT / "launch/tune.py"), "--config", CPU_YAML,
           f"data.shards={wide_shards}", "init=none", "out=OUT", *TINY, "search.lr=[1e-2, 1e-3]",
           "search.max_concurrent=1", "search.num_cpus=1", f"search.temp_dir={temp}",
           "search.folds=5", "train.epochs=40"]  # time to stop trial 2 after a fold, before 5
    dry = subprocess.run([*cmd, "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0 and "lr=0.01 batch_size=4" in dry.stdout and "a new search" in \
        dry.stdout and not (tmp_path / "OUT").exists(), dry.stderr
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    def folds_done() -> dict[Path, int]:  # per trial folder: the folds it reported finished
        return {trial: max([row.get("folds_done", 0) for row in result_rows(trial)], default=0)
                for trial in (tmp_path / "OUT" / "ray" / "search").glob("*/")}

    def one_finished_one_started() -> bool:  # max_concurrent=1: one trial after the other
        counts = sorted(folds_done().values())
        return len(counts) == 2 and 0 < counts[0] < counts[1] == 5

    deadline = time.time() + 600
    while not one_finished_one_started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    stopped = time.time()
    assert proc.returncode == 75, text[-3000:]
    progress = folds_done()
    finished = [trial for trial, n in progress.items() if n == 5]
    (partial, before), = [(trial, n) for trial, n in progress.items() if 0 < n < 5]
    assert len(finished) == 1 and not (tmp_path / "OUT" / "result.json").exists()
    done = {trial: (trial / "result.json").read_text() for trial in finished}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for trial, text in done.items():
        assert (trial / "result.json").read_text() == text  # the finished trial did not run again
    # the interrupted trial went on after its finished folds: fold `before` + 1 is the first the
    # relaunch reports, and every fold is reported finished once
    relaunched = [row["folds_done"] for row in result_rows(partial) if row["timestamp"] > stopped]
    assert relaunched == list(range(before + 1, 6)), (before, relaunched)
    assert "finished before, not trained again" in result.stdout + result.stderr
    with (tmp_path / "OUT" / "trials.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["COMPLETED", "COMPLETED"]
    shutil.rmtree(temp, ignore_errors=True)


def test_search_state_is_resumed_only_from_this_users_files(tmp_path):
    """Ray Tune unpickles its saved state: a file others could have planted is refused."""
    import os

    from cmunet.outdir import check_private

    state = tmp_path / "search"
    (state / "trial").mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"state")
    os.chmod(state, 0o755)
    os.chmod(state / "trial", 0o755)
    os.chmod(state / "tuner.pkl", 0o644)
    check_private(state, "the search's saved state")  # written by this user: fine
    os.chmod(state / "tuner.pkl", 0o666)
    with pytest.raises(ValueError, match="tuner.pkl is writable by other users"):
        check_private(state, "the search's saved state")
    os.chmod(state / "tuner.pkl", 0o644)
    (state / "trial" / "link.pkl").symlink_to(state / "tuner.pkl")
    with pytest.raises(ValueError, match="link.pkl is a symbolic link"):
        check_private(state, "the search's saved state")
