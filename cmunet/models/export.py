"""Pre-training exports: consolidated fp32 weights that fine-tuning loads at any world size.

An export is a folder::

    model.safetensors   encoder.* and decoder.* tensors, named as in cmunet.models.unet.UNet
    export.json         method, width, epoch, step, losses, parts
    config.yaml         the resolved pre-training config
    manifest.json       the data manifest it was trained on (intensity statistics, preprocessing)

It is written to a temporary folder and renamed, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cmunet.outdir import check_only

WEIGHTS = "model.safetensors"
INFO = "export.json"
FILES = (WEIGHTS, INFO, "config.yaml", "manifest.json")  # what an export folder holds


def save_export(folder: str | Path, state: dict[str, torch.Tensor], info: dict,
                config_yaml: str, manifest: dict | None) -> Path:
    """Write an export folder atomically (replacing an older one, refused when it holds other
    files than :data:`FILES`) and return its path."""
    folder = Path(folder)
    check_only(folder, FILES, "the export")
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "cmunet-export/1"})
    (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
    (tmp / "config.yaml").write_text(config_yaml)
    if manifest is not None:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if folder.exists():
        old = folder.parent / f".{folder.name}.old"
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def load_export(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of an export folder, or of a bare ``.safetensors`` file (info = {})."""
    path = Path(folder)
    if path.is_file() and path.suffix == ".safetensors":
        return read_weights(path), {}
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a pre-training export: {WEIGHTS} is missing "
                                "(exports are written to OUT/export/ by launch/pretrain.py)")
    info = {}
    if (path / INFO).is_file():
        try:
            info = json.loads((path / INFO).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / INFO}: not valid JSON ({err}); the export is damaged: "
                             "export again (launch/pretrain.py) or give its model.safetensors "
                             "alone") from None
    return read_weights(path / WEIGHTS), info


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a corrupt or truncated file is a ValueError naming it
    (safetensors' own error says only what is wrong, not where)."""
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it is damaged or "
                         "not a weights file: write it again or give another one") from None


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the export
    unexpected: list[str] = field(default_factory=list)  # in the export, not in the model

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.missing:
            text += f"; {len(self.missing)} left at their initialisation ({_short(self.missing)})"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unused from the export ({_short(self.unexpected)})"
        return text


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "export",
              skip_prefixes: tuple[str, ...] = ("head.",)) -> LoadReport:
    """Copy matching tensors into ``model`` (weights and BN buffers), shape-checked.

    Keys under ``skip_prefixes`` (the segmentation head, re-initialised for fine-tuning) are
    neither loaded nor reported missing. A tensor whose shape differs raises a ValueError naming
    the key and both shapes: a width mismatch must never load silently.
    """
    own = model.state_dict()
    wanted = {k: v for k, v in own.items() if not k.startswith(skip_prefixes)}
    report = LoadReport()
    mismatched = [f"{k}: {tuple(state[k].shape)} in {source} vs {tuple(v.shape)} in the model"
                  for k, v in wanted.items() if k in state and state[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{source} does not fit this model ({len(mismatched)} shape mismatches, "
                         f"e.g. {mismatched[0]}); was it trained with another model.width?")
    with torch.no_grad():
        for key, tensor in wanted.items():
            if key in state:
                tensor.copy_(state[key])
                report.loaded.append(key)
            else:
                report.missing.append(key)
    report.unexpected = sorted(k for k in state if k not in wanted
                               and not k.startswith(skip_prefixes))
    return report
