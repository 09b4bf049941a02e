#!/usr/bin/env python
"""Shard-set metadata at archive scale: the compact sample index against format 1's JSON.

Generated sets of ``--sizes`` samples (index.npz, manifest.json and splits.json, no pixels and
no tars: cine loops of 100 frames, 3 loops a patient, 1000 samples a shard, every 50th patient
labelled). Each row is measured in fresh processes that do what a pre-training rank does (rank 0
and rank 1 of 2, one after the other): read the manifest and the splits, resolve the 79-1
pre-training pool and build the :class:`~cmunet.data.stream.ShardStream`:

* load: seconds for that, and the memory it added to the process (RSS; torch is imported first
  and not counted);
* epoch order: seconds to work out epoch 1 for the rank's 2 loader workers (the shard order, each
  worker's pieces; the best of 3);
* resume: the same for a restart in the middle of epoch 3 (half of its batches done), up to the
  keys wanted from the first shard read (a worker then reads past the skipped samples of that
  shard without decoding them: not measured, there are no pixels);
* after an epoch: the rank forks 2 workers (as the DataLoader does) that each walk their part of
  the epoch as a worker does without the pixels (the keys wanted from each shard); the largest
  RSS and PSS (shared pages divided among the processes sharing them) of the 2 ranks x 2 workers.

``--before N`` adds the same figures at N samples for format 1 (every sample in manifest.json,
every key of every pool in splits.json) read by the code of commit :data:`BEFORE` (the last one
with only that format), and the same files read by this version's reader (old sets still load).
``--stream N`` adds a real set of N tiny frames (16 px) in N/100 shards, streamed for one epoch by
2 ranks x 2 workers from a folder and from a local S3 server (moto): time to first batch, the
samples delivered against those expected, RSS of the processes at the first batch and at the end.

Goals: at 10^6 samples a rank loads in <= 1 s and <= 100 MB; at 10^7 it still starts. Not part
of ``make bench`` (a few minutes and ~2 GB of disk):

    python bench/scale.py [--sizes 1000000 10000000] [--before 1000000] [--stream 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "fc28996118f9071d43b0e51d52d0731b0b09e02e"  # format 1: manifest.json lists every sample
FRAMES, LOOPS, SHARD, LABELLED_EVERY = 100, 3, 1000, 50
BATCH, RATIO, WORLD, WORKERS, REPEATS = 32, "79-1", 2, 2, 3
RATIOS = {"50-30": 0.30, "60-20": 0.20, "70-10": 0.10, "75-5": 0.05, "79-1": 0.01}


# ---- generated sets ---------------------------------------------------------------------------

def digits(values: np.ndarray, width: int) -> list[np.ndarray]:
    """The decimal digits of ``values`` as ASCII columns, zero-padded to ``width``."""
    return [(values // 10**k % 10 + 48).astype(np.uint8) for k in range(width - 1, -1, -1)]


def text(n: int, *parts) -> np.ndarray:
    """Fixed-width byte strings built column by column: bytes constants and (values, width)."""
    columns = []
    for part in parts:
        if isinstance(part, bytes):
            columns += [np.full(n, c, np.uint8) for c in part]
        else:
            columns += digits(*part)
    return np.ascontiguousarray(np.stack(columns, axis=1)).view(f"S{len(columns)}").reshape(-1)


def columns_of(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The index columns of ``n`` generated cine frames (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64)
    patient, loop, frame = ids // (FRAMES * LOOPS), ids // FRAMES, ids % FRAMES
    patients = int(patient[-1]) + 1
    loops = int(loop[-1]) + 1
    shards = -(-n // SHARD)
    return {
        "key": text(n, b"x", (patient, 7), b"_", (loop % LOOPS, 2), b"_f", (frame, 4)),
        "key_order": np.arange(n, dtype=np.int32),  # the keys are generated in sorted order
        "patient": patient.astype(np.int32),
        "patients": text(patients, b"pt", (np.arange(patients), 10)),
        "labelled": patient % LABELLED_EVERY == 0,
        "spacing": np.full((n, 2), 0.3),
        "mean": rng.normal(120, 10, n).astype(np.float32),
        "std": rng.normal(40, 5, n).astype(np.float32),
        "sha256": rng.integers(0, 256, (loops, 32), dtype=np.uint8)[loop],  # one file a loop
        "shards": text(shards, b"shard-", (np.arange(shards), 6), b".tar"),
        "shard_offsets": np.minimum(np.arange(shards + 1) * SHARD, n),
        "info_loop": loop.astype(np.int32),
        "table_loop": text(loops, b"x", (np.arange(loops) // LOOPS, 7), b"_",
                           (np.arange(loops) % LOOPS, 2)),
        "info_frame": frame.astype(np.int32),
    }


def split_patients(c: dict[str, np.ndarray], seed: int = 0) -> dict:
    """A patient-list splits document: 20 % of the patients tested, the fine-tuning pools
    prefixes of one order of the labelled rest (as make_splits draws them)."""
    from cmunet.data.splits import FORMAT

    rng = np.random.default_rng(seed)
    names = [p.decode() for p in c["patients"]]
    order = rng.permutation(len(names))
    test = sorted(names[i] for i in order[:max(1, len(names) // 5)])
    rest = sorted(set(names) - set(test))
    labelled = set(np.unique(c["patient"][c["labelled"]]).tolist())
    finetune = [names[i] for i in order[len(test):] if i in labelled]
    per_patient = FRAMES * LOOPS
    document = {"format": FORMAT, "seed": seed, "by": "patient", "test_fraction": 0.2,
                "test_source": "drawn", "total": len(c["key"]), "test": {"patients": test},
                "train": {"patients": rest}, "excluded": {"keys": []},
                "finetune_order": finetune, "ratios": {}}
    for ratio, share in RATIOS.items():
        ft = sorted(finetune[:max(1, round(share * len(c["key"]) / per_patient))])
        document["ratios"][ratio] = {"pretrain": {"patients": sorted(set(rest) - set(ft))},
                                     "finetune": {"patients": ft}}
    return document


def write_set(folder: Path, c: dict[str, np.ndarray], splits: dict) -> None:
    from cmunet.data.index import FORMAT, INDEX, SampleIndex, write_json

    folder.mkdir(parents=True)
    digest = SampleIndex(c, str(folder)).save(folder / INDEX)
    counts = np.diff(c["shard_offsets"]).tolist()
    write_json(folder / "splits.json", splits)
    write_json(folder / "manifest.json", {
        "format": FORMAT, "count": len(c["key"]), "labelled": int(c["labelled"].sum()),
        "patients": len(c["patients"]), "size": 512, "dtype": "uint8", "mean": 120.0,
        "std": 40.0, "stats_over": "non-test samples",
        "shards": [{"name": name.decode(), "count": count, "sha256": "0" * 64}
                   for name, count in zip(c["shards"], counts)],
        "index": {"name": INDEX, "sha256": digest}})


def write_old_set(folder: Path, c: dict[str, np.ndarray], splits: dict) -> None:
    """The same set in format 1 (as its writer laid it out: indent=1, every key listed)."""
    from cmunet.data.index import OLD_FORMAT, SampleIndex
    from cmunet.data.splits import POOLS, pool_ids

    folder.mkdir(parents=True)
    index = SampleIndex(c, str(folder))
    keys, names = np.char.decode(c["key"]).tolist(), [s.decode() for s in c["shards"]]
    patients = [p.decode() for p in c["patients"]]
    shard = index.shard_of(np.arange(len(keys)))
    with (folder / "manifest.json").open("w") as f:
        head = {"format": OLD_FORMAT, "count": len(keys), "labelled": int(c["labelled"].sum()),
                "patients": len(patients), "size": 512, "dtype": "uint8", "mean": 120.0,
                "std": 40.0, "shards": [{"name": n, "count": int(k)} for n, k in
                                        zip(names, np.diff(c["shard_offsets"]))]}
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "samples": [\n')
        for i, key in enumerate(keys):
            record = {"key": key, "patient": patients[c["patient"][i]], "spacing": [0.3, 0.3],
                      "labelled": bool(c["labelled"][i]), "shard": names[shard[i]],
                      "sha256": c["sha256"][i].tobytes().hex(), "mean": float(c["mean"][i]),
                      "std": float(c["std"][i]), "dtype": "uint8"}
            f.write(("" if i == 0 else ",\n") + json.dumps(record, indent=1))
        f.write("\n ]\n}\n")
    old = {k: v for k, v in splits.items() if k != "format"}
    for pool in POOLS:
        for ratio in RATIOS if pool in ("pretrain", "finetune") else [None]:
            if pool != "all":
                ids = pool_ids(splits, pool, ratio, index)
                part = old[pool] if ratio is None else old["ratios"][ratio][pool]
                part["keys"] = sorted(keys[i] for i in ids.tolist())
    (folder / "splits.json").write_text(json.dumps(old, indent=1) + "\n")


# ---- one rank, measured in its own process ----------------------------------------------------

def memory() -> tuple[float, float]:
    """(RSS, PSS) of this process in MB."""
    def field(path: str, name: str) -> float:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")
    return field("/proc/self/status", "VmRSS"), field("/proc/self/smaps_rollup", "Pss")


def before_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """cmunet/data/splits.py and stream.py as they were at commit BEFORE."""
    found = []
    for name in ("splits", "stream"):
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:cmunet/data/{name}.py"],
                                capture_output=True, text=True, check=True).stdout
        module = types.ModuleType(f"before_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(source, f"{BEFORE[:7]}:cmunet/data/{name}.py", "exec"), module.__dict__)
        found.append(module)
    return found[0], found[1]


def worker_pieces(owned, stream, epoch: int, slot: int, skip: int = 0) -> list:
    """The pieces worker ``slot`` reads in ``epoch`` (as ShardStream._epoch works them out), and
    the number of its samples it skips when the epoch resumes after ``skip`` batches."""
    rank, world, per_epoch = stream.layout()
    first = epoch * per_epoch
    counts = [owned(s, WORKERS, first, first + per_epoch) for s in range(WORKERS)]
    begin = (epoch * world + rank) * per_epoch * BATCH + sum(counts[:slot]) * BATCH
    pieces = stream._pieces(begin, begin + counts[slot] * BATCH)
    return pieces, owned(slot, WORKERS, first, first + skip) * BATCH


def wanted(stream, piece) -> set[str]:
    """The keys a worker looks for in the shard of ``piece``."""
    source, _, selected = piece
    index = getattr(stream.sources[source], "index", None)
    return set(selected) if index is None else set(index.keys_of(selected))


def measure(kind: str, folder: str, rank: int) -> dict:
    import torch  # noqa: F401 (a training process has it loaded already: not counted)

    if kind == "before":
        splits_mod, stream_mod = before_modules()
    else:
        from cmunet.data import splits as splits_mod
        from cmunet.data import stream as stream_mod
    base = memory()[0]
    start = time.perf_counter()
    manifest = stream_mod.load_manifest(folder)
    splits = splits_mod.load_splits(os.path.join(folder, "splits.json"))
    resolve = getattr(splits_mod, "pool_ids", splits_mod.pool_keys)
    stream = stream_mod.ShardStream(folder, resolve(splits, "pretrain", RATIO), BATCH,
                                    rank=rank, world_size=WORLD, seed=0)
    loaded = time.perf_counter() - start
    added = memory()[0] - base
    ordered, resumed = [], []
    for _ in range(REPEATS):  # the best of a few: the machine is shared
        type(stream)._units.cache_clear()
        start = time.perf_counter()
        epoch = [worker_pieces(stream_mod._owned, stream, 1, slot)[0] for slot in range(WORKERS)]
        ordered.append(time.perf_counter() - start)
        start = time.perf_counter()
        half = stream.layout()[2] // 2
        for slot in range(WORKERS):
            pieces, skip = worker_pieces(stream_mod._owned, stream, 3, slot, half)
            position = 0  # the first piece a worker reads after the skipped samples
            for piece in pieces:
                position += len(piece[2])
                if position > skip:
                    wanted(stream, piece)
                    break
        resumed.append(time.perf_counter() - start)
    after = [_walk(stream, epoch[slot]) for slot in range(WORKERS)] + [memory()]
    del manifest
    return {"base_mb": base, "load_s": loaded, "added_mb": added, "order_s": min(ordered),
            "resume_s": min(resumed),
            "rss_mb": max(a[0] for a in after), "pss_mb": max(a[1] for a in after)}


def _walk(stream, pieces) -> tuple[float, float]:
    """(RSS, PSS) of a forked worker after walking ``pieces``, as a loader worker would."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        for piece in pieces:
            wanted(stream, piece)
        os.write(write, json.dumps(memory()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    return tuple(result)


def measured(kind: str, folder: Path) -> dict:
    """Rank 0's figures (the largest of both ranks after the epoch), each rank in a new process."""
    ranks = []
    for rank in range(WORLD):
        out = subprocess.run([sys.executable, __file__, "--measure", kind, str(folder), str(rank)],
                             capture_output=True, text=True, env={**os.environ,
                                                                  "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(f"measuring {kind} {folder} failed:\n{out.stderr[-3000:]}")
        ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**ranks[0], "rss_mb": max(r["rss_mb"] for r in ranks),
            "pss_mb": max(r["pss_mb"] for r in ranks)}


# ---- a real set, streamed ---------------------------------------------------------------------

def write_tiny_set(folder: Path, n: int) -> None:
    """``n`` 16-px frames (100 a patient) in shards of 100, with index, splits and manifest."""
    import io
    import tarfile

    from cmunet.data.index import FORMAT, INDEX, SampleIndex, file_sha256, write_json
    from cmunet.data.png import encode_png
    from cmunet.data.splits import SampleInfo, make_splits, save_splits

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records, shards = [], []
    for start in range(0, n, 100):
        name = f"shard-{len(shards):06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n, start + 100)):
                key, patient = f"f{i:07d}", f"p{i // 100:05d}"
                for suffix, data in (("image.png", encode_png(rng.integers(0, 255, (16, 16),
                                                                           dtype=np.uint8))),
                                     ("sample.json", json.dumps({"patient": patient}).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                records.append({"key": key, "patient": patient, "labelled": False,
                                "shard": name, "mean": 127.0, "std": 73.0})
        shards.append({"name": name, "count": min(n, start + 100) - start,
                       "sha256": file_sha256(folder / name)})
    index = SampleIndex.from_records(records, [s["name"] for s in shards])
    splits = make_splits([SampleInfo(r["key"], r["patient"], False) for r in records], seed=0)
    save_splits(splits, folder / "splits.json")
    write_json(folder / "manifest.json", {
        "format": FORMAT, "count": n, "labelled": 0, "patients": len(index["patients"]),
        "size": 16, "dtype": "uint8", "mean": 127.0, "std": 73.0, "shards": shards,
        "index": {"name": INDEX, "sha256": index.save(folder / INDEX)}})


def stream_rank(source: str, rank: int) -> dict:
    """One rank's epoch of the ``train`` pool of ``source`` with 2 loader workers."""
    import psutil

    from cmunet.data import location
    from cmunet.data.splits import load_splits, pool_ids
    from cmunet.data.stream import ShardStream, make_loader

    me = psutil.Process()

    def rss() -> list[float]:  # this rank's, then each worker's, MB
        return [p.memory_info().rss / 2**20 for p in [me, *me.children()]]
    start = time.perf_counter()
    ids = pool_ids(load_splits(location.join(source, "splits.json")), "train")
    stream = ShardStream(source, ids, BATCH, rank=rank, world_size=WORLD, seed=0, epochs=1)
    keys, first, first_rss = [], None, None
    for batch in make_loader(stream, WORKERS):
        keys += batch["key"]
        if first is None:
            first, first_rss = time.perf_counter() - start, rss()
        last_rss = rss()
    return {"first_batch_s": first, "seconds": time.perf_counter() - start, "keys": keys,
            "rss_first": first_rss, "rss_last": last_rss, "expected": len(ids),
            "per_rank": stream.layout()[2] * BATCH}


def streamed(source: str, env: dict) -> dict:
    """Both ranks at once, each in its own process; checks what they delivered together."""
    runs = [subprocess.Popen([sys.executable, __file__, "--stream-rank", source, str(rank)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
            for rank in range(WORLD)]
    ranks = []
    for run in runs:
        out, err = run.communicate()
        if run.returncode:
            raise RuntimeError(f"streaming {source} failed:\n{err[-3000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    seen = Counter(k for r in ranks for k in r["keys"])
    delivered = sum(seen.values())
    exact = (len(seen) == ranks[0]["expected"] and delivered == WORLD * ranks[0]["per_rank"]
             and max(seen.values()) <= 2)
    return {"first_batch_s": max(r["first_batch_s"] for r in ranks),
            "seconds": max(r["seconds"] for r in ranks), "distinct": len(seen),
            "delivered": delivered, "expected": ranks[0]["expected"], "exact": exact,
            "rss_first": max(max(r["rss_first"][1:] or [0]) for r in ranks),
            "rss_last": max(max(r["rss_last"][1:] or [0]) for r in ranks),
            "rank_rss_first": max(r["rss_first"][0] for r in ranks),
            "rank_rss_last": max(r["rss_last"][0] for r in ranks)}


def stream_part(n: int, tmp: Path) -> list[tuple[str, dict]]:
    import boto3
    from moto.server import ThreadedMotoServer

    from cmunet.data import location

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    folder = tmp / f"tiny-{n}"
    write_tiny_set(folder, n)
    rows = [("folder", streamed(str(folder), {}))]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
               "CMUNET_CACHE": str(tmp / "cache")}
        os.environ.update(env)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        location.upload(folder, "s3://bench/tiny", log=lambda *_: None)
        rows.append(("moto S3", streamed("s3://bench/tiny", env)))
    finally:
        server.stop()
    return rows


# ---- the table ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7])
    parser.add_argument("--before", type=float, default=1e6, help="0: leave format 1 out")
    parser.add_argument("--stream", type=float, default=0, help="frames of the real set; 0: none")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    rows, streams = [], []
    with tempfile.TemporaryDirectory(prefix="cmunet-scale-") as tmp:
        tmp = Path(tmp)
        for n in sorted({int(s) for s in args.sizes} | ({int(args.before)} - {0})):
            c = columns_of(n)
            splits = split_patients(c)
            if n in {int(s) for s in args.sizes}:
                write_set(tmp / f"v2-{n}", c, splits)
                size = sum(p.stat().st_size for p in (tmp / f"v2-{n}").iterdir())
                rows.append((n, "index.npz (this version)", size, measured("new", tmp / f"v2-{n}")))
            if n == int(args.before):
                write_old_set(tmp / f"v1-{n}", c, splits)
                size = sum(p.stat().st_size for p in (tmp / f"v1-{n}").iterdir())
                rows.append((n, f"format 1 JSON, code of {BEFORE[:7]} (before)", size,
                             measured("before", tmp / f"v1-{n}")))
                rows.append((n, "format 1 JSON, this version's reader", size,
                             measured("compat", tmp / f"v1-{n}")))
            del c
        if args.stream:
            streams = stream_part(int(args.stream), tmp)
    table = [f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "",
             "| samples | metadata | files MB | load s | RSS before / added MB | epoch order s | "
             "resume s | 2x2 after epoch: max RSS / PSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, what, size, m in rows:
        table.append(f"| {n:.0e} | {what} | {size / 1e6:.0f} | {m['load_s']:.2f} | "
                     f"{m['base_mb']:.0f} / {m['added_mb']:.0f} | {m['order_s']:.3f} | "
                     f"{m['resume_s']:.3f} | "
                     f"{m['rss_mb']:.0f} / {m['pss_mb']:.0f} |")
    if streams:
        n = int(args.stream)
        table += ["", f"streaming {n} frames of 16 px in {n // 100} shards, 2 ranks x 2 workers, "
                  f"batch {BATCH}, one epoch:", "",
                  "| from | first batch s | epoch s | delivered / expected (distinct) | exact | "
                  "worker RSS first -> last MB | rank RSS first -> last MB |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for where, s in streams:
            table.append(f"| {where} | {s['first_batch_s']:.2f} | {s['seconds']:.1f} | "
                         f"{s['delivered']} / {s['expected']} ({s['distinct']}) | "
                         f"{'yes' if s['exact'] else 'NO'} | {s['rss_first']:.0f} -> "
                         f"{s['rss_last']:.0f} | {s['rank_rss_first']:.0f} -> "
                         f"{s['rank_rss_last']:.0f} |")
    table += ["", f"wall time {time.perf_counter() - began:.0f} s"]
    report = "\n".join(table)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return {"rows": [(n, what, size, m) for n, what, size, m in rows], "streams": streams}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif sys.argv[1:2] == ["--stream-rank"]:
        result = stream_rank(sys.argv[2], int(sys.argv[3]))
        print(json.dumps(result))
    else:
        main()
