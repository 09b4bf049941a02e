"""The compact sample index (cmunet/data/index.py): a small manifest, a memory-mapped index.npz,
pools as integer arrays equal to the old key lists, sets of the old format still load, and
tools/shard.py --upgrade."""

from __future__ import annotations

import json
import mmap
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmunet.data import location
from cmunet.data.index import INDEX, OLD_FORMAT, SampleIndex, _mapped
from cmunet.data.overlap import find_test_images
from cmunet.data.splits import POOLS, load_splits, pool_ids, pool_keys
from cmunet.data.stream import InMemorySet, ShardStream, load_manifest
from cmunet.training.finetune import patients_of
from conftest import ROOT, load_tool

shard = load_tool("shard")


def mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a memory-mapped file."""
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(getattr(array, "obj", array), mmap.mmap)  # a memoryview of the mapping


def oracle(records: list[dict], splits: dict) -> dict[tuple[str, str | None], list[str]]:
    """Every pool's keys as format 1 listed them: the samples of its patients (a fine-tuning
    pool only the labelled ones, the test split less the excluded keys), sorted."""
    excluded = set(splits["excluded"]["keys"])

    def keys(patients, labelled_only=False, drop=()):
        return sorted(r["key"] for r in records if r["patient"] in set(patients)
                      and (r["labelled"] or not labelled_only) and r["key"] not in drop)
    pools = {("test", None): keys(splits["test"]["patients"], drop=excluded),
             ("train", None): keys(splits["train"]["patients"])}
    pools["all", None] = sorted(pools["test", None] + pools["train", None])
    for ratio, parts in splits["ratios"].items():
        pools["pretrain", ratio] = keys(parts["pretrain"]["patients"])
        pools["finetune", ratio] = keys(parts["finetune"]["patients"], labelled_only=True)
    return pools


def write_old_format(new: Path, old: Path) -> Path:
    """A copy of the set ``new`` in the layout of format 1: every sample in manifest.json (no
    index.npz), every pool's keys in splits.json."""
    shutil.copytree(new, old, ignore=shutil.ignore_patterns(INDEX))
    manifest = dict(load_manifest(new))
    records = SampleIndex.open(new).records()
    manifest.pop("index")
    manifest.update(format=OLD_FORMAT, samples=[{**r, "dtype": manifest["dtype"]}
                                                for r in records],
                    shards=[{"name": s["name"], "count": s["count"]} for s in manifest["shards"]])
    (old / "manifest.json").write_text(json.dumps(manifest, indent=1))
    splits = json.loads((new / "splits.json").read_text())
    pools = oracle(records, splits)
    splits.pop("format")
    for pool in ("test", "train"):
        splits[pool]["keys"] = pools[pool, None]
    for ratio, parts in splits["ratios"].items():
        for pool in parts:
            parts[pool]["keys"] = pools[pool, ratio]
    (old / "splits.json").write_text(json.dumps(splits, indent=1))
    return old


@pytest.fixture(scope="module")
def listed(tiny_folder, tmp_path_factory) -> Path:
    """The tiny set with an official test list: 2 images of patients p00 and p01 (4 excluded)."""
    root = tmp_path_factory.mktemp("listed")
    (root / "test.txt").write_text("img000.png\nimg004.png\n")
    assert shard(["--images", str(tiny_folder / "images"), "--masks", str(tiny_folder / "masks"),
                  "--meta", str(tiny_folder / "meta.csv"), "--out", str(root / "set"),
                  "--size", "64", "--workers", "1", "--shard-size", "5",
                  "--test-list", str(root / "test.txt")]) == 0
    return root / "set"


def test_manifest_is_small_and_the_index_is_mapped(tiny_shards):
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    assert "samples" not in raw and raw["index"]["name"] == INDEX
    assert len(json.dumps({k: v for k, v in raw.items() if k != "shards"})) < 2000
    assert (tiny_shards / INDEX).stat().st_size / raw["count"] < 400  # zip headers included
    index = SampleIndex.open(tiny_shards)
    assert len(index) == 24 and all(mapped(index[name]) for name in ("key", "patient", "sha256"))
    assert len(pickle.dumps(index)) < 500  # a loader worker maps the file again
    by_key = {r["key"]: r for r in index.records()}
    for number, name in enumerate(index.shard_names()):  # every sample of every tar, in order
        samples = list(location.tar_samples(str(tiny_shards / name)))
        ids = np.arange(*index["shard_offsets"][number:number + 2])
        assert [s["__key__"] for s in samples] == index.keys_of(ids)
        for sample in samples:
            info = json.loads(sample["sample.json"])
            record = by_key[sample["__key__"]]
            assert (record["patient"], record["spacing"], record["shard"]) == (
                info["patient"], info["spacing"], name)
            assert record["labelled"] == ("mask.png" in sample)


