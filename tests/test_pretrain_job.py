"""The pre-training job for real: DeepSpeed with 2 gloo ranks, plain python, resume, MLflow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cmunet.training.distributed import free_port
from conftest import ROOT, TINY_PRETRAIN

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = [*TINY_PRETRAIN, "train.log_every=1", "train.figure_every=1"]


def run(cmd, cwd, **env):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def losses(out: Path) -> dict[int, float]:
    with (out / "log.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def runs_in(db: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cmunet-pretrain")
    return client.search_runs([experiment.experiment_id])


def test_deepspeed_two_cpu_ranks(tiny_shards, tmp_path):
    text = run([str(BIN / "deepspeed"), "--num_gpus", "2", f"--master_port={free_port()}",
                str(ROOT / "launch/pretrain.py"),
                *TINY, f"data.shards={tiny_shards}", "out=OUT", "train.epochs=2"], cwd=tmp_path)
    assert "2 rank(s) on cpu" in text
    export = tmp_path / "OUT" / "export"
    weights = load_file(export / "model.safetensors")
    assert any(k.startswith("encoder.") for k in weights)
    assert json.loads((export / "manifest.json").read_text())["count"] == 24
    runs = runs_in(tmp_path / "mlflow.db")  # the default store: ./mlflow.db
    assert len(runs) == 1 and runs[0].data.params["resolved.world_size"] == "2"
    assert "loss" in runs[0].data.metrics and runs[0].info.status == "FINISHED"
    # the contrastive branch's health, per logged step, in log.csv and MLflow, with its
    # reference values: chance over the global batch of 2 ranks x 4 = 8 keys
    health = ("con_top1", "con_top1_chance", "query_std", "key_std", "std_healthy",
              "loss_con_chance")
    with (tmp_path / "OUT" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(set(health) <= set(r) for r in rows)
    assert {float(r["con_top1_chance"]) for r in rows} == {1 / 8}
    assert all(0 <= float(r["con_top1"]) <= 1 and float(r["key_std"]) > 0 for r in rows)
    assert set(health) <= set(runs[0].data.metrics)


def test_plain_python_resumes_and_reproduces_the_next_losses(tiny_shards, tmp_path):
    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), *TINY, f"data.shards={tiny_shards}",
           "out=OUT", "train.epochs=3", "train.checkpoint_every=2", "train.keep_checkpoints=2",
           "data.ratio=50-30"]
    run(cmd, cwd=tmp_path)
    out = tmp_path / "OUT"
    full = losses(out)
    steps = sorted(full)
    last, before = steps[-1], steps[-3]
    assert len(steps) == 3 * (len(steps) // 3) and len(steps) >= 6
    # simulate a job killed after the checkpoint at `before`: drop what came later
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == [f"step_{before + 1:08d}", f"step_{last:08d}"] or \
        checkpoints[-1] == f"step_{last:08d}"
    shutil.rmtree(out / "checkpoints" / f"step_{last:08d}")
    resume_step = int(sorted((out / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    assert resume_step < last
    text = run(cmd, cwd=tmp_path)
    assert f"resuming from {Path('OUT') / 'checkpoints' / f'step_{resume_step:08d}'}" in text
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == steps  # the redone steps are not logged twice
    for step, loss in losses(out).items():  # those after resume_step were computed again
        assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    runs = runs_in(tmp_path / "mlflow.db")
    assert len(runs) == 1  # the resumed run continues the same run, without repeated points
    assert [m.step for m in metric_history(tmp_path / "mlflow.db", runs[0], "loss")] == steps


def metric_history(db: Path, run, key: str) -> list:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{db}").get_metric_history(run.info.run_id, key)
    return sorted(history, key=lambda m: m.step)


def test_sigterm_writes_a_checkpoint_and_the_relaunch_resumes_exactly(tiny_shards, tmp_path):
    import signal
    import time

    import psutil

    cmd = [sys.executable, str(ROOT / "launch/pretrain.py"), *TINY, f"data.shards={tiny_shards}",
           "train.epochs=3", "train.steps_per_epoch=5", "train.checkpoint_every=1000",
           "train.figure_every=100",
           "data.ratio=50-30"]
    run([*cmd, "out=FULL"], cwd=tmp_path)
    full = losses(tmp_path / "FULL")
    out = tmp_path / "OUT"
    proc = subprocess.Popen([*cmd, "out=OUT"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None and not (out / "log.csv").is_file() or len(losses(out)) < 3:
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = {c.laddr.ip for p in tree for c in p.net_connections("inet")
                 if c.status == "LISTEN"}
    assert listening <= {"127.0.0.1"}  # rendezvous store and gloo: loopback only
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, text[-3000:]  # a checkpoint was written: relaunch to resume
    stopped = json.loads((out / "preempted.json").read_text())["step"]
    assert 3 <= stopped < max(full) and "preempted: stopped by SIGTERM" in text
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == [f"step_{stopped:08d}"]
    assert sorted(losses(out)) == list(range(1, stopped + 1))
    text = run([*cmd, "out=OUT"], cwd=tmp_path)
    assert f"step {stopped}" in text and not (out / "preempted.json").exists()
    resumed = losses(out)
    assert sorted(resumed) == sorted(full)
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    run_ = [r for r in runs_in(tmp_path / "mlflow.db") if r.info.run_name == "OUT"]
    assert len(run_) == 1 and run_[0].info.status == "FINISHED"
    assert [m.step for m in metric_history(tmp_path / "mlflow.db", run_[0], "loss")] == \
        sorted(full)


def test_user_mistakes_are_one_line_errors_and_dry_run_starts_nothing(tiny_shards, tmp_path):
    base = [sys.executable, str(ROOT / "launch/pretrain.py"), *TINY, "data.ratio=50-30"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for args, message in [([f"data.shards={tiny_shards}", "out=file"], "is an existing file"),
                          ([f"data.shards={tiny_shards}", f"out={tiny_shards}"], "is the input"),
                          (["data.shards=empty", "out=OUT"], "manifest.json does not exist"),
                          ([f"data.shards={tiny_shards}", "out=OUT", "train.base_lr=-1"],
                           "'train.base_lr' must be a positive number")]:
        result = subprocess.run([*base, *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = subprocess.run([*base, f"data.shards={tiny_shards}", "out=OUT", "--dry-run",
                             "view_size=4096"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "larger than the 64-px images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # 48 + the 7-px shift margin fits the 64-px shards (view_size=64 would need 73 px)
    result = subprocess.run([*base, f"data.shards={tiny_shards}", "out=OUT", "--dry-run",
                             "train.epochs=4", "view_size=48"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "WORLD_SIZE": "2"})
    assert result.returncode == 0, result.stderr
    assert "global batch 8, lr" in result.stdout and "starts from scratch" in result.stdout
    assert "world size 2" in result.stdout and not (tmp_path / "OUT").exists()


def test_probe_and_registered_exports_feed_fine_tuning(tiny_shards, tmp_path):
    """Exports are registered as cmunet-pretrain versions carrying probe_dice; fine-tuning takes
    init=models:/cmunet-pretrain/<version>."""
    from mlflow.tracking import MlflowClient

    run([sys.executable, str(ROOT / "launch/pretrain.py"), *TINY, f"data.shards={tiny_shards}",
         "out=OUT", "train.epochs=2", "train.export_every=1", "probe.every=1", "probe.epochs=1",
         "probe.labelled=4", "probe.validation=2", "data.ratio=50-30"], cwd=tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name='cmunet-pretrain'"),
                      key=lambda v: int(v.version))
    assert [v.tags["epoch"] for v in versions] == ["1", "2"]  # periodic, then final
    assert all(0 <= float(v.tags["probe_dice"]) <= 1 for v in versions)
    run_id = versions[-1].run_id
    assert len(client.get_metric_history(run_id, "probe_dice")) == 2
    text = run([sys.executable, str(ROOT / "launch/finetune.py"), "--config",
                str(ROOT / "configs/finetune/cpu.yaml"), f"data.shards={tiny_shards}",
                "init=models:/cmunet-pretrain/2", "out=FT", "train.epochs=1", "data.ratio=50-30",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path)
    assert "loaded" in text and (tmp_path / "FT" / "best.safetensors").exists()
