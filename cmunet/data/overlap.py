"""Refuse pre-training folders that hold test images.

Extra pre-training folders (``data.extra_shards``, a study's ``data.pretrain_shards``) come from
elsewhere: an archive, synthetic angiograms, another export of the same hospital's images. If one
holds an image of the labelled folder's test split, pre-training has seen the test set. Every
manifest records each sample's source-file SHA-256 (``tools/shard.py``), so such samples are found
by hash and the job stops before it starts. A copy re-encoded to another file format (or a
different frame selection of a DICOM run) has another hash and is not caught: shard archives
from the original files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cmunet.data import location
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import load_manifest


def split_test_hashes(shards: str | Path) -> dict[str, str]:
    """``{source SHA-256: test key}`` of the test split of ``shards``."""
    test = set(pool_keys(load_splits(location.join(shards, "splits.json")), "test"))
    return {s["sha256"]: s["key"] for s in load_manifest(shards)["samples"]
            if s["key"] in test and s.get("sha256")}


def find_test_images(shards: str | Path, folder: str | Path) -> list[tuple[str, str]]:
    """``(key in folder, test key of shards)`` for every sample of ``folder`` whose source hash
    is that of a test sample of ``shards``."""
    test = split_test_hashes(shards)
    return [(s["key"], test[s["sha256"]]) for s in load_manifest(folder)["samples"]
            if s.get("sha256") in test]


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
