"""``tools/shard.py --upgrade SET``: rewrite a shard set of format 1 in the current format.

Format 1 listed every sample in ``manifest.json`` and every key of every pool in ``splits.json``.
The upgrade writes ``index.npz`` from the manifest's samples, ``splits.json`` as patient lists and
a ``manifest.json`` without per-sample entries, in that order, each under a temporary name that
is then renamed; the shards are not touched. An interrupted upgrade leaves a set that loads as
before: the old manifest ignores a new index, and the new splits give the same pools with the
old manifest's samples (the upgrade checks that they give exactly the old pools before it writes
anything). Run it again to finish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmunet.data import location
from cmunet.data.index import FORMAT, INDEX, OLD_FORMAT, SampleIndex, load_manifest, write_json
from cmunet.data.splits import FORMAT as SPLITS_FORMAT
from cmunet.data.splits import POOLS, load_splits, new_patient_rule, pool_ids, save_splits

KEPT = ("seed", "by", "test_fraction", "test_source", "total", "finetune_order")


def upgrade_set(folder: str | Path, log=print) -> dict:
    """Upgrade the set in the local ``folder``; returns its new manifest."""
    if location.is_url(folder):
        raise ValueError(f"{location.public(folder)}: --upgrade rewrites a local folder; copy "
                         "the set here, upgrade it, then upload it")
    folder = Path(folder)
    manifest = dict(load_manifest(folder))
    if manifest.get("format") == FORMAT:
        log(f"{folder} is already of format {FORMAT}")
        return manifest
    where = str(folder / "manifest.json")
    if manifest.get("format") != OLD_FORMAT:
        raise ValueError(f"{where}: format {manifest.get('format')!r} is not one this tool "
                         f"upgrades ({OLD_FORMAT})")
    index = SampleIndex.from_records(manifest.pop("samples", []),
                                     [s["name"] for s in manifest["shards"]], where)
    old = load_splits(folder / "splits.json")
    new = patient_splits(old, bool(index["labelled"].any()))
    _check_same_pools(old, new, index, folder / "splits.json")
    manifest.update(format=FORMAT, index={"name": INDEX, "sha256": index.save(folder / INDEX)},
                    upgraded_from=OLD_FORMAT)
    save_splits(new, folder / "splits.json")
    write_json(folder / "manifest.json", manifest)  # last: from now on the set is of format 2
    log(f"upgraded {folder} to {FORMAT}: {len(index)} samples in {INDEX}")
    return manifest


def patient_splits(old: dict, has_labels: bool) -> dict:
    """The patient-list splits document of a format-1 one (which also listed every key)."""
    rule = new_patient_rule(old.get("seed", 0), old.get("test_source") == "list", has_labels)
    return {"format": SPLITS_FORMAT, **{k: old[k] for k in KEPT if k in old},
            "new_patients": old.get("new_patients", rule),
            "test": {"patients": old["test"]["patients"]},
            "train": {"patients": old["train"]["patients"]},
            "excluded": {"keys": old.get("excluded", {}).get("keys", [])},
            "ratios": {ratio: {name: {"patients": part["patients"]} for name, part in pools.items()}
                       for ratio, pools in old["ratios"].items()}}


def _check_same_pools(old: dict, new: dict, index: SampleIndex, where: Path) -> None:
    for pool in POOLS:
        for ratio in old["ratios"] if pool in ("pretrain", "finetune") else [None]:
            if not np.array_equal(pool_ids(old, pool, ratio, index),
                                  pool_ids(new, pool, ratio, index)):
                raise ValueError(f"{where}: pool {pool} {ratio or ''} is not the samples of its "
                                 "patients (edited by hand?), so it cannot be stored as patient "
                                 "lists; rebuild the set with tools/shard.py")
