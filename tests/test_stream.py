"""Streaming shards: an epoch is a pass over uneven shards on 2 ranks x 2 workers, extra folders
in proportion, equal batch counts, exact mid-epoch resume."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cmunet.data.stream import InMemorySet, ShardStream, load_manifest, make_loader
from conftest import load_tool, write_tiny_images


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """60 tiny samples in shards of 7 (the last holds 4) and a 40-sample extra folder; the
    selected pool (every 4th key left out) makes the shards unevenly selected."""
    root = tmp_path_factory.mktemp("uneven")
    shard = load_tool("shard")
    folders = []
    for name, count, seed in (("main", 60, 1), ("extra", 40, 2)):
        images = write_tiny_images(root / f"{name}-raw", count=count, size=32, seed=seed)
        if name == "extra":  # other keys than the main folder's
            for sub in ("images", "masks"):
                for path in (images / sub).iterdir():
                    path.rename(path.with_name("x" + path.name))
            meta = (images / "meta.csv").read_text().replace("img", "ximg")
            (images / "meta.csv").write_text(meta)
        out = root / name
        assert shard(["--images", str(images / "images"), "--meta", str(images / "meta.csv"),
                      "--out", str(out), "--size", "32", "--workers", "1",
                      "--shard-size", "7"]) == 0
        folders.append(out)
    keys = sorted(s["key"] for s in load_manifest(folders[0])["samples"])
    pool = [k for i, k in enumerate(keys) if i % 4 != 3]  # 45 of 60
    return folders[0], folders[1], pool


def epoch_batches(main, keys, rank, world=2, workers=2, batch=4, **kw):
    stream = ShardStream(main, keys, batch, rank=rank, world_size=world, seed=3,
                         shuffle_buffer=kw.pop("shuffle_buffer", 8), with_source=True, **kw)
    stream.epochs = kw.get("epochs", stream.epoch + 1)
    return list(make_loader(stream, num_workers=workers))


def test_an_epoch_is_a_pass_over_uneven_shards(uneven):
    main, _, pool = uneven
    per_rank = [epoch_batches(main, pool, rank) for rank in (0, 1)]
    assert [len(b) for b in per_rank] == [6, 6]  # ceil(45 / (2 x 4)) on every rank
    seen = Counter(k for batches in per_rank for b in batches for k in b["key"])
    assert set(seen) == set(pool)  # every selected sample, nothing else
    assert sum(seen.values()) == 48 and sum(c - 1 for c in seen.values()) == 3  # 3 wrapped
    assert max(seen.values()) == 2


def test_epochs_differ_and_repeat_with_the_seed(uneven):
    main, _, pool = uneven

    def order(epoch):
        stream = ShardStream(main, pool, 4, rank=0, world_size=1, seed=3, shuffle_buffer=8)
        stream.epoch, stream.epochs = epoch, epoch + 1
        return [k for b in make_loader(stream, num_workers=2) for k in b["key"]]
    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(set(order(0))) == sorted(set(order(1))) == sorted(pool)


def test_extra_folders_join_in_proportion_to_their_samples(uneven):
    main, extra, pool = uneven
    for weight, share in ((None, 40 / 85), ([0.5], 20 / 65)):
        sources = Counter()
        for rank in (0, 1):
            for b in epoch_batches(main, pool, rank, extra=[(extra, None)],
                                   extra_weights=weight):
                sources.update(b["source"])
        assert abs(sources[1] / sum(sources.values()) - share) <= 0.05
        assert sum(sources.values()) == 2 * 4 * -(-(45 + round(40 * (weight or [1])[0])) // 8)


def test_fractional_weight_draws_another_subset_every_epoch(uneven):
    main, extra, pool = uneven

    def extra_keys(epoch):
        stream = ShardStream(main, pool, 4, extra=[(extra, None)], extra_weights=[0.25],
                             rank=0, world_size=1, seed=0)
        stream.epoch, stream.epochs = epoch, epoch + 1
        return {k for b in make_loader(stream, 0) for k in b["key"] if k.startswith("x")}
    assert len(extra_keys(0)) == len(extra_keys(1)) == 10 and extra_keys(0) != extra_keys(1)


def test_ranks_get_equal_batch_counts_and_resume_delivers_the_rest(uneven):
    main, _, pool = uneven

    def run(skip, epochs=3, workers=2):
        stream = ShardStream(main, pool, 3, rank=1, world_size=2, seed=5, shuffle_buffer=5)
        stream.epoch, stream.skip_batches, stream.epochs = 1, skip, epochs
        return [b["key"] for b in make_loader(stream, num_workers=workers)]
    full = run(0)
    assert len(full) == 2 * 8  # epochs 1 and 2: ceil(45 / 6) batches each
    assert run(5) == full[5:]  # resumed mid-epoch: exactly the remaining batches, same order
    assert sorted(k for b in run(0, epochs=2) for k in b) == sorted(k for b in full[:8] for k in b)


def test_shorter_epochs_walk_through_the_passes(uneven):
    main, _, pool = uneven
    stream = ShardStream(main, pool, 5, rank=0, world_size=1, seed=2, batches_per_epoch=3)
    stream.epochs = 3  # 3 epochs x 15 samples = one pass of 45
    keys = [k for b in make_loader(stream, num_workers=2) for k in b["key"]]
    assert sorted(keys) == sorted(pool)


def test_missing_image_is_named(tmp_path, tiny_shards):
    import shutil
    import tarfile

    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    shard = bad / load_manifest(bad)["samples"][0]["shard"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if not member.name.endswith("image.png"):
                tar.addfile(member, io.BytesIO(data))
    stream = ShardStream(bad, None, 2, rank=0, world_size=1, shuffle_buffer=1)
    stream.epochs = 1
    with pytest.raises(ValueError, match=r"shard-000000.tar: sample img00\d has no image.png"):
        list(make_loader(stream, 0))


def test_zscore_uses_manifest_statistics(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    data = InMemorySet(tiny_shards, ["img000"])
    item = data[0]
    assert item["image"].shape == (1, 64, 64) and item["mask"].dtype == np.uint8
    raw = item["image"] * manifest["std"] + manifest["mean"]
    assert raw.min() >= -0.01 and raw.max() <= 255.01 and np.allclose(raw, np.round(raw), atol=1e-3)


def test_transform_is_seeded_per_sample(tiny_shards):
    def flip(image, mask, rng):
        return (image[:, ::-1], mask[:, ::-1]) if rng.random() < 0.5 else (image, mask)
    a = InMemorySet(tiny_shards, ["img000", "img001", "img002"], transform=flip, seed=1)
    b = InMemorySet(tiny_shards, ["img000", "img001", "img002"], transform=flip, seed=1)
    for i in range(3):
        assert torch.equal(torch.from_numpy(a[i]["image"]), torch.from_numpy(b[i]["image"]))


def test_unknown_keys_are_refused(tiny_shards):
    with pytest.raises(ValueError, match="not in"):
        ShardStream(tiny_shards, ["nope"], batch_size=2)


def test_extra_sources_are_mixed_in_with_their_own_statistics(tiny_shards, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["mean"] += 100  # the copy is z-scored with its own (here shifted) statistics
    (other / "manifest.json").write_text(json.dumps(manifest))
    stream = ShardStream(tiny_shards, ["img000"], batch_size=4, extra=[(other, None)], seed=0,
                         shuffle_buffer=1, rank=0, world_size=1)
    batch = next(iter(stream))
    first = InMemorySet(tiny_shards, ["img000"])[0]["image"]
    shift = 100 / manifest["std"]
    for key, image in zip(batch["key"], batch["image"].numpy()):
        if key == "img000" and np.allclose(image, first, atol=1e-5):
            continue  # from the main folder
        reference = InMemorySet(tiny_shards, [key])[0]["image"]
        assert np.allclose(image, reference - shift, atol=1e-4)  # from the extra folder
