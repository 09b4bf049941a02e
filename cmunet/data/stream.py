"""Loading shards: a streaming WebDataset pipeline for training, a map-style set for small labelled sets.

Streaming (:class:`ShardStream`): every rank and every DataLoader worker reads its own stream.
With ``resampled=True`` (training) each worker draws shards at random with replacement, seeded by
(seed, epoch, rank, worker), so the stream never ends and :func:`make_loader` cuts an epoch at a
fixed number of batches per rank (``with_epoch``): ranks stay in step whatever the shard count.
Without resampling (one pass, e.g. evaluation) shards are split between ranks, then workers, so
each sample is read once. Samples are selected by key (from ``splits.json``) before decoding,
shuffled in a buffer, decoded from PNG (16-bit kept: WebDataset's own decoders would cut it to
8 bits), z-scored with the manifest's statistics and batched. Only ``image.png``, ``mask.png`` and
``sample.json`` are ever decoded; nothing is unpickled.

To resume mid-epoch, set ``epoch`` and ``skip_batches``: each worker drops exactly the samples
of the batches the loader had already delivered, before decoding them.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

# transform(image float32 (H, W), mask bool (H, W) or None, rng) -> (image, mask)
Transform = Callable[[np.ndarray, np.ndarray | None, np.random.Generator],
                     tuple[np.ndarray, np.ndarray | None]]


def load_manifest(shards: str | Path) -> dict:
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {shards} a folder written by "
                                "tools/shard.py?")
    return json.loads(path.read_text())


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> 2-D uint8/uint16 array (16-bit images keep their 16 bits)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I;16"):
            return np.asarray(img, dtype=np.uint16)
        return np.asarray(img)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from torch.distributed, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _Decoder:
    """Raw WebDataset sample -> (key, z-scored float32 image, bool mask or None)."""

    def __init__(self, mean: float, std: float, with_masks: bool):
        self.mean, self.std, self.with_masks = mean, std, with_masks

    def __call__(self, raw: dict) -> tuple[str, np.ndarray, np.ndarray | None]:
        key = raw["__key__"]
        image = (decode_png(raw["image.png"]).astype(np.float32) - self.mean) / self.std
        mask = None
        if self.with_masks:
            if "mask.png" not in raw:
                raise ValueError(f"sample {key} has no mask; select labelled samples only")
            mask = decode_png(raw["mask.png"]) > 0
        return key, image, mask


def _sample(key: str, image: np.ndarray, mask: np.ndarray | None,
            transform: Transform | None, rng: np.random.Generator | None) -> dict:
    """Apply the transform and lay the arrays out as (1, H, W) for batching."""
    if transform is not None:
        image, mask = transform(image, mask, rng)
    sample = {"key": key, "image": np.ascontiguousarray(image[None], dtype=np.float32)}
    if mask is not None:
        sample["mask"] = np.ascontiguousarray(mask[None], dtype=np.uint8)
    return sample


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples],
             "image": torch.from_numpy(np.stack([s["image"] for s in samples]))}
    if "mask" in samples[0]:
        batch["mask"] = torch.from_numpy(np.stack([s["mask"] for s in samples]))
    return batch


class ShardStream(IterableDataset):
    """A stream of batches from the shards in ``shards`` whose keys are in ``keys`` (None = all),
    plus, optionally, ``extra`` (folder, keys) sources mixed in (e.g. unlabeled archives or
    synthetic angiograms for pre-training); each folder is z-scored with its own statistics."""

    def __init__(self, shards: str | Path, keys: Iterable[str] | None, batch_size: int, *,
                 extra: Sequence[tuple[str | Path, Iterable[str] | None]] = (),
                 seed: int = 0, resampled: bool = True, shuffle_buffer: int = 256,
                 with_masks: bool = False, transform: Transform | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.urls: list[str] = []
        self.source_of: dict[str, tuple[set[str], _Decoder]] = {}  # shard url -> keys, decoder
        for folder, selection in [(shards, keys), *extra]:
            manifest = load_manifest(folder)
            chosen = _selected(folder, manifest, selection)
            decoder = _Decoder(manifest["mean"], manifest["std"], with_masks)
            shard_of = {s["key"]: s["shard"] for s in manifest["samples"]}
            for name in sorted({shard_of[k] for k in chosen}):  # skip shards with nothing chosen
                url = str(Path(folder) / name)
                self.urls.append(url)
                self.source_of[url] = (chosen, decoder)
        self.keys = set().union(*(chosen for chosen, _ in self.source_of.values()))
        self.batch_size, self.seed, self.resampled = batch_size, seed, resampled
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        seed = _seed(self.seed, self.epoch, rank, worker)
        if self.resampled:
            shard_rng = random.Random(seed)
            urls = iter(lambda: {"url": shard_rng.choice(self.urls)}, None)
        else:
            mine = self.urls[rank::world][worker::workers]
            if not mine:
                raise ValueError(f"rank {rank} worker {worker} has no shard: {len(self.urls)} "
                                 f"shards for {world} ranks x {workers} workers; use fewer "
                                 "workers or smaller shards")
            urls = iter([{"url": u} for u in mine])
        raw = wds.tarfile_to_samples()(urls)
        raw = (s for s in raw if s["__key__"] in self.source_of[s["__url__"]][0])
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              rng=random.Random(seed + 1))(raw)
        skip = len(range(worker, self.skip_batches, workers)) * self.batch_size
        batch: list[dict] = []
        for index, sample in enumerate(raw):
            if index < skip:
                continue
            rng = np.random.default_rng(_seed(seed, index)) if self.transform else None
            decoder = self.source_of[sample["__url__"]][1]
            batch.append(_sample(*decoder(sample), self.transform, rng))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and not self.resampled:
            yield collate(batch)


def _selected(folder: str | Path, manifest: dict, keys: Iterable[str] | None) -> set[str]:
    known = {s["key"] for s in manifest["samples"]}
    chosen = set(known) if keys is None else set(keys)
    missing = sorted(chosen - known)
    if missing:
        raise ValueError(f"{len(missing)} selected keys are not in {folder} "
                         f"(e.g. {', '.join(missing[:3])}): splits and shards disagree")
    if not chosen:
        raise ValueError(f"no sample of {folder} is selected")
    return chosen


def make_loader(stream: ShardStream, num_workers: int, steps_per_epoch: int | None = None,
                pin_memory: bool = False) -> wds.WebLoader:
    """A DataLoader over the stream; with ``steps_per_epoch`` every epoch has exactly that many
    batches on every rank (the stream must then be resampled)."""
    if steps_per_epoch is not None and not stream.resampled:
        raise ValueError("a fixed epoch length needs a resampled stream")
    loader = wds.WebLoader(stream, batch_size=None, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=False,
                           prefetch_factor=2 if num_workers else None)
    return loader.with_epoch(steps_per_epoch) if steps_per_epoch is not None else loader


class InMemorySet(Dataset):
    """The selected samples of a shard folder, decoded once and held in memory (small labelled
    sets: fine-tuning pools, validation folds, test splits)."""

    def __init__(self, shards: str | Path, keys: Iterable[str], *, with_masks: bool = True,
                 transform: Transform | None = None, seed: int = 0):
        manifest = load_manifest(shards)
        wanted = list(dict.fromkeys(keys))
        selected = set(wanted)
        by_key = {s["key"]: s for s in manifest["samples"]}
        missing = [k for k in wanted if k not in by_key]
        if missing:
            raise ValueError(f"{len(missing)} keys are not in {shards} (e.g. {missing[0]})")
        urls = sorted({str(Path(shards) / by_key[k]["shard"]) for k in wanted})
        raw = {s["__key__"]: s for s in wds.tarfile_to_samples()(iter({"url": u} for u in urls))
               if s["__key__"] in selected}
        decoder = _Decoder(manifest["mean"], manifest["std"], with_masks)
        self.items = [decoder(raw[k]) for k in wanted]
        self.spacing = [by_key[k].get("spacing") for k in wanted]
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(_seed(self.seed, self.epoch, index)) if self.transform else None
        return _sample(*self.items[index], self.transform, rng)
