"""The package: console scripts, the launch/ and tools/ wrappers, a non-editable wheel, and
segmentation without the training stack (DeepSpeed, WebDataset, Ray, MLflow)."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT

COMMANDS = ["shard", "pretrain", "finetune", "evaluate", "tune", "segment", "study", "demo",
            "synth", "select", "job"]
TOOLS = ("shard", "synth")  # their wrappers are tools/<name>.py, the others launch/<name>.py
# wrappers named otherwise: launch/select.py would hide the standard library's select module
WRAPPER_NAMES = {"select": "select_frames"}
TRAINING_STACK = ("deepspeed", "webdataset", "ray", "mlflow")


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_command_is_a_console_script_and_a_wrapper():
    scripts = console_scripts()
    assert sorted(scripts) == sorted(f"cmunet-{name}" for name in COMMANDS)
    for name in COMMANDS:
        module, function = scripts[f"cmunet-{name}"].split(":")
        assert module == f"cmunet.cli.{name}" and function == "main"
        assert callable(getattr(importlib.import_module(module), "main"))
        wrapper = (ROOT / ("tools" if name in TOOLS else "launch")
                   / f"{WRAPPER_NAMES.get(name, name)}.py")
        assert f"from cmunet.cli.{name} import main" in wrapper.read_text(), wrapper


def test_no_script_hides_a_standard_library_module():
    """A script's folder comes first on sys.path, so tools/select.py would be what `import
    select` (subprocess needs it) finds for every script in tools/."""
    scripts = [p for folder in ("launch", "tools") for p in (ROOT / folder).glob("*.py")]
    hiding = [p.relative_to(ROOT).as_posix() for p in scripts
              if p.stem in sys.stdlib_module_names]
    assert scripts and not hiding, hiding


def test_pretraining_subprocess_runs_the_module():
    from cmunet.training.launcher import pretrain_command

    plain = pretrain_command("", "c.yaml", ["out=x"])
    assert plain == [sys.executable, "-m", "cmunet.cli.pretrain", "--config", "c.yaml", "out=x"]
    torchrun = pretrain_command("torchrun --nproc_per_node 2", "c.yaml", [])
    assert torchrun[-4:] == ["-m", "cmunet.cli.pretrain", "--config", "c.yaml"]


def tiny_model(folder: Path) -> Path:
    """A fine-tuning output folder with an untrained UNet(8) for 32 px inputs."""
    from cmunet.config import to_dict
    from cmunet.data.preprocess import PreprocessConfig
    from cmunet.models.unet import UNet
    from cmunet.training.finetune import PREPROCESSING, WEIGHTS, cpu_state

    torch.manual_seed(0)
    folder.mkdir()
    save_file(cpu_state(UNet(8)), folder / WEIGHTS)
    (folder / PREPROCESSING).write_text(json.dumps(
        {"size": 32, "dtype": "uint8", "mean": 120.0, "std": 40.0,
         "preprocess": to_dict(PreprocessConfig(size=32))}))
    return folder


BLOCKED = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # `import name` raises ImportError, as when it is not installed
from cmunet.cli.segment import main
code = main(sys.argv[1:])
loaded = [n for n in {names!r} if sys.modules.get(n) is not None]
assert not loaded, loaded
sys.exit(code)
"""


@pytest.mark.slow
def test_segmentation_runs_without_the_training_stack(tmp_path):
    model = tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "in/a.png")
    code = BLOCKED.format(names=TRAINING_STACK)
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage" in helped.stdout, helped.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", code, "--model", str(model), "--input",
                           str(tmp_path / "in"), "--out", str(tmp_path / "seg"), "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "seg/masks/a.png").is_file()


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def build_wheel(tmp_path: Path) -> Path:
    """The non-editable wheel, built (offline) from a copy of the sources in ``tmp_path``."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("cmunet", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path, timeout=300)
    wheel, = (tmp_path / "dist").glob("cmunet-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_checkout(tmp_path):
    """A non-editable wheel (built from a copy of the sources) installed into a folder: the
    console script answers --help, and the shipped configs are found inside the package."""
    wheel, pip = build_wheel(tmp_path), PIP
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    helped = subprocess.run([sys.executable, str(site / "bin" / "cmunet-segment"), "--help"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert helped.returncode == 0 and "usage: cmunet-segment" in helped.stdout, helped.stderr
    probe = ("import cmunet, cmunet.paths as p; print(cmunet.__file__); "
             "print(p.config_file('configs/pretrain/cmunet-cpu.yaml'))")
    where = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                           cwd=tmp_path, check=True).stdout.split()
    assert where[0].startswith(str(site)), where
    assert where[1] == str(site / "cmunet/configs/pretrain/cmunet-cpu.yaml")
    assert Path(where[1]).is_file()
