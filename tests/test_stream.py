"""Streaming shards: disjoint reads without resampling, equal batch counts with it, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet, ShardStream, make_loader


def keys_read(tiny_shards, rank, **kw):
    stream = ShardStream(tiny_shards, None, batch_size=2, resampled=False, rank=rank,
                         world_size=2, **kw)
    return [k for batch in make_loader(stream, num_workers=2) for k in batch["key"]]


def test_two_ranks_two_workers_read_disjoint_samples(tiny_shards):
    rank0, rank1 = keys_read(tiny_shards, 0), keys_read(tiny_shards, 1)
    assert len(rank0) == len(set(rank0)) and len(rank1) == len(set(rank1))
    assert not set(rank0) & set(rank1)
    assert len(rank0) + len(rank1) == 24  # every sample once


def test_resampled_ranks_yield_identical_batch_counts(tiny_shards):
    splits = load_splits(tiny_shards / "splits.json")
    keys = pool_keys(splits, "pretrain", "79-1")
    counts = []
    for rank in (0, 1):
        stream = ShardStream(tiny_shards, keys, batch_size=3, rank=rank, world_size=2, seed=5)
        loader = make_loader(stream, num_workers=2, steps_per_epoch=7)
        batches = list(loader)
        assert all(set(b["key"]) <= set(keys) for b in batches)  # the pool only
        counts.append(len(batches))
    assert counts == [7, 7]


def test_resume_skips_exactly_the_delivered_batches(tiny_shards):
    def epoch(skip):
        stream = ShardStream(tiny_shards, None, batch_size=2, seed=3, rank=0, world_size=1)
        stream.epoch, stream.skip_batches = 2, skip
        return [b["key"] for b in make_loader(stream, num_workers=2, steps_per_epoch=6 - skip)]
    full, resumed = epoch(0), epoch(4)
    assert resumed == full[4:]


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
                         shuffle_buffer=1)
    batch = next(iter(stream))
    first = InMemorySet(tiny_shards, ["img000"])[0]["image"]
    shift = 100 / manifest["std"]
    for key, image in zip(batch["key"], batch["image"].numpy()):
        if key == "img000" and np.allclose(image, first, atol=1e-5):
            continue  # from the main folder
        reference = InMemorySet(tiny_shards, [key])[0]["image"]
        assert np.allclose(image, reference - shift, atol=1e-4)  # from the extra folder
