"""tools/shard.py --part i/N on N machines, then --merge: the set one machine builds."""

from __future__ import annotations

import json
import shutil

import pytest

from cmunet.data.index import SampleIndex
from conftest import load_tool

shard = load_tool("shard")


def run(folder, out, *extra) -> int:
    return shard(["--images", str(folder / "images"), "--masks", str(folder / "masks"),
                  "--meta", str(folder / "meta.csv"), "--out", str(out), "--size", "32",
                  "--workers", "1", "--shard-size", "5", *extra])


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def inputs(tiny_folder, tmp_path_factory):
    """The tiny folder with one unreadable image (skipped with --skip-bad) and a test list."""
    root = tmp_path_factory.mktemp("parts")
    folder = root / "in"
    shutil.copytree(tiny_folder, folder)
    (folder / "images" / "img017.png").write_bytes(b"not a png")
    (root / "test.txt").write_text("img003.png\nimg020.png\n")
    return folder, ["--skip-bad", "--test-list", str(root / "test.txt")]


@pytest.mark.parametrize("parts", [2, 3])
def test_parts_merged_are_the_set_one_machine_builds(inputs, tmp_path, parts):
    folder, flags = inputs
    assert run(folder, tmp_path / "one", *flags) == 0
    for i in range(1, parts + 1):
        assert run(folder, tmp_path / f"part{i}", *flags, "--part", f"{i}/{parts}") == 0
    names = [str(tmp_path / f"part{i}") for i in range(parts, 0, -1)]  # any order
    assert shard(["--merge", *names, "--out", str(tmp_path / "merged")]) == 0
    one, merged = files(tmp_path / "one"), files(tmp_path / "merged")
    assert one.keys() == merged.keys() and len([n for n in one if n.endswith(".tar")]) == 5
    for name in one:
        if name not in ("manifest.json", "config.yaml"):
            assert merged[name] == one[name], name  # shards, index.npz, splits.json
    a, b = (json.loads(m["manifest.json"]) for m in (one, merged))
    for varying in ("created", "seconds", "merged_parts"):
        a.pop(varying, None), b.pop(varying)
    assert a == b and a["count"] == 23 and len(a["skipped"]) == 1
    assert one["config.yaml"].replace(b"/one", b"/merged") == merged["config.yaml"]


def test_merge_refuses_parts_that_do_not_make_a_set(inputs, tmp_path, capsys):
    folder, flags = inputs
    for i, extra in ((1, []), (2, []), (2, ["--seed", "7"])):
        out = tmp_path / f"part{i}" if not extra else tmp_path / "other2"
        assert run(folder, out, *flags, *extra, "--part", f"{i}/2") == 0
    for parts, problem in (([tmp_path / "part1"], "give every part 1/2 to 2/2 once"),
                           ([tmp_path / "part1", tmp_path / "other2"], "split_seed"),
                           ([tmp_path / "part1", folder], "manifest.json")):
        assert shard(["--merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="cmunet-shards-part/1"):  # no job reads a part
        SampleIndex.open(tmp_path / "part1")
