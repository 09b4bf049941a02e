"""What a user of the installed package meets: shipped configs by name and --list-configs,
--version, --log-level, python -m cmunet, --dry-run in --help, cmunet-shard --print-config, the
one-line "install the extra" errors, and the torch wheel `make setup` picks (tools/torch_spec.py).

The slow test builds the wheel and installs it into a fresh virtual environment, away from the
checkout and without the extras, with no network: the environment sees the base dependencies
that .venv already holds (links to exactly those distributions), or, to check the training
commands, all of .venv's packages.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import runpy
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cmunet import paths
from conftest import ROOT
from test_package import PIP, build_wheel

EXTRA_MODULES = ("deepspeed", "webdataset", "mlflow", "ray", "onnx", "onnxruntime", "highdicom")
NEEDS = {"pretrain": "train", "finetune": "train", "evaluate": "train", "tune": "tune",
         "study": "tune", "demo": "tune", "select": "mlflow"}


# ---- configs by name -------------------------------------------------------------------------

def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: names, not paths, find them
    expected = ROOT / "configs/pretrain/cmunet-cpu.yaml"
    for name in ("cmunet-cpu", "pretrain/cmunet-cpu", "pretrain/cmunet-cpu.yaml",
                 "configs/pretrain/cmunet-cpu.yaml", "cmunet://pretrain/cmunet-cpu"):
        assert paths.find_config(name, "pretrain") == expected, name
    assert paths.find_config("cpu", "tune") == ROOT / "configs/tune/cpu.yaml"
    assert paths.find_config("tiny") == ROOT / "configs/study/tiny.yaml"  # unique among all
    with pytest.raises(paths.UnknownConfig,
                       match="ambiguous: finetune/cpu, select/cpu, tune/cpu"):
        paths.find_config("cpu")
    with pytest.raises(paths.UnknownConfig, match=r"shipped: tune/cpu, tune/paper"):
        paths.find_config("cmunet-cpu", "tune")
    (tmp_path / "cmunet-cpu").write_text("method: mae\n")  # a file of that name comes first
    assert paths.find_config("cmunet-cpu", "pretrain") == tmp_path / "cmunet-cpu"
    assert set(paths.shipped_configs("tune")) == {"tune/cpu", "tune/paper"}


def test_config_by_name_list_configs_log_level_and_dry_run_help(tmp_path, monkeypatch, capsys):
    from cmunet.config import parse_command
    from cmunet.log import ROOT as LOGGER
    from cmunet.training.pretrain_config import PretrainConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CMUNET_LOG_LEVEL", raising=False)
    level = logging.getLogger(LOGGER).level
    try:
        cfg, args = parse_command(PretrainConfig, "x", ["--config", "mae-cpu", "out=o",
                                                        "--dry-run", "train.epochs=3",
                                                        "--log-level", "warning"],
                                  command="cmunet-pretrain", kind="pretrain", dry_run="plan")
        assert cfg.method == "mae" and cfg.out == "o" and cfg.train.epochs == 3 and args.dry_run
        assert logging.getLogger(LOGGER).level == logging.WARNING
        assert os.environ["CMUNET_LOG_LEVEL"] == "WARNING"  # for the jobs it starts
    finally:
        logging.getLogger(LOGGER).setLevel(level)
        # parse_command set it in this process: left there, every job a later test starts
        # would log at WARNING (monkeypatch.delenv of an unset variable restores nothing)
        os.environ.pop("CMUNET_LOG_LEVEL", None)
    with pytest.raises(SystemExit) as stop:
        parse_command(PretrainConfig, "x", ["--list-configs"], kind="pretrain")
    assert stop.value.code == 0
    listing = capsys.readouterr().out
    assert "pretrain/cmunet-cpu " in listing and "CM-UNet at laptop scale" in listing
    with pytest.raises(SystemExit):
        parse_command(PretrainConfig, "x", ["--help"], kind="pretrain", dry_run="plan the run")
    helped = capsys.readouterr().out
    assert "--dry-run" in helped and "plan the run" in helped and "--version" in helped
    with pytest.raises(SystemExit) as stop:
        parse_command(PretrainConfig, "x", ["--config", "nope"], kind="pretrain")
    assert stop.value.code == 2 and "neither a file nor a shipped config" in \
        capsys.readouterr().err


def test_version_overview_and_shard_print_config(tiny_folder, tmp_path, capsys):
    import cmunet
    from cmunet.__main__ import main as cmunet_main
    from cmunet.cli.shard import main as shard

    for name in ("pretrain", "tune", "segment", "shard", "synth"):
        module = __import__(f"cmunet.cli.{name}", fromlist=["main"])
        with pytest.raises(SystemExit) as stop:
            module.main(["--version"])
        assert stop.value.code == 0
        assert capsys.readouterr().out == f"cmunet-{name} {cmunet.__version__}\n"
    assert cmunet_main([]) == 0
    overview = capsys.readouterr().out
    assert all(f"cmunet-{name}" in overview for name in (*NEEDS, "shard", "segment", "synth"))
    assert cmunet_main(["--version"]) == 0 and capsys.readouterr().out.startswith("cmunet ")
    assert shard(["--images", str(tiny_folder / "images"), "--out", str(tmp_path / "s"),
                  "--size", "32", "--print-config", "preprocess.fit=crop"]) == 0
    printed = capsys.readouterr().out
    assert f"images: {tiny_folder / 'images'}" in printed and "fit: crop" in printed
    assert "size: 32" in printed and not (tmp_path / "s").exists()


# ---- the torch wheel of `make setup` ---------------------------------------------------------

def report(version: str, url: str, requires: list[str]) -> dict:
    return {"install": [{"metadata": {"name": "torch", "version": version,
                                      "requires_dist": requires},
                         "download_info": {"url": url}}]}


def test_torch_spec_takes_the_cpu_index_only_where_pip_would_fetch_cuda():
    choose = runpy.run_path(str(ROOT / "tools/torch_spec.py"), run_name="spec")["choose"]
    cuda = report("2.13.0", "https://files.pythonhosted.org/x/torch-2.13.0-cp311-cp311-"
                  "manylinux_2_28_x86_64.whl",
                  ["filelock", 'nvidia-cublas==13.1.1.3; platform_system == "Linux"',
                   'optree>=0.13.0; extra == "optree"'])
    cpu = report("2.13.0+cpu", "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311-cp311-"
                 "manylinux_2_28_x86_64.whl", ["filelock", 'optree; extra == "optree"'])
    macos = report("2.13.0", "https://files.pythonhosted.org/x/torch-2.13.0-cp311-none-"
                   "macosx_11_0_arm64.whl", ['nvidia-cublas; platform_system == "NotThisOS"'])
    index = ["--index-url", "https://download.pytorch.org/whl/cpu"]
    words, why = choose("2.13.0", gpu=False, report=cuda)
    if sys.platform.startswith("linux"):
        assert words == ["torch==2.13.0", *index] and "nvidia-cublas" in why
    assert choose("2.13.0", gpu=False, report=cpu)[0] == ["torch==2.13.0"]
    assert "torch-2.13.0+cpu-cp311" in choose("2.13.0", gpu=False, report=cpu)[1]
    assert choose("2.13.0", gpu=False, report=macos)[0] == ["torch==2.13.0"]
    assert choose("2.13.0", gpu=True, report=cuda)[0] == ["torch==2.13.0"]
    assert choose("2.13.0", gpu=False, report=None)[0] == ["torch==2.13.0", *index]
    assert choose("2.13.0", "https://m/cpu", gpu=False, report=cuda)[0][-1] == "https://m/cpu" \
        or not sys.platform.startswith("linux")


# ---- the wheel, installed without the extras -------------------------------------------------

def base_requirements() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return [Requirement(line) for line in parser["options"]["install_requires"].split("\n")
            if line.strip() and not line.strip().startswith("#")]


def base_distributions() -> list[metadata.Distribution]:
    """The installed distributions the base install needs: install_requires and what they
    require on this machine, recursively."""
    todo, seen, found = base_requirements(), set(), []
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(requirement.name)
        found.append(dist)
        for line in dist.requires or []:
            needed = Requirement(line)
            extras = [""] + sorted(requirement.extras)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in extras):
                todo.append(needed)
    return found


def link_base(folder: Path) -> Path:
    """``folder`` holding links to the files of the base distributions (and nothing else)."""
    folder.mkdir()
    for dist in base_distributions():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source, target_is_directory=source.is_dir())
    return folder


PTH = ("import os, sys; sys.path.extend(p for p in os.environ.get('CMUNET_TEST_SITE', '')"
       ".split(os.pathsep) if p)\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(run, tmp): the wheel installed into a fresh virtual environment; ``run(command, *args,
    full=False)`` runs its console script ``command`` in ``tmp`` with the base dependencies only
    (or, with ``full``, every package of .venv)."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*PIP, "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], capture_output=True, text=True, check=True)
    Path(purelib.stdout.strip(), "cmunet_test_site.pth").write_text(PTH)
    base = link_base(tmp / "base")
    assert not [m for m in EXTRA_MODULES if any(base.glob(f"{m}*"))], "an extra in the base"
    full = os.pathsep.join(site.getsitepackages())
    work = tmp / "work"
    work.mkdir()

    def run(command: str, *args: str, full_site: bool = False) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"CMUNET_TEST_SITE": full if full_site else str(base), "OMP_NUM_THREADS": "1"}
        return subprocess.run([str(venv / "bin" / command), *args], capture_output=True,
                              text=True, env=env, cwd=work, timeout=300)

    return run, work


@pytest.mark.slow
def test_installed_wheel_without_extras(installed):
    run, work = installed
    version = run("cmunet-pretrain", "--version")
    assert version.returncode == 0 and version.stdout.startswith("cmunet-pretrain 0."), version
    where = run("python", "-c", "import cmunet, torch, importlib.util as u; "
                f"print(cmunet.__file__, torch.__file__, [m for m in {EXTRA_MODULES!r} "
                "if u.find_spec(m)])")
    assert where.returncode == 0, where.stderr
    package, torch, extras = where.stdout.split(maxsplit=2)
    assert "/venv/lib/" in package and "/base/" in torch and extras.strip() == "[]", where.stdout
    overview = run("python", "-m", "cmunet")
    assert overview.returncode == 0 and "pip install 'cmunet[tune]'" in overview.stdout
    for name, extra in NEEDS.items():  # --help too: one line, no traceback
        refused = run(f"cmunet-{name}", "--help")
        assert refused.returncode == 2 and not refused.stdout, refused
        assert refused.stderr == (f"error: cmunet-{name} needs the '{extra}' extra: "
                                  f"pip install 'cmunet[{extra}]'\n"), refused.stderr
    drawn = run("cmunet-synth", "--out", "syn", "--count", "2", "--size", "32")
    assert drawn.returncode == 0 and "wrote 2 images" in drawn.stdout, drawn.stderr
    assert len(list((work / "syn" / "images").glob("syn*.png"))) == 2
    segment = run("cmunet-segment", "--model", "models:/cmunet@champion", "--input",
                  "syn/images", "--out", "seg")
    assert segment.returncode == 2 and segment.stderr.strip().splitlines() == [
        "error: models:/cmunet@champion needs the 'mlflow' extra: pip install 'cmunet[mlflow]'"]


@pytest.mark.slow
def test_installed_wheel_finds_shipped_configs_by_name(installed):
    run, _ = installed
    listed = run("cmunet-pretrain", "--list-configs", full_site=True)
    assert listed.returncode == 0, listed.stderr
    assert "pretrain/cmunet-cpu " in listed.stdout and "/venv/lib/" in listed.stdout
    for name in ("cmunet-cpu", "configs/pretrain/cmunet-cpu.yaml"):  # as the docs write it
        printed = run("cmunet-pretrain", "--config", name, "--print-config", "out=o",
                      full_site=True)
        assert printed.returncode == 0, printed.stderr
        assert "method: cmunet" in printed.stdout and "out: o" in printed.stdout
