"""``launch/demo.py`` end to end at a tiny size: every stage runs for real (2 deepspeed ranks,
local Ray, MLflow registry) and the summary names the figures and the MLflow UI command."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest

from conftest import ROOT

TINY = ["synthetic_count=40", "synthetic_size=64", "held_out=2", "ratio=50-30",
        "pretrain_overrides=[view_size=64,model.width=8,train.epochs=1,train.warmup_epochs=1,"
        "train.micro_batch=4,data.num_workers=0]",
        "tune_overrides=[train.epochs=1,search.folds=2]"]


def run_demo(out) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), f"out={out}", *TINY],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_resumes(tmp_path):
    out = tmp_path / "demo"
    text = run_demo(out)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_dice_scratch", "test_dice_pretrained", "held_out_dice"):
        assert 0.0 <= summary[key] <= 1.0
    assert "test Dice without pre-training" in text and "with CM-UNet pre-training" in text
    assert f"tools/mlflow_ui.sh --store sqlite:///{out}/mlflow.db" in text
    # 2 ranks really ran, the export was used, the champion segmented the held-out frames
    log = (out / "pretrain" / "stdout.log").read_text()
    assert "2 rank(s)" in log, log[-2000:]
    pretrained = json.loads((out / "finetune-pretrained" / "result.json").read_text())
    assert pretrained["registered"]["alias"] == "champion"
    assert sorted(p.name for p in (out / "segment" / "masks").iterdir()) == \
        sorted(p.name for p in (out / "held-out" / "images").iterdir())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    version = client.get_model_version_by_alias("cmunet-demo", "champion")
    assert version.run_id == pretrained["parent_run_id"]
    # relaunching keeps every finished stage
    again = run_demo(out)
    assert again.count("exists, kept") >= 5 and "--master_port" not in again


def test_launcher_is_taken_from_this_environment(monkeypatch):
    from pathlib import Path

    from cmunet.training.launcher import pretrain_command

    monkeypatch.setenv("PATH", "/nonexistent")  # as under `make demo`: the venv is not active
    command = pretrain_command("deepspeed --num_gpus 2", "c.yaml", ["out=x"])
    assert command[0] == str(Path(sys.executable).parent / "deepspeed")
    assert command[1:3] == ["--num_gpus", "2"] and command[3].startswith("--master_port=")
    assert command[4:6] == ["--module", "cmunet.cli.pretrain"]  # also from an installed wheel
    assert pretrain_command("", "c.yaml", [])[0] == sys.executable
    assert "--master_port=1" in pretrain_command("deepspeed --master_port=1", "c.yaml", [])
