"""cmunet-select: which frames to annotate. Patient diversity, determinism per seed, the test split
never read, embeddings streamed one batch at a time and resumed chunk by chunk, and the command's
files (picks.csv, contact_sheet.png, the MLflow run)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from cmunet.config import ConfigError, load_config
from cmunet.data import location
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet
from cmunet.selection import rank, select_keys
from cmunet.selection.cluster import kmeans, typicality
from cmunet.selection.config import SELECTABLE, SelectConfig
from cmunet.selection.embedding import build_encoder, frame_batches, pooled_features
from cmunet.selection.job import pool_frames, run_select
from cmunet.selection.store import INDEX, embed_pool
from cmunet.selection.strategies import STRATEGIES
from conftest import ROOT

CPU = torch.device("cpu")


def crowded_patient(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """36 frames: patient "a" has 30, in 3 far-apart blobs; "b", "c" and "d" have 2 each, near
    the blobs. Without the patient rule every strategy would pick mostly "a"."""
    rng = np.random.default_rng(seed)
    blobs = np.eye(8)[:3] * 20
    a = np.concatenate([b + rng.normal(0, 1, (10, 8)) for b in blobs])
    others = np.concatenate([blobs[i % 3] + rng.normal(0, 1, (2, 8)) for i in range(3)])
    return np.concatenate([a, others]), ["a"] * 30 + [p for p in "bcd" for _ in range(2)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_patient_gets_a_second_frame_before_every_patient_has_one(strategy):
    x, patients = crowded_patient()
    order, scores = rank(x, 10, strategy, seed=0, patients=patients)
    assert len(order) == len(set(order)) == len(scores) == 10
    assert {patients[i] for i in order[:4]} == set("abcd")
    # later rounds too: the counts never differ by more than one while patients have frames
    # left ("b", "c", "d" run out after 2 picks each; "a" takes the rest)
    for k in range(1, 8):
        counts = Counter(patients[i] for i in order[:k])
        assert max(counts.values()) - min(counts.get(p, 0) for p in "abcd") <= 1, (k, counts)
    free, _ = rank(x, 4, strategy, seed=0)  # no patients given: each frame its own
    assert sum(patients[i] == "a" for i in free) >= 2  # so the rule above is what spreads them


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_picks_other_seeds_other_picks(strategy):
    rng = np.random.default_rng(1)
    x, patients = rng.normal(size=(80, 16)), [f"p{i % 20}" for i in range(80)]
    picks = [rank(x, 6, strategy, seed, patients)[0] for seed in range(6)]
    assert picks[0] == rank(x, 6, strategy, 0, patients)[0]
    assert len({tuple(p) for p in picks}) >= 4, picks


def test_kmeans_finds_separated_clusters_and_typicality_favours_their_cores():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0], [10, 0], [0, 10]])
    x = np.concatenate([c + rng.normal(0, 0.5, (15, 2)) for c in centres])
    truth = np.repeat(np.arange(3), 15)
    for seed in range(3):
        labels = kmeans(x, 3, seed)
        assert len(set(zip(labels.tolist(), truth.tolist()))) == 3  # one label per blob
    blob = np.concatenate([rng.normal(0, 0.3, (20, 2)), [[3.0, 3.0]]])  # an outlier last
    assert typicality(blob).argmin() == 20
    assert typicality(blob)[np.linalg.norm(blob, axis=1).argmin()] > np.median(typicality(blob))
    assert (kmeans(x[:2], 5, 0) == [0, 1]).all()  # k >= rows: each row its own cluster


def test_select_keys_for_a_study_arm():
    x, patients = crowded_patient()
    keys = [f"k{i:02d}" for i in range(len(x))]
    chosen = select_keys(keys, x, 4, "kcenter", seed=2, patients=patients)
    assert chosen == [keys[i] for i in rank(x, 4, "kcenter", 2, patients)[0]]
    assert len({patients[keys.index(k)] for k in chosen}) == 4
    with pytest.raises(ValueError, match="3 keys for 36"):
        select_keys(keys[:3], x, 2)
    with pytest.raises(ValueError, match="unknown strategy"):
        rank(x, 2, "uncertainty")


# ---- the pool: never the test split ----------------------------------------------------------

def test_pools_never_hold_test_frames_and_test_pools_are_refused(tiny_shards, tmp_path):
    splits = load_splits(location.join(tiny_shards, "splits.json"))
    test_keys, test_patients = set(pool_keys(splits, "test")), set(splits["test"]["patients"])
    for pool in SELECTABLE:
        for ratio in splits["ratios"]:
            frames = pool_frames(str(tiny_shards), pool, ratio)
            assert frames.keys and not set(frames.keys) & test_keys
            assert not set(frames.patients) & test_patients
    for pool in ("test", "all"):
        with pytest.raises(ConfigError, match="holds test-split frames"):
            load_config(SelectConfig, None, [f"data.pool={pool}"])
        with pytest.raises(ValueError, match="never reads the test split"):
            pool_frames(str(tiny_shards), pool, "79-1")
    # a splits file whose fine-tuning pool names a test patient is refused, not followed
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    document = json.loads((bad / "splits.json").read_text())
    part, intruder = document["ratios"]["79-1"]["finetune"], sorted(test_patients)[0]
    part["patients"].append(intruder)
    if "keys" in part:  # the layout that lists keys too
        part["keys"] += [k for k in document["test"]["keys"] if k in test_keys]
    (bad / "splits.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="frames of the test split or its patients"):
        pool_frames(str(bad), "finetune", "79-1")


def test_the_pool_is_columns_and_only_the_picks_become_records(tiny_shards, tmp_path,
                                                               monkeypatch):
    """An archive's pool is never one dict per frame: records are built for the picks only."""
    from cmunet.data.index import SampleIndex

    asked = []
    records = SampleIndex.records
    monkeypatch.setattr(SampleIndex, "records",
                        lambda self, ids=None: asked.append(len(self) if ids is None
                                                            else len(ids)) or records(self, ids))
    pool = pool_frames(str(tiny_shards), "train", "79-1")
    assert asked == [] and len(pool.keys) == len(pool.patients) == len(pool.ids) > 3
    assert list(pool.ids) == sorted(pool.ids)  # shard and tar order
    assert [r["key"] for r in pool.records([2, 0])] == [pool.keys[2], pool.keys[0]]
    cfg = load_config(SelectConfig, None, [
        f"data.shards={tiny_shards}", "data.pool=train", "budget=3", "model_width=8",
        "chunk_size=50", f"out={tmp_path / 'select'}", "tracking.enabled=false"])
    asked.clear()
    picks = run_select(cfg, log=lambda _: None)
    assert len(picks) == 3 and sum(asked) <= 3 + len(picks)  # the picks (+ their drawing)
    assert all(dict(zip(pool.keys, pool.patients))[p["key"]] == p["patient"] for p in picks)


