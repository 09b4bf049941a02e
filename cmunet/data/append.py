"""``tools/shard.py --append SET --images DIR [--masks DIR] [--meta FILE]``: grow a shard set.

The new images are processed with the set's own settings (its ``config.yaml``: preprocessing,
size, frame selection, shard size; the input folders, ``--workers``, ``--skip-bad`` and ``--salt``
come from the command line) into new shards numbered after the set's last one; the shards already
there are never rewritten. A patient already in the set keeps its split (its new frames join its
pools; in a set with an official test list a test patient's new frames are excluded). A new
patient is placed by a salted hash of its name alone
(:func:`cmunet.data.splits.place_new_patients`), so its split depends neither on what else is
added nor on the order of the appends. The
manifest's statistics are recomputed over the grown set's non-test samples. Give the build's
``--salt`` (or ``$CMUNET_SALT``) again, so that a DICOM patient who comes back gets the same
pseudonym.

Atomic: the new shards and a new index (``index-NNNNNN.npz``, numbered by the manifest's
``generation``) are put under names the current manifest does not list, then ``manifest.json`` is
replaced in one rename: the commit, the set grows at once. Then ``splits.json`` is rewritten to
list the new patients where the rule put them (the pools are the same before and after), and the
previous index is removed. An interrupted append, even by SIGKILL, leaves the set as it was, with
at most unlisted files that the next append removes. One append runs at a time (a lock file
beside the set).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cmunet.config import load_config
from cmunet.data import location
from cmunet.data.index import FORMAT, SampleIndex, load_manifest, write_json
from cmunet.data.io import BadInput
from cmunet.data.sharding import (INDEX_NAME, SHARD_NAME, ShardConfig, inputs, orphan_masks,
                                  process_files, set_stats)
from cmunet.data.splits import load_splits, new_patients, save_splits
from cmunet.log import logger
from cmunet.outdir import OutputError, remove_stale, temp_sibling
from cmunet.preempt import sigterm_exits

LOG = logger(__name__)


def append_images(folder: str | Path, images: str, masks: str | None = None,
                  meta: str | None = None, *, workers: int = 0, skip_bad: bool = False,
                  salt: str | None = None, log=LOG.info) -> dict:
    """Append the images of ``images`` to the set in the local ``folder``; returns the new
    manifest (see the module docstring)."""
    if location.is_url(folder):
        raise OutputError(f"{location.public(folder)}: --append grows a local folder; copy the "
                          "set here, append, then upload it")
    folder = Path(folder)
    with _locked(folder), sigterm_exits():
        manifest = load_manifest(folder)
        if manifest.get("format") != FORMAT:
            raise OutputError(f"{folder}: a set of format {manifest.get('format')!r}; run "
                              f"tools/shard.py --upgrade {folder} first")
        _remove_leftovers(folder, manifest, log)
        remove_stale(folder, log)
        cfg = replace(load_config(ShardConfig, folder / "config.yaml"), images=str(images),
                      masks=masks, meta=meta, out=str(folder), workers=workers,
                      skip_bad=skip_bad, overwrite=False, test_list=None)
        cfg, files, found_masks, orphans, found_meta = inputs(cfg)
        salt = salt or os.environ.get("CMUNET_SALT") or os.urandom(16).hex()
        tmp = temp_sibling(folder)
        tmp.mkdir()
        try:
            grown, changed = _grow(cfg, folder, manifest, tmp, files, found_masks, found_meta,
                                   salt, log)
            changed["appends"][-1]["orphan_masks"] = orphan_masks(found_masks, orphans, log)
            write_json(folder / "manifest.json", changed)  # the commit
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        splits = load_splits(folder / "splits.json")
        save_splits(_listed(splits, grown, manifest["count"]), folder / "splits.json")
        if manifest["index"]["name"] != changed["index"]["name"]:
            (folder / manifest["index"]["name"]).unlink(missing_ok=True)
    added = changed["count"] - manifest["count"]
    log(f"appended {added} samples in {len(changed['shards']) - len(manifest['shards'])} shards "
        f"to {folder}: {changed['count']} samples, {changed['patients']} patients")
    return changed


def _grow(cfg: ShardConfig, folder: Path, manifest: dict, tmp: Path, files, masks, meta,
          salt: str, log) -> tuple[SampleIndex, dict]:
    """Process the new files into ``tmp``, move their shards into ``folder`` (unlisted) and
    write the grown index there; returns it and the manifest that lists both."""
    index = SampleIndex.open(folder, manifest)
    got = process_files(cfg, files, masks, meta, salt, tmp, log,
                        max(s["count"] for s in manifest["shards"]), len(manifest["shards"]))
    if got.samples[0]["dtype"] != manifest["dtype"]:
        raise BadInput(cfg.images, f"holds images stored as {got.samples[0]['dtype']}, the set "
                                   f"{folder} as {manifest['dtype']}")
    _, new = index.find(s["key"] for s in got.samples)  # the keys not in the set yet
    if len(new) < len(got.samples):
        twice = next(s["key"] for s in got.samples if s["key"] not in set(new))
        raise BadInput(cfg.images, f"an image of sample key {twice!r} is already in {folder}; "
                                   "rename it (or leave it out)")
    added = SampleIndex.from_records(got.samples, [s["name"] for s in got.shards], str(tmp))
    grown = SampleIndex.concat([index, added], str(folder))
    mean, std = set_stats(grown, load_splits(folder / "splits.json"))
    generation = manifest.get("generation", 0) + 1
    name = f"index-{generation:06d}.npz"
    for shard in got.shards:
        os.replace(tmp / shard["name"], folder / shard["name"])
    changed = {k: v for k, v in manifest.items() if k != "samples"}
    changed.update(
        count=len(grown), labelled=int(np.count_nonzero(grown["labelled"])),
        patients=len(grown["patients"]), mean=mean, std=std,
        shards=manifest["shards"] + got.shards, generation=generation,
        index={"name": name, "sha256": grown.save(folder / name)},
        appends=manifest.get("appends", []) + [{
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": cfg.images,
            "count": len(got.samples), "skipped": got.skipped,
            "dropped_masks": got.dropped_masks, "patient_unknown": len(got.unknown)}])
    return grown, changed


def _listed(splits: dict, grown: SampleIndex, before: int) -> dict:
    """The splits document with the new patients listed where the rule places them (and, with
    an official test list, the new frames of its test patients excluded)."""
    placed = new_patients(splits, grown)
    document = _plain(splits)
    for pool in ("test", "train"):
        document[pool]["patients"] = sorted(document[pool]["patients"] +
                                            placed.get((pool, None), []))
    for ratio, parts in document["ratios"].items():
        for pool in parts:
            parts[pool]["patients"] = sorted(parts[pool]["patients"] +
                                             placed.get((pool, ratio), []))
    labelled = set(grown.patient_names(grown["labelled"]))
    document["finetune_order"] += [p for p in placed.get(("train", None), []) if p in labelled]
    if document.get("test_source") == "list":
        test_codes, _ = grown.patient_codes(document["test"]["patients"])
        new = np.arange(before, len(grown))
        document["excluded"]["keys"] = sorted(document["excluded"]["keys"] + grown.keys_of(
            new[grown.of_patients(test_codes)[new]]))
    return document


def _plain(document: dict) -> dict:
    """A plain copy of a splits document (its pools' patient lists, without keys worked out)."""
    plain = {k: v for k, v in document.items() if k not in ("test", "train", "ratios")}
    plain.update({pool: {"patients": list(document[pool]["patients"])}
                  for pool in ("test", "train")})
    plain["excluded"] = {"keys": list(document["excluded"]["keys"])}
    plain["finetune_order"] = list(document["finetune_order"])
    plain["ratios"] = {ratio: {pool: {"patients": list(part["patients"])}
                               for pool, part in parts.items()}
                       for ratio, parts in document["ratios"].items()}
    return plain


def _remove_leftovers(folder: Path, manifest: dict, log) -> None:
    """Delete what an interrupted append left in ``folder``: shards and index files the
    manifest does not list, and temporary files."""
    listed = {s["name"] for s in manifest["shards"]} | {manifest["index"]["name"]}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name not in listed and (SHARD_NAME.fullmatch(name) or INDEX_NAME.fullmatch(name)
                                   or re.fullmatch(r"\..+\.tmp-\d+", name)) and path.is_file():
            path.unlink()
            log(f"removed {path}, left by an interrupted append")


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold the lock of ``folder`` (a file beside it, locked until this process ends)."""
    if not (folder / "manifest.json").is_file():
        raise OutputError(f"{folder} is not a shard set (it has no manifest.json)")
    path = folder.parent / f".{folder.name}.lock"
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{folder}: another append to it is running (it holds "
                              f"{path})") from None
        yield
