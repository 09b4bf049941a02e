"""--overwrite and out= the way an attacker (or a hurried user) would use them: user files inside an
earlier shard set, a copied manifest.json, a symbolic link or "." as --out, and a job's out= that
is, holds or lies inside its own input. Every refusal is one line and deletes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, load_tool
from cmunet.outdir import OutputError

shard = load_tool("shard")


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (and beside it) with its bytes: what must survive a refusal."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.parent.rglob("*"))}


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and all(name in err for name in names), err
    return err


def run_shard(tiny_folder: Path, out, *extra: str) -> int:
    return shard(["--images", str(tiny_folder / "images"), "--meta", str(tiny_folder / "meta.csv"),
                  "--out", str(out), "--size", "64", "--workers", "1", "--shard-size", "12",
                  *extra])


@pytest.fixture
def prev(tiny_shards, tmp_path) -> Path:
    """An earlier shard set of this tool (a copy of the tiny shards)."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "prev"))


# ---- tools/shard.py --overwrite ------------------------------------------------------------------

def test_overwrite_keeps_user_files_in_an_earlier_set(prev, tiny_folder, capsys):
    (prev / "notes.txt").write_text("mine")
    (prev / "analysis").mkdir()
    (prev / "analysis" / "results.csv").write_text("dice\n0.8\n")
    before = snapshot(prev)
    assert run_shard(tiny_folder, prev, "--overwrite") == 2
    one_line_error(capsys, "analysis/results.csv", "not written by this tool")
    assert snapshot(prev) == before
    (prev / "analysis" / "results.csv").unlink()  # an empty folder of the user's is foreign too
    assert run_shard(tiny_folder, prev, "--overwrite") == 2
    one_line_error(capsys, "analysis/")
    shutil.rmtree(prev / "analysis")
    assert run_shard(tiny_folder, prev, "--overwrite") == 2
    one_line_error(capsys, "notes.txt")
    (prev / "notes.txt").unlink()
    shutil.copy(prev / "shard-000000.tar", prev / "shard-000099.tar")  # not in its manifest
    assert run_shard(tiny_folder, prev, "--overwrite") == 2
    one_line_error(capsys, "shard-000099.tar")


def test_a_copied_manifest_does_not_make_a_user_folder_replaceable(tiny_shards, tiny_folder,
                                                                   tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "analysis").mkdir(parents=True)
    (mine / "analysis" / "results.csv").write_text("dice\n0.8\n")
    shutil.copy(tiny_shards / "manifest.json", mine / "manifest.json")
    before = snapshot(mine)
    assert run_shard(tiny_folder, mine, "--overwrite") == 2
    one_line_error(capsys, "analysis/results.csv")
    assert snapshot(mine) == before
    # a manifest listing the user's file as a shard does not make it the tool's
    manifest = json.loads((mine / "manifest.json").read_text())
    manifest["shards"].append({"name": "analysis/results.csv", "count": 1})
    (mine / "manifest.json").write_text(json.dumps(manifest))
    assert run_shard(tiny_folder, mine, "--overwrite") == 2
    one_line_error(capsys, "analysis/results.csv")
    assert (mine / "analysis" / "results.csv").read_text() == "dice\n0.8\n"


def test_a_symlink_or_dot_as_out_is_one_line_and_leaves_nothing(prev, tiny_folder, tmp_path,
                                                                 monkeypatch, capsys):
    link = tmp_path / "link"
    link.symlink_to(prev)
    before = snapshot(prev)
    assert run_shard(tiny_folder, link, "--overwrite") == 2
    one_line_error(capsys, "symbolic link")
    assert snapshot(prev) == before and link.is_symlink() and link.resolve() == prev
    monkeypatch.chdir(prev)
    for out in (".", prev, "./"):
        assert run_shard(tiny_folder, out, "--overwrite") == 2
        one_line_error(capsys, "working folder")
    assert snapshot(prev) == before  # no .NAME.tmp-* / .NAME.old-* beside or inside it


