"""The ``cmunet-select`` job: a non-test pool -> embeddings -> picks -> ``OUT/picks.csv``,
``OUT/contact_sheet.png``, ``OUT/result.json``, ``OUT/config.yaml`` and one MLflow run.

``OUT/embeddings/`` keeps the pool's embeddings (:mod:`cmunet.selection.store`), so a rerun
with another budget, strategy or seed (of an export) embeds nothing again. The test split is
never read: the pool must be ``finetune``, ``pretrain`` or ``train``, and a pool holding a
test-split frame or a frame of a test patient (an inconsistent splits file) is refused.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmunet.config import flatten, save_config
from cmunet.data import location
from cmunet.data.index import SampleIndex
from cmunet.data.splits import load_splits, pool_ids
from cmunet.log import logger
from cmunet.outdir import OutputError, check_out, names_in
from cmunet.selection.config import SELECTABLE, SelectConfig
from cmunet.selection.embedding import build_encoder
from cmunet.selection.outputs import draw_picks, write_picks
from cmunet.selection.store import INDEX, embed_pool
from cmunet.selection.strategies import rank
from cmunet.tracking.mlflow_run import Tracker

LOG = logger(__name__)
FILES = ("config.yaml", "picks.csv", "contact_sheet.png", "result.json")
# what this job writes in OUT: FILES, the embeddings' chunks and index, their temporary names
OURS = re.compile("|".join([*map(re.escape, FILES), r"config\.yaml\.tmp", "embeddings/",
                            re.escape(f"embeddings/{INDEX}"), r"embeddings/chunk-\d{6}\.npz",
                            r"(embeddings/)?\.[^/]+\.tmp[^/]*"]))


def run_select(cfg: SelectConfig, log: Callable[[str], None] = LOG.info) -> list[dict]:
    """Pick ``cfg.budget`` frames of the pool to annotate; returns the picks (rank, key, source,
    patient, score) in pick order."""
    if not cfg.out:
        raise ValueError("out is not set: give the output folder, e.g. out=runs/select")
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the folder written by tools/shard.py")
    out = check_out(cfg.out, {"data.shards": cfg.data.shards, "export": cfg.export})
    refuse_foreign(out)
    location.configure(cfg.data.remote)
    frames = pool_frames(cfg.data.shards, cfg.data.pool, cfg.data.ratio)
    keys, patients = frames.keys, frames.patients
    encoder, encoder_info = build_encoder(cfg.export, cfg.model_width, cfg.seed, cfg.tracking.uri)
    log(f"pool {cfg.data.pool} of {cfg.data.ratio}: {len(keys)} frames of "
        f"{len(set(patients))} patients; encoder: {encoder_info}")
    if cfg.budget > len(keys):
        log(f"warning: budget {cfg.budget} exceeds the pool's {len(keys)} frames: picking all")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, run_name=out.name, params=flatten(cfg),
                      shards=[cfg.data.shards])
    try:
        began = time.perf_counter()
        embedded = embed_pool(encoder, cfg.data.shards, keys, out / "embeddings", cfg.batch_size,
                              cfg.chunk_size, cfg.data.num_workers, log=log)
        embedded_at = time.perf_counter()
        order, scores = rank(embedded.vectors, cfg.budget, cfg.strategy, cfg.seed, patients,
                             cfg.dims)
        picks = [{"rank": number, "key": record["key"], "source": source_of(record),
                  "patient": record["patient"], "score": score}
                 for number, (record, score) in enumerate(zip(frames.records(order), scores),
                                                          start=1)]
        summary = {"strategy": cfg.strategy, "budget": cfg.budget, "seed": cfg.seed,
                   "encoder": encoder_info, "pool": cfg.data.pool, "ratio": cfg.data.ratio,
                   "pool_frames": len(keys), "pool_patients": len(set(patients)),
                   "picked_patients": len({p["patient"] for p in picks}),
                   "embedding_dim": int(embedded.vectors.shape[1]),
                   "embed_seconds": embedded_at - began,
                   "select_seconds": time.perf_counter() - embedded_at,
                   "keys": [p["key"] for p in picks]}
        write_picks(picks, out / "picks.csv")
        draw_picks(cfg.data.shards, picks, out / "contact_sheet.png")
        write_json(summary, out / "result.json")
        tracker.log_metrics({name: summary[name] for name in (
            "pool_frames", "pool_patients", "picked_patients", "embed_seconds",
            "select_seconds")}, step=0)
        for name in FILES:
            tracker.log_artifact(out / name)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    log(f"picked {len(picks)} frames of {summary['picked_patients']} patients ({cfg.strategy}); "
        f"wrote {out / 'picks.csv'} and {out / 'contact_sheet.png'}")
    return picks


@dataclass(frozen=True)
class Pool:
    """The frames of a selection pool as columns, in shard and tar order: their rows of the
    set's :class:`~cmunet.data.index.SampleIndex` (``ids``), keys and patients. No record per
    frame is built, so an archive's pool costs a few bytes per frame beyond its keys."""
    index: SampleIndex
    ids: np.ndarray
    keys: list[str]
    patients: list[str]

    def records(self, rows: list[int]) -> list[dict]:
        """The manifest records (key, patient, shard, source, ...) of the pool's ``rows``."""
        return self.index.records(self.ids[np.asarray(rows, dtype=np.int64)])


def pool_frames(shards: str, pool: str, ratio: str) -> Pool:
    """The frames of the non-test ``pool`` of the shards' splits. A test pool, or a pool holding
    a frame of the test split or of a test patient, is a ValueError."""
    if pool not in SELECTABLE:
        raise ValueError(f"pool {pool!r} cannot be selected from: it is not one of "
                         f"{', '.join(SELECTABLE)} (selection never reads the test split)")
    path = location.join(shards, "splits.json")
    splits = load_splits(path)
    index = splits.index
    ids = pool_ids(splits, pool, ratio)
    if not len(ids):
        raise ValueError(f"{location.public(path)}: pool {pool} of ratio {ratio} is empty (the "
                         "fine-tuning pools hold labelled frames only; for an archive without "
                         "masks use data.pool=train)")
    excluded = index.find(splits.get("excluded", {}).get("keys", []))[0]
    test = np.union1d(pool_ids(splits, "test"), excluded)
    codes, _ = index.patient_codes(splits["test"]["patients"])
    forbidden = np.isin(ids, test) | index.of_patients(codes)[ids]
    if forbidden.any():
        first = index.keys_of(ids[forbidden][:1])[0]
        raise ValueError(f"{location.public(path)}: pool {pool} holds {int(forbidden.sum())} "
                         f"frames of the test split or its patients (e.g. {first}); the splits "
                         "file is inconsistent: rebuild the shards with tools/shard.py")
    return Pool(index, ids, index.keys_of(ids), index.patient_names_of(ids))


def source_of(record: dict) -> str:
    """The file a frame comes from, where the set records it: ``source``, else the cine loop's
    key (``loop``), else empty."""
    return str(record.get("source", record.get("loop", "")))


def refuse_foreign(out: Path) -> None:
    """Refuse an ``out`` holding anything this job did not write: it is reused as it is (a rerun
    resumes from its embeddings), so it must be new or an earlier cmunet-select output."""
    other = next((n for n in sorted(names_in(out)) if not OURS.fullmatch(n)), None) \
        if out.is_dir() else None
    if other:
        raise OutputError(f"{out / other} was not written by cmunet-select; out={out} must be a "
                          "new folder or an earlier cmunet-select output: choose another out")


def write_json(document: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)