# ---- embeddings: one batch held at a time, chunk files, resumed ------------------------------

def train_keys(shards) -> list[str]:
    return pool_frames(str(shards), "train", "79-1").keys


def watched(log: dict):
    """A reader: the real :func:`frame_batches`, noting how many frames were read and the most
    images alive (not yet garbage) when a batch is handed over, earlier batches included."""
    def reader(shards, keys, batch_size, num_workers):
        for batch in frame_batches(shards, keys, batch_size, num_workers):
            alive = sum(n for ref, n in log["batches"] if ref() is not None)
            log["peak"] = max(log["peak"], alive + len(batch["key"]))
            log["batches"].append((weakref.ref(batch["image"]), len(batch["key"])))
            log["keys"] += batch["key"]
            yield batch
    return reader


def new_log() -> dict:
    return {"batches": [], "peak": 0, "keys": []}


def test_embedding_holds_one_batch_and_streams_the_shards(tiny_shards, tmp_path):
    encoder, _ = build_encoder("none", 8, seed=0)
    keys = train_keys(tiny_shards)
    log = new_log()
    embedded = embed_pool(encoder, str(tiny_shards), keys, tmp_path / "e", batch_size=3,
                          chunk_size=100, device=CPU, reader=watched(log))
    assert set(log["keys"]) == set(keys) and log["peak"] == 3
    hoarded = new_log()  # the check can fail: a consumer that keeps the batches
    kept = list(watched(hoarded)(str(tiny_shards), keys, 3, 0))
    assert hoarded["peak"] == len(kept) * 3 > 3
    # the rows are each frame's own embedding, in the order of the keys
    some = [keys[0], keys[-1], keys[7]]
    stored = InMemorySet(tiny_shards, some, with_masks=False)
    images = torch.from_numpy(np.stack([stored[i]["image"] for i in range(len(some))]))
    direct = pooled_features(encoder, images).numpy()
    assert np.allclose(embedded.rows(some), direct, atol=1e-5)
    assert np.allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, atol=1e-5)
    # the reader streams: with the shard read last damaged, every batch before it still arrives
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_shards, damaged)
    order = new_log()
    list(watched(order)(str(damaged), keys, 2, 0))
    frames = pool_frames(str(damaged), "train", "79-1")
    [last] = [r["shard"] for r in frames.records([frames.keys.index(order["keys"][-1])])]
    (damaged / last).write_bytes((damaged / last).read_bytes()[:700])
    before = new_log()
    with pytest.raises(location.ReadError, match="truncated or damaged"):
        list(watched(before)(str(damaged), keys, 2, 0))
    assert len(before["keys"]) >= len(keys) - 4


