"""The documentation stays true: scripts answer --help, the configs and scripts the docs name exist,
every shipped config loads, and docs/configuration.md matches the config dataclasses."""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cmunet.config import flatten, load_config
from cmunet.data.sharding import ShardConfig
from cmunet.demo import DemoConfig
from cmunet.selection.config import SelectConfig
from cmunet.study_config import StudyConfig, arm_of, cells
from cmunet.training.finetune import FinetuneConfig
from cmunet.training.pretrain_config import PretrainConfig
from cmunet.training.tune_config import TuneConfig
from conftest import ROOT

SCRIPTS = sorted(p.relative_to(ROOT).as_posix()
                 for p in [*ROOT.glob("launch/*.py"), *ROOT.glob("tools/**/*.py")])
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_CLASSES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig,
                  "study": StudyConfig, "select": SelectConfig}
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


@dataclasses.dataclass
class _Commented:  # the layouts of comments the reference attributes (tools/config_reference.py)
    shards: str = ""  # folder or URL;
    # its test split is never read
    ratio: str = "79-1"  # PT-FT ratio
    # the pool used
    pool: str = "pretrain"
    seed: int = 0  # seed


def test_a_comment_continued_below_its_field_stays_with_it():
    comments = runpy.run_path(str(ROOT / "tools" / "config_reference.py"),
                              run_name="docs_test")["field_comments"](_Commented)
    assert comments == {"shards": "folder or URL; its test split is never read",
                        "ratio": "PT-FT ratio", "pool": "the pool used", "seed": "seed"}


# ---- (e) the key tables of finetune.md and tuning.md list every key ---------------------------

def config_keys(cls: type) -> set[str]:
    """The dotted keys of ``cls`` (sections' keys included, not the sections)."""
    return set(flatten(cls()))


def table_keys(doc: str) -> list[str]:
    """The keys (backticked, first column) of the table under the doc's "## Config keys"."""
    text = (ROOT / "docs" / doc).read_text().split("## Config keys", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    return [key for cell in rows for key in re.findall(r"`([\w.*]+)`", cell)]


def covers(listed: list[str], key: str) -> bool:
    return key in listed or any(k.endswith(".*") and key.startswith(k[:-1]) for k in listed)


@pytest.mark.parametrize("doc, cls, inherited", [("finetune.md", FinetuneConfig, None),
                                                  ("tuning.md", TuneConfig, FinetuneConfig)])
def test_the_key_table_lists_every_key(doc, cls, inherited):
    """Every key in the table (``X.*``: a whole section); tuning.md's table needs only the keys
    that fine-tuning (finetune.md's table) does not have."""
    listed, keys = table_keys(doc), config_keys(cls)
    missing = sorted(k for k in keys - (config_keys(inherited) if inherited else set())
                     if not covers(listed, k))
    assert not missing, f"docs/{doc}'s key table lacks {missing}"
    unknown = [k for k in listed if not any(covers([k], key) for key in keys)]
    assert not unknown, f"docs/{doc}'s key table names keys that do not exist: {unknown}"


# ---- (f) every command's --help shows its examples as written, and they are valid --------------

HELP_CONFIGS = {  # script -> config class of its key=value overrides, overrides it needs anyway
    "launch/pretrain.py": (PretrainConfig, []), "launch/finetune.py": (FinetuneConfig, []),
    "launch/evaluate.py": (FinetuneConfig, []), "launch/tune.py": (TuneConfig, []),
    "launch/study.py": (StudyConfig, []), "launch/demo.py": (DemoConfig, []),
    "tools/shard.py": (ShardConfig, ["images=IMAGES", "out=OUT"]), "launch/segment.py": (None, []),
    "launch/select_frames.py": (SelectConfig, []), "tools/select_frames.py": (SelectConfig, []),
}
COMMAND_LINE = re.compile(r"\s*(python|deepspeed|torchrun|make) ")
OVERRIDE = re.compile(r"^([a-z_][\w.]*)=(.+?)[),.]*$")


def example_overrides(line: str) -> tuple[str | None, list[str]]:
    """The ``--config`` file (None: not a shipped one) and the ``key=value`` tokens of an example
    command line (its ``# comment`` left out; ``key=value`` and ``...`` placeholders skipped)."""
    tokens = line.split(" #", 1)[0].split()
    config = tokens[tokens.index("--config") + 1] if "--config" in tokens else None
    tokens = [t[1:-1] if t.startswith("[") and t.endswith("]") else t for t in tokens]  # optional
    found = [f"{m[1]}={m[2]}" for m in map(OVERRIDE.match, tokens)
             if m and m[1] != "key" and not m[2].startswith("...")]
    return (config if config and (ROOT / config).is_file() else None), found


@pytest.mark.parametrize("script", sorted(HELP_CONFIGS))
def test_help_examples_are_shown_as_written_and_valid(script, help_runs):
    import importlib

    name = Path(script).stem
    name = {"select_frames": "select"}.get(name, name)  # not select.py: see test_package.py
    doc = importlib.import_module(f"cmunet.cli.{name}").__doc__
    shown = [line.rstrip() for line in help_runs[script]["stdout"].splitlines()]
    examples = [line.rstrip() for line in doc.splitlines() if COMMAND_LINE.match(line)]
    assert examples, f"{script}: no example command line in its docstring"
    for line in examples:  # one per line, as written: not reflowed into a paragraph
        assert line in shown, f"{script} --help does not show {line.strip()!r} as written"
    cls, needed = HELP_CONFIGS[script]
    if cls is None:  # flags only
        return
    lines = [line for line in shown if COMMAND_LINE.match(line)]
    epilog = [shown[i + 1] for i, line in enumerate(shown[:-1]) if line.endswith("for example:")]
    prose = [m for line in shown for m in re.findall(r"(?<![\w/-])[a-z_]+\.[\w.]+=[^\s,)]+", line)
             if not m.endswith("...")]
    checked = 0
    for line in [*lines, *epilog, " ".join(prose)]:
        config, overrides = example_overrides(line)
        if overrides:
            load_config(cls, config, [*needed, *overrides])  # raises on an unknown key or value
            checked += len(overrides)
    assert checked, f"{script} --help shows no key=value example"
