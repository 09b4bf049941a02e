"""The embeddings of a pool, computed chunk by chunk into ``OUT/embeddings/`` and resumed.

``embeddings.json`` names what the chunks are embeddings of (a fingerprint of the encoder's
weights, the shard set, the pool's keys and the chunk size); ``chunk-NNNNNN.npz`` holds the keys
and the float32 embeddings of ``chunk_size`` consecutive frames of the pool. Each file is written
to a temporary name and renamed, so a killed run leaves only whole chunks, and a rerun embeds
only the chunks that are missing. Only the N x D embedding matrix is held in memory, never the
images of more than a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmunet.data import location
from cmunet.log import logger
from cmunet.models.unet import Encoder
from cmunet.selection.embedding import embed_keys, frame_batches
from cmunet.training.precision import default_device

LOG = logger(__name__)
FORMAT = "cmunet-embeddings/1"
INDEX = "embeddings.json"


@dataclass
class Embedded:
    keys: list[str]  # the frames, in the order of the rows
    vectors: np.ndarray  # (len(keys), D) float32 unit embeddings

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """The embeddings of ``keys``, in that order."""
        index = {key: i for i, key in enumerate(self.keys)}
        missing = [key for key in keys if key not in index]
        if missing:
            raise ValueError(f"{len(missing)} keys were not embedded (e.g. {missing[0]})")
        return self.vectors[[index[key] for key in keys]]


def chunk_path(folder: Path, number: int) -> Path:
    return folder / f"chunk-{number:06d}.npz"


def embed_pool(encoder: Encoder, shards: str, keys: Sequence[str], folder: str | Path,
               batch_size: int = 32, chunk_size: int = 1024, num_workers: int = 0,
               device: torch.device | None = None, log: Callable[[str], None] = LOG.info,
               reader: Callable[..., Iterable[dict]] = frame_batches) -> Embedded:
    """The embeddings of the frames ``keys`` of ``shards``: chunks already in ``folder`` (of the
    same encoder, shards and keys) are read, the others embedded and written there. ``reader``
    (shards, keys, batch_size, num_workers) gives a chunk's batches."""
    if not keys:
        raise ValueError(f"no frames of {location.public(shards)} to embed")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".chunk-*.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    starts = range(0, len(keys), chunk_size)
    claim(folder / INDEX, {"format": FORMAT, "frames": len(keys), "chunk_size": chunk_size,
                           "chunks": len(starts),
                           "fingerprint": fingerprint(encoder, shards, keys, chunk_size)})
    device = device or default_device()
    encoder.to(device).eval()
    matrix, reused = None, 0
    for number, start in enumerate(starts):
        wanted, path = list(keys[start:start + chunk_size]), chunk_path(folder, number)
        vectors = read_chunk(path, wanted, log)
        if vectors is None:
            began = time.perf_counter()
            vectors = embed_keys(encoder, reader(shards, wanted, batch_size, num_workers),
                                 wanted, device)
            write_chunk(path, wanted, vectors)
            log(f"embedded chunk {number + 1}/{len(starts)}: {len(wanted)} frames "
                f"({time.perf_counter() - began:.1f} s)")
        else:
            reused += 1
        if matrix is None:
            matrix = np.empty((len(keys), vectors.shape[1]), dtype=np.float32)
        matrix[start:start + len(wanted)] = vectors
    if reused:
        log(f"{reused} of {len(starts)} chunks were embedded by an earlier run: {folder}")
    return Embedded(list(keys), matrix)


def fingerprint(encoder: Encoder, shards: str, keys: Sequence[str], chunk_size: int) -> str:
    """A digest of what the chunks depend on: the encoder's weights, the shard set, the keys."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([location.absolute(shards), list(keys), chunk_size]).encode())
    return digest.hexdigest()


def claim(path: Path, index: dict) -> None:
    """Write ``index`` to ``path``, or check that the one there is the same."""
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = None
        if found != index:
            raise ValueError(f"{path} describes embeddings of other inputs (another export or "
                             "seed of export=none, shard set, pool or chunk_size); choose another "
                             f"out, or delete {path.parent} to embed again")
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, path)


def read_chunk(path: Path, keys: Sequence[str], log: Callable[[str], None]) -> np.ndarray | None:
    """The embeddings in ``path`` if it holds exactly ``keys``, else None (embed it again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["keys"].tolist() == list(keys):
                return data["vectors"].astype(np.float32)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log(f"warning: {path} cannot be read ({err}); embedding its frames again")
        return None
    log(f"warning: {path} holds other frames than its chunk; embedding them again")
    return None


def write_chunk(path: Path, keys: Sequence[str], vectors: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        np.savez(f, keys=np.asarray(keys, dtype=str), vectors=vectors.astype(np.float32))
    os.replace(tmp, path)
