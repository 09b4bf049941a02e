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
