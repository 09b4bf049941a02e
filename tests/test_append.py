"""tools/shard.py --append: new shards only, every existing patient keeps its split, new patients
placed by their name alone, atomic under SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cmunet.data.index import SampleIndex, load_manifest
from cmunet.data.sharding import foreign_in_set
from cmunet.data.splits import POOLS, load_splits, place_new_patients, pool_ids, pool_keys
from cmunet.data.stream import ShardStream
from cmunet.outdir import names_in
from conftest import ROOT, load_tool, write_tiny_images

shard = load_tool("shard")
RATIO = "50-30"


def images(folder: Path, count: int, seed: int, prefix: str, patients: list[str]) -> Path:
    """``count`` tiny images named ``<prefix>NNN`` of ``patients`` (in turn)."""
    write_tiny_images(folder, count=count, size=32, seed=seed)
    for sub in ("images", "masks"):
        for path in sorted((folder / sub).iterdir()):
            path.rename(path.with_name(path.name.replace("img", prefix)))
    rows = ["image,patient"] + [f"{prefix}{i:03d}.png,{patients[i % len(patients)]}"
                                for i in range(count)]
    (folder / "meta.csv").write_text("\n".join(rows) + "\n")
    return folder


def build(folder: Path, out: Path) -> Path:
    assert shard(["--images", str(folder / "images"), "--masks", str(folder / "masks"),
                  "--meta", str(folder / "meta.csv"), "--out", str(out), "--size", "32",
                  "--workers", "1", "--shard-size", "5"]) == 0
    return out


def append(folder: Path, out: Path, *extra: str) -> int:
    return shard(["--append", str(out), "--images", str(folder / "images"), "--masks",
                  str(folder / "masks"), "--meta", str(folder / "meta.csv"), "--workers", "1",
                  *extra])


def placement(shards: Path) -> dict[str, tuple]:
    """Every patient's pools: (test?, then per ratio finetune? / pretrain?)."""
    splits = load_splits(shards / "splits.json")
    index = splits.index
    member = {}
    for pool, ratio in [("test", None), ("train", None)] + [
            (p, r) for r in splits["ratios"] for p in ("pretrain", "finetune")]:
        ids = pool_ids(splits, pool, ratio)
        member[pool, ratio] = set(index.patient_names(ids)) if len(ids) else set()
    return {p: tuple(p in members for members in member.values())
            for p in index.patient_names(np.arange(len(index)))}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """24 images of 8 patients (p0..p7) in shards of 5."""
    root = tmp_path_factory.mktemp("append")
    return build(images(root / "raw", 24, 0, "img", [f"p{i}" for i in range(8)]), root / "base")


