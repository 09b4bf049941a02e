"""The documentation stays true: scripts answer --help, the configs and scripts the docs name exist,
every shipped config loads, and docs/configuration.md matches the config dataclasses."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cmunet.config import load_config
from cmunet.study import StudyConfig, arm_of, cells
from cmunet.training.finetune import FinetuneConfig
from cmunet.training.pretrain_config import PretrainConfig
from cmunet.training.tune import TuneConfig
from conftest import ROOT

SCRIPTS = sorted(p.relative_to(ROOT).as_posix()
                 for p in [*ROOT.glob("launch/*.py"), *ROOT.glob("tools/**/*.py")])
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_CLASSES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig,
                  "study": StudyConfig}
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))


def mentioned(pattern: str) -> list[tuple[str, str]]:
    """(doc, path) for every path matching ``pattern`` in README.md and docs/*.md."""
    found = set()
    for doc in DOCS:
        for match in re.finditer(rf"(?<![\w./-]){pattern}", doc.read_text()):
            found.add((doc.relative_to(ROOT).as_posix(), match.group(0)))
    return sorted(found)


# ---- (a) every script answers --help ---------------------------------------------------------

# One interpreter runs every script as ``__main__`` in turn (fresh globals, its own sys.argv and
# sys.path[0]): one import of torch, DeepSpeed and Ray instead of one per script.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
from pathlib import Path
report, scripts, results = sys.argv[1], sys.argv[2:], {}
for script in scripts:
    out, err = io.StringIO(), io.StringIO()
    sys.argv, sys.path[0], code = [script, "--help"], str(Path(script).parent.resolve()), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
        except BaseException as error:
            print(f"{type(error).__name__}: {error}", file=err)
            code = 1
    results[script] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
Path(report).write_text(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, dict]:
    """``SCRIPT --help`` of every script: exit code, stdout and stderr."""
    report = tmp_path_factory.mktemp("help") / "help.json"
    subprocess.run([sys.executable, "-c", HELP_DRIVER, str(report), *SCRIPTS], cwd=ROOT,
                   check=True, timeout=300)
    return json.loads(report.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script, help_runs):
    result = help_runs[script]
    assert result["code"] == 0, f"{script} --help failed:\n{result['stderr'][-2000:]}"
    assert "usage" in result["stdout"].lower(), result["stdout"][:500]


def test_mlflow_ui_script():
    script = ROOT / "tools" / "mlflow_ui.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--port" in result.stdout


# ---- (b, c) what the docs name exists --------------------------------------------------------

@pytest.mark.parametrize("doc, path", mentioned(r"configs/[\w./-]+\.yaml"))
def test_mentioned_config_exists(doc, path):
    assert (ROOT / path).is_file(), f"{doc} mentions {path}, which does not exist"


@pytest.mark.parametrize("doc, path",
                         mentioned(r"(?:launch|tools|bench|cmunet)/[\w./-]+\.(?:py|sh)"))
def test_mentioned_script_exists(doc, path):
    assert (ROOT / path).is_file(), f"{doc} mentions {path}, which does not exist"


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_loads(path):
    folder = Path(path).parts[1]
    assert folder in CONFIG_CLASSES, f"{path}: no config class for configs/{folder}/"
    cfg = load_config(CONFIG_CLASSES[folder], ROOT / path)
    if isinstance(cfg, StudyConfig):
        check_study_parts(cfg)


def check_study_parts(cfg: StudyConfig) -> None:
    """The pre-training and search configs a study names load with the study's overrides."""
    arms = {repr(arm): arm for arm in (arm_of(cfg, cell.arm) for cell in cells(cfg))}
    for arm in arms.values():
        load_config(PretrainConfig, ROOT / cfg.pretrain_config.format(method=arm.method),
                    [*cfg.pretrain_overrides, *arm.pretrain])
        load_config(TuneConfig, ROOT / cfg.tune_config, [*cfg.tune_overrides, *arm.tune])


# ---- (d) the configuration reference is up to date -------------------------------------------

def test_configuration_reference_is_current():
    render = runpy.run_path(str(ROOT / "tools" / "config_reference.py"), run_name="docs_test")["render"]
    doc = ROOT / "docs" / "configuration.md"
    assert doc.read_text() == render(), \
        "docs/configuration.md is out of date: run python tools/config_reference.py --write"
