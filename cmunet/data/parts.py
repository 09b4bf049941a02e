"""Sharding on many machines: ``tools/shard.py ... --part i/N`` on each, then ``--merge``.

Machine i of N runs the usual command with ``--out PART_i --part i/N``: it lists every input file
(so that the shard size and, without ``--size``, the image size are those of the whole set), then
processes only the i-th of N equal runs of them (in the sorted order a single run takes) into
``PART_i``: shards, an index, and a manifest of format ``cmunet-shards-part/1`` that no training
job reads. Give every machine the same settings and the same ``--salt`` (DICOM pseudonyms must
agree). ``tools/shard.py --merge PART_1 ... PART_N --out OUT`` then copies the parts' samples in
order into the shards of ``OUT`` (member bytes copied, nothing decoded), writes the one index,
the splits and the statistics, and gives the set one machine would have built: the same shards
byte for byte, the same index.npz and splits.json; the manifest differs only in its ``created``
and ``seconds``. ``OUT`` is a local folder written like a build's: a temporary folder, renamed at
the end (``--overwrite`` replaces only an earlier set).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cmunet.config import load_config, save_config, to_dict
from cmunet.data import location
from cmunet.data.index import (SampleIndex, file_sha256, load_index_file, load_manifest,
                               write_json)
from cmunet.data.io import BadInput
from cmunet.data.sharding import (PART_FORMAT, Processed, ShardConfig, _foreign_local, _replace,
                                  _ShardWriter, write_set)
from cmunet.log import logger
from cmunet.outdir import OutputError, check_out, remove_stale, temp_sibling
from cmunet.preempt import sigterm_exits

LOG = logger(__name__)


def merge_parts(parts: list[str | Path], out: str, overwrite: bool = False,
                log=LOG.info) -> dict:
    """Join the part folders ``parts`` (1..N of one ``--part`` run, in any order) into the set
    ``out``; returns its manifest."""
    start = time.perf_counter()
    cfg, found = _parts(parts)
    if location.is_url(out):
        raise OutputError(f"--merge writes a local folder, not {location.public(out)}: merge "
                          "here, then upload the set (e.g. aws s3 sync, manifest.json last)")
    target = check_out(out, {f"part {m['part']}": str(p) for p, m in found}, overwrite,
                       _foreign_local, must_be_new=True)
    remove_stale(target, log)
    tmp = temp_sibling(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_exits():
        tmp.mkdir()
        try:
            manifest = _merge(replace(cfg, out=str(target)), found, tmp)
            manifest["orphan_masks"] = found[0][1].get("orphan_masks", [])
            manifest["seconds"] = round(time.perf_counter() - start, 2)
            manifest["merged_parts"] = len(found)
            write_json(tmp / "manifest.json", manifest)
            save_config(replace(cfg, out=str(target)), tmp / "config.yaml")
            _replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"merged {len(found)} parts into {target}: {manifest['count']} samples in "
        f"{len(manifest['shards'])} shards")
    return manifest


def _parts(parts: list[str | Path]) -> tuple[ShardConfig, list[tuple[Path, dict]]]:
    """(the parts' common config, [(folder, manifest)] in part order); a ValueError names a
    folder that is not a part, a part missing or twice, or settings that differ."""
    found = []
    for folder in map(Path, parts):
        manifest = load_manifest(folder)
        if manifest.get("format") != PART_FORMAT:
            raise ValueError(f"{folder / 'manifest.json'}: not a part written by tools/shard.py "
                             "--part i/N")
        found.append((folder, manifest))
    found.sort(key=lambda pair: pair[1]["part"])
    numbers, of = [m["part"] for _, m in found], found[0][1]["of"]
    if numbers != list(range(1, of + 1)) or any(m["of"] != of for _, m in found):
        given = ", ".join(f"{m['part']}/{m['of']}" for _, m in found)
        raise ValueError(f"the parts are {given}; give every part 1/{of} to {of}/{of} once")
    configs = [load_config(ShardConfig, folder / "config.yaml") for folder, _ in found]
    settings = [{k: v for k, v in to_dict(c).items() if k not in ("out", "workers")}
                for c in configs]
    for (folder, _), setting in zip(found, settings):
        if setting != settings[0]:
            differ = sorted(k for k in setting if setting[k] != settings[0][k])
            raise ValueError(f"{folder}: sharded with other settings than {found[0][0]} "
                             f"({', '.join(differ)})")
    dtypes = {m["dtype"] for _, m in found} - {None}
    if len(dtypes) > 1:
        raise BadInput(found[0][0], f"the parts hold images stored as {', '.join(sorted(dtypes))}"
                                    "; convert the images to one bit depth")
    return configs[0], found


def _merge(cfg: ShardConfig, found: list[tuple[Path, dict]], tmp: Path) -> dict:
    """Copy the parts' samples into ``tmp``'s shards in order; write the set's files there."""
    writer = _ShardWriter(tmp, found[0][1]["shard_size"])
    indexes, got = [], Processed(dtype=next((m["dtype"] for _, m in found if m["dtype"]), None))
    for folder, manifest in found:
        if not manifest["count"]:
            continue
        index = load_index_file(location.absolute(folder), manifest["index"]["name"],
                                manifest["index"]["sha256"])
        expected = iter(index.keys_of(np.arange(len(index))))
        for name in index.shard_names():
            for sample in location.tar_samples(str(folder / name)):
                if sample["__key__"] != next(expected, None):
                    raise ValueError(f"{folder / name}: sample {sample['__key__']} is not the "
                                     "next one its index lists: the part is damaged")
                writer.add_members(sample["__key__"], {k: v for k, v in sample.items()
                                                       if not k.startswith("__")})
        indexes.append(index)
        got.skipped += manifest["skipped"]
        got.dropped_masks += manifest["dropped_masks"]
        got.unknown += manifest["unknown"]
    got.shards = writer.close()
    if not indexes:
        raise BadInput(cfg.images, "no usable image (every file was skipped)")
    columns = dict(SampleIndex.concat(indexes, str(tmp)).columns)
    columns["shards"] = np.array([s["name"] for s in got.shards], dtype="S")
    columns["shard_offsets"] = np.cumsum([0] + [s["count"] for s in got.shards])
    for shard in got.shards:
        shard["sha256"] = file_sha256(tmp / shard["name"])
    return write_set(cfg, SampleIndex(columns, str(tmp)), got, tmp)