def test_chunks_are_written_and_a_rerun_embeds_only_the_missing_ones(tiny_shards, tmp_path):
    encoder, _ = build_encoder("none", 8, seed=0)
    keys, folder = train_keys(tiny_shards), tmp_path / "embeddings"
    first = embed_pool(encoder, str(tiny_shards), keys, folder, batch_size=2, chunk_size=5,
                       device=CPU)
    chunks = sorted(p.name for p in folder.glob("chunk-*.npz"))
    assert chunks == [f"chunk-{i:06d}.npz" for i in range(-(-len(keys) // 5))]
    assert json.loads((folder / INDEX).read_text())["frames"] == len(keys)
    log = new_log()
    again = embed_pool(encoder, str(tiny_shards), keys, folder, batch_size=2, chunk_size=5,
                       device=CPU, reader=watched(log))
    assert log["keys"] == [] and np.array_equal(again.vectors, first.vectors)
    (folder / chunks[1]).unlink()
    (folder / ".chunk-000002.npz.tmp-1").write_bytes(b"half")  # left by a killed run
    log = new_log()
    again = embed_pool(encoder, str(tiny_shards), keys, folder, batch_size=2, chunk_size=5,
                       device=CPU, reader=watched(log))
    assert set(log["keys"]) == set(keys[5:10]) and (folder / chunks[1]).is_file()
    assert np.allclose(again.vectors, first.vectors, atol=1e-6)
    assert not list(folder.glob(".*tmp*"))
    other, _ = build_encoder("none", 8, seed=1)  # other weights: not these chunks
    with pytest.raises(ValueError, match="embeddings of other inputs"):
        embed_pool(other, str(tiny_shards), keys, folder, chunk_size=5, device=CPU)


# ---- the command -------------------------------------------------------------------------------

def test_cmunet_select_writes_picks_and_a_contact_sheet(tiny_shards, tmp_path):
    out = tmp_path / "select"
    command = [sys.executable, str(ROOT / "launch/select_frames.py"), "--config",
               str(ROOT / "configs/select/cpu.yaml"), f"data.shards={tiny_shards}",
               "data.pool=train", "budget=8", "model_width=8", "chunk_size=7", f"out={out}",
               "tracking.enabled=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    with (out / "picks.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rank", "key", "source", "patient", "score"]
    pool = pool_frames(str(tiny_shards), "train", "79-1")
    frames = dict(zip(pool.keys, pool.patients))
    patients = set(frames.values())
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 9)]
    assert all(frames[r["key"]] == r["patient"] for r in rows)
    assert {r["patient"] for r in rows[:len(patients)]} == patients  # all, one each, first
    assert (out / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "embeddings").glob("chunk-*.npz"))) == -(-len(frames) // 7)
    result = json.loads((out / "result.json").read_text())
    assert result["keys"] == [r["key"] for r in rows] and result["pool_frames"] == len(frames)


@pytest.mark.slow
def test_a_selection_is_one_mlflow_run(tiny_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(SelectConfig, ROOT / "configs/select/cpu.yaml", [
        f"data.shards={tiny_shards}", "data.pool=train", "budget=4", "model_width=8",
        "strategy=kcenter", f"out={tmp_path / 'select'}", f"tracking.uri={uri}",
        "tracking.system_metrics=false"])
    picks = run_select(cfg, log=lambda _: None)
    client = MlflowClient(tracking_uri=uri)
    run, = client.search_runs([client.get_experiment_by_name("cmunet-select").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["strategy"] == "kcenter"
    assert run.data.metrics["picked_patients"] == len({p["patient"] for p in picks}) == 4
    assert {"picks.csv", "contact_sheet.png", "result.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}


def test_help_refusals_and_foreign_out(tiny_shards, tmp_path, capsys):
    from cmunet.cli.select import main

    for script in ("launch/select_frames.py", "tools/select_frames.py"):
        done = subprocess.run([sys.executable, str(ROOT / script), "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "budget=8" in done.stdout, done.stderr[-2000:]
    with pytest.raises(SystemExit) as stop:
        main([f"data.shards={tiny_shards}", "data.pool=test", f"out={tmp_path / 'o'}"])
    assert stop.value.code == 2 and "holds test-split frames" in capsys.readouterr().err
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not cmunet's")
    assert main([f"data.shards={tiny_shards}", f"out={foreign}", "tracking.enabled=false"]) == 2
    assert "mine.txt was not written by cmunet-select" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and (foreign / "mine.txt").exists()
    with pytest.raises(ValueError, match="out is not set"):
        run_select(load_config(SelectConfig, None, [f"data.shards={tiny_shards}"]))
