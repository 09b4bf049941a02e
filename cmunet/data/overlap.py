"""Refuse pre-training folders that hold test images.

Extra pre-training folders (``data.extra_shards``, a study's ``data.pretrain_shards``) come from
elsewhere: an archive, synthetic angiograms, another export of the same hospital's images. If one
holds an image of the labelled folder's test split, pre-training has seen the test set. Every
set's index records each sample's source-file SHA-256 (``tools/shard.py``), so such samples are
found by hash and the job stops before it starts. A copy re-encoded to another file format (or a
different frame selection of a DICOM run) has another hash and is not caught: shard archives
from the original files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cmunet.data import location
from cmunet.data.index import SampleIndex
from cmunet.data.splits import load_splits, pool_ids


def split_test_hashes(shards: str | Path) -> dict[str, str]:
    """``{source SHA-256: test key}`` of the test split of ``shards``."""
    splits = load_splits(location.join(shards, "splits.json"))
    ids = pool_ids(splits, "test")
    hashes = splits.index["sha256"][ids]
    return {bytes(h).hex(): key for h, key in zip(hashes, splits.index.keys_of(ids)) if h.any()}


def find_test_images(shards: str | Path, folder: str | Path) -> list[tuple[str, str]]:
    """``(key in folder, test key of shards)`` for every sample of ``folder`` whose source hash
    is that of a test sample of ``shards``."""
    test = split_test_hashes(shards)
    index = SampleIndex.open(folder)
    ids = with_hashes(index, np.array([bytes.fromhex(h) for h in test], dtype="S32"))
    return [(key, test[bytes(index["sha256"][i]).hex()])
            for i, key in zip(ids.tolist(), index.keys_of(ids))]


def with_hashes(index: SampleIndex, wanted: np.ndarray) -> np.ndarray:
    """The ids of the samples of ``index`` whose source SHA-256 is one of ``wanted`` (S32)."""
    if not len(wanted):
        return np.zeros(0, np.int64)
    hashes = np.ascontiguousarray(index["sha256"]).view("S32").reshape(-1)
    return np.flatnonzero(np.isin(hashes, wanted))


def refuse_test_overlap(shards: str | Path, folders: Sequence[str | Path]) -> None:
    """Raise ValueError naming the first of ``folders`` that holds test images of ``shards``."""
    for folder in folders:
        found = find_test_images(shards, folder)
        if found:
            examples = ", ".join(f"{key} (= test {test})" for key, test in found[:3])
            raise ValueError(
                f"{folder} holds {len(found)} test image(s) of {shards} (same source-file "
                f"SHA-256), e.g. {examples}: pre-training on it would see the test split; "
                "shard that folder again without these images, or leave it out")
