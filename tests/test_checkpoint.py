"""Checkpoint bookkeeping: the newest compatible checkpoint is resumed, interrupted saves are
ignored, and checkpoints of another setup stop the job instead of being overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmunet.training.checkpoint import MARKER, _prune, complete_checkpoints, find_resumable

SETUP = {"method": "cmunet", "width": 8, "world_size": 2}


def fake_checkpoint(folder: Path, step: int, setup: dict | None, marker: bool = True) -> Path:
    path = folder / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "weights.pt").write_bytes(b"x")
    if marker:
        (path / MARKER).write_text(json.dumps({"client_state": {"step": step},
                                               "fingerprint": setup}))
    return path


def test_newest_complete_checkpoint_is_resumed(tmp_path):
    fake_checkpoint(tmp_path, 10, SETUP)
    fake_checkpoint(tmp_path, 20, SETUP)
    fake_checkpoint(tmp_path, 30, SETUP, marker=False)  # interrupted save
    assert find_resumable(tmp_path, SETUP) == ("step_00000020", {"step": 20})
    assert find_resumable(tmp_path / "none", SETUP) is None


def test_checkpoints_of_another_setup_stop_the_job(tmp_path):
    fake_checkpoint(tmp_path, 10, {**SETUP, "world_size": 4})
    with pytest.raises(ValueError, match="world_size: 4 there, 2 now") as err:
        find_resumable(tmp_path, SETUP)
    assert str(tmp_path) in str(err.value)
    assert (tmp_path / "step_00000010" / "weights.pt").exists()  # nothing deleted


def test_prune_keeps_the_newest_and_drops_interrupted_saves(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step, SETUP)
    fake_checkpoint(tmp_path, 25, SETUP, marker=False)
    _prune(tmp_path, keep=2)
    assert [p.name for _, p, _ in complete_checkpoints(tmp_path)] == ["step_00000020",
                                                                       "step_00000030"]
    assert not (tmp_path / "step_00000025").exists()


SAVE_AND_RESUME = """
import sys, torch, deepspeed
from pathlib import Path
from cmunet.training import checkpoint as ckpt
from cmunet.training.distributed import init_distributed, shutdown
from cmunet.training.optim import deepspeed_config, make_optimizer
init_distributed()
folder, stage, action = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, 1e-2, 0.05, (0.9, 0.95)),
                                  config=deepspeed_config(2, 1, 1, stage, 1.0))
if action == "save":
    engine.backward(engine(torch.ones(2, 4)).sum()); engine.step()
    ckpt.save_checkpoint(engine, folder, {"step": 1}, {}, 2, True)
else:
    try:
        print("client step", ckpt.load_checkpoint(engine, folder, "step_00000001")["step"])
    except ckpt.UnsafeCheckpoint as err:
        print("refused:", err)
shutdown()
"""


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")  # creates the file if it is ever unpickled


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_planted_pickle_checkpoint_is_refused_and_never_runs(stage, tmp_path):
    import pickle
    import subprocess
    import sys

    import torch

    from conftest import ROOT
    from cmunet.training.checkpoint import UnsafeCheckpoint, check_files, safe_load

    def job(action):
        result = subprocess.run([sys.executable, "-c", SAVE_AND_RESUME, str(tmp_path / "ck"),
                                 str(stage), action], capture_output=True, text=True, timeout=300,
                                cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    job("save")
    tag = tmp_path / "ck" / "step_00000001"
    files = sorted(tag.glob("*.pt"))
    assert len(files) == (1 if stage == 0 else 2)
    assert "client step 1" in job("load")  # DeepSpeed's own files load without unpickling
    sentinel = tmp_path / "pwned"
    for target in files:  # model states, then (ZeRO 1/2) optimizer states
        original = target.read_bytes()
        torch.save({"module": Payload(str(sentinel))}, target)
        out = job("load") if target == files[-1] else "refused: .open " + target.name
        assert "refused:" in out and target.name in out and ".open" in out, out
        with pytest.raises(UnsafeCheckpoint, match="open"):
            safe_load(target)  # also when the check before loading were skipped
        with target.open("wb") as f:  # an old-style plain pickle
            pickle.dump({"module": Payload(str(sentinel))}, f)
        with pytest.raises(UnsafeCheckpoint):
            check_files(tag)
        with pytest.raises(UnsafeCheckpoint):
            safe_load(target)
        target.write_bytes(original)
    assert not sentinel.exists()
