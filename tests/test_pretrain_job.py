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

from conftest import ROOT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TINY = ["--config", str(ROOT / "configs/pretrain/cmunet-cpu.yaml"), "view_size=64",
        "model.width=8", "cmunet.mlp_hidden=64", "cmunet.mlp_out=32", "data.num_workers=1",
        "train.micro_batch=4", "train.log_every=1", "train.figure_every=1"]


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
    text = run([str(BIN / "deepspeed"), "--num_gpus", "2", str(ROOT / "launch/pretrain.py"),
                *TINY, f"data.shards={tiny_shards}", "out=OUT", "train.epochs=2"], cwd=tmp_path)
    assert "2 rank(s) on cpu" in text
    export = tmp_path / "OUT" / "export"
    weights = load_file(export / "model.safetensors")
    assert any(k.startswith("encoder.") for k in weights)
    assert json.loads((export / "manifest.json").read_text())["count"] == 24
    runs = runs_in(tmp_path / "mlflow.db")  # the default store: ./mlflow.db
    assert len(runs) == 1 and runs[0].data.params["resolved.world_size"] == "2"
    assert "loss" in runs[0].data.metrics and runs[0].info.status == "FINISHED"


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
    resumed = {int(r["step"]): float(r["loss"]) for r in rows[len(full):]}
    assert sorted(resumed) == list(range(resume_step + 1, last + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    assert len(runs_in(tmp_path / "mlflow.db")) == 1  # the resumed run continues the same run


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