def test_records_round_trip_with_optional_fields(tiny_shards, tmp_path):
    index = SampleIndex.open(tiny_shards)
    records = index.records()
    records[0].update(key="é-angio", loop="loop-a", frame=7, spacing=None, sha256=None)
    records[1].update(loop="loop-a", frame=8)
    again = SampleIndex.from_records(records, index.shard_names())
    digest = again.save(tmp_path / INDEX)
    reread = _mapped(str(tmp_path / INDEX), "test")
    assert reread.records() == again.records()
    assert reread.records()[0]["key"] == "é-angio" and reread.records()[2] == records[2]
    assert "frame" not in reread.records()[2] and reread.records()[1]["loop"] == "loop-a"
    assert reread.records()[0]["spacing"] is None and reread.records()[0]["sha256"] is None
    assert len(digest) == 64 and not list(tmp_path.glob(".*tmp*"))  # renamed into place
    ids, missing = reread.find(["img005", "é-angio", "nope"])
    assert ids.tolist() == [5, 0] and missing == ["nope"]


def test_pools_are_integer_arrays_equal_to_the_old_key_lists(tiny_shards, listed):
    for folder in (tiny_shards, listed):
        splits = load_splits(folder / "splits.json")
        assert not any("keys" in json.dumps(part) for part in splits["ratios"].values())
        index = splits.index
        for (pool, ratio), keys in oracle(index.records(), splits).items():
            ids = pool_ids(splits, pool, ratio)
            assert ids.dtype.kind == "i" and np.all(np.diff(ids) > 0)
            assert sorted(index.keys_of(ids)) == keys == pool_keys(splits, pool, ratio)
            if pool != "all":
                part = splits[pool] if ratio is None else splits["ratios"][ratio][pool]
                assert part["keys"] == keys  # worked out when asked for
    splits = load_splits(listed / "splits.json")
    assert pool_keys(splits, "test") == ["img000", "img004"]
    assert splits["excluded"]["keys"] == ["img001", "img002", "img003", "img005"]
    with pytest.raises(ValueError, match="unknown pool"):
        pool_ids(splits, "everything")


def stream_keys(folder, keys) -> list[list[str]]:
    stream = ShardStream(folder, keys, 3, rank=1, world_size=2, seed=4, shuffle_buffer=4)
    stream.epoch, stream.skip_batches, stream.epochs = 1, 1, 2
    return [batch["key"] for batch in stream]


def test_a_set_of_the_old_format_still_loads(tiny_shards, tmp_path):
    old = write_old_format(tiny_shards, tmp_path / "old")
    assert not (old / INDEX).exists()
    assert "samples" in json.loads((old / "manifest.json").read_text())
    new_splits, old_splits = (load_splits(f / "splits.json") for f in (tiny_shards, old))
    for pool in POOLS:
        ratio = "60-20"
        assert pool_keys(old_splits, pool, ratio) == pool_keys(new_splits, pool, ratio)
        assert np.array_equal(pool_ids(old_splits, pool, ratio), pool_ids(new_splits, pool, ratio))
    keys = pool_keys(new_splits, "train")
    assert stream_keys(old, keys) == stream_keys(tiny_shards, keys)
    assert stream_keys(tiny_shards, pool_ids(new_splits, "train")) == stream_keys(tiny_shards, keys)
    a, b = InMemorySet(old, keys[:3]), InMemorySet(tiny_shards, keys[:3])
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a.items, b.items))
    assert a.spacing == b.spacing == [[0.3, 0.3]] * 3
    assert patients_of(old) == patients_of(tiny_shards)
    assert load_manifest(tiny_shards)["samples"] == load_manifest(old)["samples"]  # built lazily
    test = pool_keys(new_splits, "test")
    assert sorted(t for _, t in find_test_images(old, tiny_shards)) == test  # across formats
    assert sorted(k for k, _ in find_test_images(tiny_shards, old)) == test


def test_upgrade_rewrites_an_old_set_in_place(tiny_shards, tmp_path, capsys):
    old = write_old_format(tiny_shards, tmp_path / "old")
    tars = {p.name: p.read_bytes() for p in old.glob("*.tar")}
    assert shard(["--upgrade", str(old)]) == 0
    raw = json.loads((old / "manifest.json").read_text())
    assert raw["format"] == "cmunet-shards/2" and "samples" not in raw
    assert raw["index"]["sha256"] == json.loads((tiny_shards / "manifest.json").read_text())[
        "index"]["sha256"]  # the same bytes as the index a fresh build writes
    assert "keys" not in json.dumps(json.loads((old / "splits.json").read_text())["ratios"])
    assert {p.name: p.read_bytes() for p in old.glob("*.tar")} == tars
    new_splits, splits = (load_splits(f / "splits.json") for f in (tiny_shards, old))
    assert all(pool_keys(splits, p, "79-1") == pool_keys(new_splits, p, "79-1") for p in POOLS)
    assert stream_keys(old, None) == stream_keys(tiny_shards, None)
    assert shard(["--upgrade", str(old)]) == 0 and "already" in capsys.readouterr().err