@pytest.fixture(scope="module")
def more(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders to add: A (returning patients p0 and p7, new q0..q3), B (new q4..q9)."""
    root = tmp_path_factory.mktemp("more")
    return (images(root / "a", 12, 5, "new", ["p0", "p7", "q0", "q1", "q2", "q3"]),
            images(root / "b", 12, 6, "sup", [f"q{i}" for i in range(4, 10)]))


def test_append_adds_shards_and_keeps_every_split(base, more, tmp_path):
    grown = tmp_path / "grown"
    shutil.copytree(base, grown)
    before, tars = placement(base), {p.name: p.read_bytes() for p in base.glob("*.tar")}
    assert append(more[0], grown) == 0
    manifest = load_manifest(grown)
    assert manifest["count"] == 36 and manifest["patients"] == 12 and manifest["generation"] == 1
    assert manifest["index"]["name"] == "index-000001.npz" and not (grown / "index.npz").exists()
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(8)]
    assert all((grown / name).read_bytes() == data for name, data in tars.items())  # untouched
    after = placement(grown)
    assert {p: after[p] for p in before} == before  # every patient keeps its split
    splits = load_splits(grown / "splits.json")
    for pool in POOLS:  # the returning patients' new frames joined their pools
        keys = set(pool_keys(splits, pool, RATIO))
        old = set(pool_keys(load_splits(base / "splits.json"), pool, RATIO))
        assert keys & old == old and keys - old <= {f"new{i:03d}" for i in range(12)}
    for patient in ("p0", "p7"):
        new_keys = [f"new{i:03d}" for i in range(12) if i % 6 == ("p0", "p7").index(patient)]
        assert all(k in pool_keys(splits, "test") for k in new_keys) == before[patient][0]
    stream = ShardStream(grown, pool_ids(splits, "train"), 4, rank=0, world_size=1, epochs=1)
    assert sorted({k for b in stream for k in b["key"]}) == pool_keys(splits, "train")
    assert foreign_in_set(names_in(grown), (grown / "manifest.json").read_text) is None
    assert not list(tmp_path.glob(".grown.tmp-*"))


def test_new_patients_are_placed_by_their_name_alone(base, more, tmp_path):
    one, two = tmp_path / "ab", tmp_path / "ba"
    for out, order in ((one, more), (two, more[::-1])):
        shutil.copytree(base, out)
        for folder in order:
            assert append(folder, out) == 0
    assert placement(one) == placement(two)  # whatever came first
    splits = load_splits(one / "splits.json")
    new = [f"q{i}" for i in range(10)]
    rule = place_new_patients(splits, new, [True] * len(new))
    assert rule["test", None] and rule["finetune", RATIO]  # both kinds of placement happen
    placed = placement(one)
    for patient in new:
        assert placed[patient][0] == (patient in rule["test", None])
        for ratio in splits["ratios"]:
            assert (patient in rule["finetune", ratio]) == (patient in splits["ratios"][ratio][
                "finetune"]["patients"])
    # splits.json lists them as the rule placed them: the same pools when it does not
    listed = json.loads((one / "splits.json").read_text())
    unlisted = json.loads(json.dumps(listed))
    for part in [unlisted["test"], unlisted["train"]] + [
            p for parts in unlisted["ratios"].values() for p in parts.values()]:
        part["patients"] = [p for p in part["patients"] if not p.startswith("q")]
    (one / "splits.json").write_text(json.dumps(unlisted))
    assert placement(one) == placed


def test_an_append_of_keys_already_there_changes_nothing(base, more, tmp_path, capsys):
    grown = tmp_path / "grown"
    shutil.copytree(base, grown)
    assert append(more[0], grown) == 0
    snapshot = {p.name: p.read_bytes() for p in grown.iterdir()}
    assert append(more[0], grown) == 2
    assert "already in" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in grown.iterdir()} == snapshot


def test_an_append_killed_midway_leaves_the_set_as_it_was(base, tmp_path):
    big = images(tmp_path / "big", 150, 7, "big", [f"r{i}" for i in range(30)])
    grown = tmp_path / "grown"
    shutil.copytree(base, grown)
    snapshot = {p.name: p.read_bytes() for p in grown.iterdir()}
    command = [sys.executable, str(ROOT / "tools" / "shard.py"), "--append", str(grown),
               "--images", str(big / "images"), "--meta", str(big / "meta.csv"),
               "--workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".grown.tmp-*/shard-*.tar")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    assert list(tmp_path.glob(".grown.tmp-*/shard-*.tar")), "the append never wrote a shard"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in grown.iterdir()} == snapshot  # as it was
    assert len(SampleIndex.open(grown)) == 24
    assert append(big, grown) == 0  # the next append clears what was left and grows the set
    assert load_manifest(grown)["count"] == 24 + 150 and not list(tmp_path.glob(".grown.tmp-*"))


def test_an_append_that_dies_at_its_commit_leaves_the_set_as_it_was(base, more, tmp_path,
                                                                    monkeypatch):
    """Killed after its shards and index are in the folder, before the manifest is replaced:
    the set loads as before; the next append removes what was left."""
    from cmunet.data import append as module

    grown = tmp_path / "grown"
    shutil.copytree(base, grown)
    snapshot = {p.name: p.read_bytes() for p in grown.iterdir()}

    def dies(path, document):
        raise SystemExit(137)
    monkeypatch.setattr(module, "write_json", dies)
    with pytest.raises(SystemExit):
        module.append_images(grown, str(more[0] / "images"), meta=str(more[0] / "meta.csv"),
                             workers=1)
    left = {p.name for p in grown.iterdir()} - set(snapshot)
    assert left and all(n.startswith(("shard-", "index-")) for n in left)
    assert all((grown / name).read_bytes() == data for name, data in snapshot.items())
    assert placement(grown) == placement(base) and len(SampleIndex.open(grown)) == 24
    monkeypatch.undo()
    assert append(more[1], grown) == 0
    manifest = load_manifest(grown)
    assert manifest["count"] == 36 and {p.name for p in grown.iterdir()} == {
        "config.yaml", "manifest.json", "splits.json", "index-000001.npz",
        *(s["name"] for s in manifest["shards"])}