def test_overwrite_still_replaces_a_set_the_tool_wrote(prev, tiny_folder, capsys):
    assert run_shard(tiny_folder, prev, "--overwrite") == 0  # 12 shards of 2 -> 2 of 12
    manifest = json.loads((prev / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in prev.iterdir()) == [
        "config.yaml", "index.npz", "manifest.json", "shard-000000.tar", "shard-000001.tar",
        "splits.json"]
    assert sorted(p.name for p in prev.parent.iterdir()) == ["prev"]


# ---- jobs: out= against their inputs -------------------------------------------------------------

def fake_export(folder: Path) -> Path:
    """The files of a pre-training export (the check runs before anything is read)."""
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "export.json", "config.yaml", "manifest.json"):
        (folder / name).write_text(name)
    return folder


def test_finetune_out_is_never_its_init(tiny_shards, tmp_path, capsys):
    finetune = load_tool("finetune")
    export = fake_export(tmp_path / "PT" / "export")
    base = ["--config", str(ROOT / "configs/finetune/cpu.yaml"), f"data.shards={tiny_shards}",
            "tracking.enabled=false", "model_width=8", "train.epochs=1"]
    before = snapshot(tmp_path / "PT")
    for out, message in [(export, "is the input init"), (export / "ft", "lies inside the input"),
                         (tmp_path / "PT", "holds the input init"),
                         (tiny_shards, "is the input data.shards")]:
        assert finetune([*base, f"init={export}", f"out={out}"]) == 2
        one_line_error(capsys, message)
    assert finetune([*base, "init=none", f"out={export}"]) == 2  # another run's export
    one_line_error(capsys, "is a pre-training export")
    assert snapshot(tmp_path / "PT") == before


def test_pretrain_out_is_never_its_shards_and_keeps_user_files_in_its_export(tiny_shards,
                                                                              tmp_path, capsys):
    pretrain = load_tool("pretrain")
    base = ["--config", str(ROOT / "configs/pretrain/cmunet-cpu.yaml"), "tracking.enabled=false",
            f"data.shards={tiny_shards}"]
    before = snapshot(tiny_shards)
    for out, message in [(tiny_shards, "is the input"), (tiny_shards / "pt", "lies inside"),
                         (tiny_shards.parent, "holds the input data.shards")]:
        for dry in ([], ["--dry-run"]):
            assert pretrain([*base, f"out={out}", *dry]) == 2
            one_line_error(capsys, message)
    assert snapshot(tiny_shards) == before
    out = tmp_path / "PT"
    fake_export(out / "exports" / "epoch_0002")
    (out / "exports" / "epoch_0002" / "notes.txt").write_text("mine")
    assert pretrain([*base, f"out={out}"]) == 2  # before a step: the export would replace it
    one_line_error(capsys, "epoch_0002/notes.txt")
    assert (out / "exports" / "epoch_0002" / "notes.txt").read_text() == "mine"


def test_export_is_not_replaced_over_user_files(tmp_path):
    from cmunet.models.export import save_export

    folder = fake_export(tmp_path / "export")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        save_export(folder, {}, {}, "", None)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "export.json").exists()


def test_evaluate_segment_and_study_refuse_an_out_inside_their_inputs(tiny_shards, tmp_path,
                                                                       capsys):
    from cmunet.inference.segment import run_segment

    model = tmp_path / "FT"
    model.mkdir()
    (model / "best.safetensors").write_text("x")
    evaluate = load_tool("evaluate")
    assert evaluate(["--config", str(ROOT / "configs/finetune/cpu.yaml"), f"model={model}",
                     f"data.shards={tiny_shards}", f"out={model / 'eval'}"]) == 2
    one_line_error(capsys, "lies inside the input model")
    stub = SimpleNamespace(weights=model / "best.safetensors")
    with pytest.raises(OutputError, match="lies inside the input --input"):
        run_segment(stub, tiny_shards, tiny_shards / "seg", None)
    with pytest.raises(OutputError, match="is the input --model"):
        run_segment(stub, tmp_path / "none", model, None)
    study = load_tool("study")
    assert study(["--config", str(ROOT / "configs/study/tiny.yaml"),
                  f"data.shards={tiny_shards}", f"out={tiny_shards}"]) == 2
    one_line_error(capsys, "is the input data.shards")
    assert sorted(p.name for p in model.iterdir()) == ["best.safetensors"]
    assert not (tiny_shards / "seg").exists() and not (tiny_shards / "study.yaml").exists()
