"""Resumable DeepSpeed checkpoints: saved on every rank, marked complete, newest compatible resumed.

``save_checkpoint`` lets DeepSpeed write ``<dir>/step_NNNNNNNN/`` from every rank; after a
barrier rank 0 writes ``cmunet.json`` (the client state and a fingerprint of what must match to
resume) into it with a temporary name and a rename. A folder without that marker is an
interrupted save and is never resumed from. Only the newest ``keep`` complete checkpoints stay.

Nothing is unpickled on resume (:func:`load_checkpoint`): every ``.pt`` of the checkpoint is
checked before DeepSpeed reads it, and DeepSpeed's loader is replaced by ``torch.load`` with
``weights_only=True``, allowing only the three plain-data classes DeepSpeed's ZeRO 1/2 optimizer
state holds. A file that needs anything else (a planted pickle payload, another program's
checkpoint) is refused with :class:`UnsafeCheckpoint`, and nothing of it runs.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from cmunet.training.distributed import barrier

MARKER = "cmunet.json"


def fingerprint(cfg, world_size: int) -> dict:
    """What a checkpoint must share with this run to be resumed (ZeRO partitions and the data
    position depend on the world size and batch layout)."""
    return {"method": cfg.method, "width": cfg.model.width, "view_size": cfg.view_size,
            "world_size": world_size, "micro_batch": cfg.train.micro_batch,
            "grad_accum": cfg.train.grad_accum, "zero_stage": cfg.train.zero_stage,
            "seed": cfg.seed}


def complete_checkpoints(folder: Path) -> list[tuple[int, Path, dict]]:
    """(step, path, marker) of the complete checkpoints, oldest first."""
    found = []
    for path in folder.glob("step_*"):
        marker = path / MARKER
        if marker.is_file():
            data = json.loads(marker.read_text())
            found.append((data["client_state"]["step"], path, data))
    return sorted(found, key=lambda item: item[0])


def find_resumable(folder: Path, want: dict) -> tuple[str, dict] | None:
    """(tag, client_state) of the newest complete checkpoint, None if there is none.

    Raises ValueError when the folder holds checkpoints of another setup (world size, batch
    layout, model...): starting over beside them would overwrite or prune them, and they cannot
    be resumed (ZeRO partitions and the data position depend on that setup)."""
    complete = complete_checkpoints(folder)
    for _, path, data in reversed(complete):
        if data["fingerprint"] == want:
            return path.name, data["client_state"]
    if complete:
        _, path, data = complete[-1]
        diff = ", ".join(f"{k}: {data['fingerprint'].get(k)} there, {v} now" for k, v in
                         want.items() if data["fingerprint"].get(k) != v)
        raise ValueError(f"{folder} holds checkpoints of another setup ({diff}); they cannot be "
                         "resumed with this one. Relaunch with the same settings, give a new out=, "
                         "or move the folder away to start over")
    return None


def save_checkpoint(engine, folder: Path, client_state: dict, want: dict, keep: int,
                    is_main: bool) -> Path:
    tag = f"step_{client_state['step']:08d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)
    barrier()
    path = folder / tag
    if is_main:
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"client_state": client_state, "fingerprint": want}, indent=1))
        tmp.replace(path / MARKER)
        _prune(folder, keep)
    barrier()
    return path


def _prune(folder: Path, keep: int) -> None:
    complete = complete_checkpoints(folder)
    keep_paths = {p for _, p, _ in complete[-keep:]}
    newest = complete[-1][0] if complete else -1
    for path in folder.glob("step_*"):
        step = int(path.name.split("_")[1])
        complete_but_old = (path / MARKER).is_file() and path not in keep_paths
        interrupted = not (path / MARKER).is_file() and step < newest
        if complete_but_old or interrupted:
            shutil.rmtree(path, ignore_errors=True)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds more than tensors and plain data; it is not loaded."""


def _allowed_globals() -> list:
    # plain-data classes in DeepSpeed's ZeRO 1/2 optimizer state (an enum, a loss-scale record
    # of floats, a (start, numel) record); no code runs when they are rebuilt
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refuse(path: Path, why: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"{path} {why}; refusing to load it (a checkpoint that is not only tensors and plain "
        f"data can run code when loaded). If you did not write it, someone else can write to "
        f"{path.parent.parent}: move {path.parent} away and relaunch")


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` of tensors and plain data only (UnsafeCheckpoint otherwise)."""
    path = Path(path)
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            lines = [line.strip() for line in str(err).splitlines() if "Unsupported" in line]
            raise _refuse(path, lines[0].split(" was not")[0] if lines else
                          "is not a weights-only file") from None


def check_files(tag_dir: Path) -> None:
    """Refuse the checkpoint folder if any of its ``.pt`` files needs a global outside the
    allowed ones (read from the pickle's opcodes; nothing is executed)."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _allowed_globals()}
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except Exception as err:  # not a zip checkpoint, truncated, ...: never handed on
            raise _refuse(path, f"cannot be checked ({type(err).__name__}: {err})") from None
        if unsafe:
            raise _refuse(path, f"needs {', '.join(sorted(unsafe))}")


def load_checkpoint(engine, folder: Path, tag: str) -> dict:
    """Resume ``engine`` from ``folder/tag`` without unpickling; returns DeepSpeed's client
    state."""
    check_files(folder / tag)
    engine.checkpoint_engine.load = safe_load  # every file DeepSpeed reads goes through it
    _, client_state = engine.load_checkpoint(str(folder), tag=tag)
    return client_state or {}