def test_upgrade_refuses_splits_that_are_not_patient_lists(tiny_shards, tmp_path, capsys):
    old = write_old_format(tiny_shards, tmp_path / "old")
    splits = json.loads((old / "splits.json").read_text())
    splits["train"]["keys"].remove(splits["train"]["keys"][0])  # one frame dropped by hand
    (old / "splits.json").write_text(json.dumps(splits))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert shard(["--upgrade", str(old)]) == 2
    assert "pool train" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # nothing written


def test_a_damaged_index_is_one_line_naming_it(tiny_shards, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(tiny_shards, cut)
    (cut / INDEX).write_bytes((cut / INDEX).read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{cut / INDEX}: not an index file") as err:
        SampleIndex.open(cut)
    assert "\n" not in str(err.value)
    short = tmp_path / "short"
    shutil.copytree(tiny_shards, short)
    manifest = json.loads((short / "manifest.json").read_text())
    (short / "manifest.json").write_text(json.dumps({**manifest, "count": 25}))
    with pytest.raises(ValueError, match="holds 24 samples but the manifest 25"):
        SampleIndex.open(short)


def test_an_index_at_a_url_is_checked_then_cached(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("CMUNET_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    with (bad / INDEX).open("ab") as f:
        f.write(b"x")
    with pytest.raises(location.ReadError, match="differs from the SHA-256"):
        SampleIndex.open(f"file://{bad}")
    assert not list((tmp_path / "cache").rglob("*.npz"))
    index = SampleIndex.open(f"file://{tiny_shards}")
    cached, = (tmp_path / "cache" / "index").glob("*.npz")
    assert cached.name == f"{load_manifest(tiny_shards)['index']['sha256']}.npz"
    assert mapped(index["key"]) and index.records() == SampleIndex.open(tiny_shards).records()


def test_epoch_order_is_that_of_the_format_1_code(tmp_path, monkeypatch):
    """The same generated set in both formats: this version's stream orders every epoch (each
    rank's and worker's pieces, a resumed epoch included) as the code of bench/scale.py's BEFORE
    commit did from the JSON manifest."""
    sys.path.insert(0, str(ROOT / "bench"))
    import scale

    try:
        old_splits, old_stream = scale.before_modules()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history with the BEFORE commit")
    from cmunet.data import stream as new_stream

    monkeypatch.setattr(scale, "SHARD", 100)
    c = scale.columns_of(2300)
    splits = scale.split_patients(c)
    scale.write_set(tmp_path / "new", c, splits)
    scale.write_old_set(tmp_path / "old", c, splits)
    new_pool = pool_ids(load_splits(tmp_path / "new" / "splits.json"), "pretrain", "79-1")
    old_pool = old_splits.pool_keys(old_splits.load_splits(tmp_path / "old" / "splits.json"),
                                    "pretrain", "79-1")
    for rank in range(2):  # rank 1 with the set again as an extra folder, half of it an epoch
        extra = {"extra_weights": [0.5]} if rank else {}
        new = ShardStream(tmp_path / "new", new_pool, scale.BATCH, rank=rank, world_size=2,
                          seed=rank, extra=[(tmp_path / "new", None)] if rank else (), **extra)
        old = old_stream.ShardStream(tmp_path / "old", old_pool, scale.BATCH, rank=rank,
                                     world_size=2, seed=rank,
                                     extra=[(tmp_path / "old", None)] if rank else (), **extra)
        for epoch, slot, skip in ((0, 0, 0), (1, 1, 0), (3, 0, 5), (3, 1, 5)):
            a, skip_a = scale.worker_pieces(new_stream._owned, new, epoch, slot, skip)
            b, skip_b = scale.worker_pieces(old_stream._owned, old, epoch, slot, skip)
            assert [(i, Path(new.sources[i].url(shard)).name) for i, shard, _ in a] == [
                (i, Path(url).name) for i, url, _ in b]
            assert [new.sources[i].index.keys_of(ids) for i, _, ids in a] == [
                list(k) for *_, k in b]
            assert skip_a == skip_b and len(a) > 1
