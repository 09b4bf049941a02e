"""Loading shards: a streaming WebDataset pipeline for training, a map-style set for small labelled sets.

Streaming (:class:`ShardStream`): an **epoch is a pass**. Every selected sample is delivered once
per epoch by the whole job (all ranks and DataLoader workers together), in an order that is
seeded and changes every epoch:

1. The epoch's sequence: the selected samples of every folder, grouped by shard (tar order), the
   shards in an order drawn from (seed, epoch). An extra folder joins with a weight: 1 = each of
   its samples once per epoch (its share of the stream is its share of the samples), 2 = twice,
   0.25 = a quarter of them, drawn anew every epoch. The sequence is built from integer arrays
   of sample ids (rows of each folder's memory-mapped :class:`~cmunet.data.index.SampleIndex`),
   never from per-sample Python objects: a set of millions of samples costs a process megabytes.
2. Each rank takes a contiguous, equal part of the sequence: ``batches_per_epoch`` batches (by
   default the sequence length over world x batch, rounded up, so the last few positions wrap to
   the start of the sequence and a handful of samples are seen twice). Every rank yields the
   same number of batches, so ranks stay in step.
3. A rank's batches go round robin to its DataLoader workers (the loader asks them in that
   order). Each worker reads only the shards of its own contiguous part, shuffles it in a buffer
   that starts at one batch and grows to ``shuffle_buffer``, and decodes only what it yields.

A worker's stream runs from ``epoch``/``skip_batches`` to ``epochs`` (None: endless) without
stopping between epochs, so one loader iterator serves a whole job and the workers (and their
buffers) live across epoch boundaries. With ``batches_per_epoch`` smaller than a pass, epochs are
consecutive slices of the passes (each pass with its own order). To resume mid-epoch, set
``epoch`` and ``skip_batches``: each worker drops exactly the samples of the batches already
delivered before decoding them; the result is identical to the uninterrupted run for the same
number of workers.

A shard set is a local folder or a URL (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``): see
:mod:`cmunet.data.location`. Samples are decoded from PNG here (16-bit kept: WebDataset's own
decoders would cut it to 8 bits) and z-scored with each folder's manifest statistics. Only
``image.png``, ``mask.png`` and ``sample.json`` are ever read; nothing is unpickled.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from cmunet.data import location
from cmunet.data.index import SampleIndex, load_manifest
from cmunet.data.png import decode_png

# transform(image float32 (H, W), mask bool (H, W) or None, rng) -> (image, mask)
Transform = Callable[[np.ndarray, np.ndarray | None, np.random.Generator],
                     tuple[np.ndarray, np.ndarray | None]]


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
        if "image.png" not in raw:
            raise ValueError(f"{_where(raw)} has no image.png (members: "
                             f"{', '.join(k for k in raw if not k.startswith('__'))}); "
                             "rebuild the shards with tools/shard.py")
        image = decode_png(raw["image.png"]).astype(np.float32)
        image -= self.mean  # in place: one 512² float array per sample instead of three
        image /= self.std
        mask = None
        if self.with_masks:
            if "mask.png" not in raw:
                raise ValueError(f"{_where(raw)} has no mask; select labelled samples only")
            mask = decode_png(raw["mask.png"]) > 0
        return key, image, mask


def _where(raw: dict) -> str:
    """The shard and key of a raw sample, for error messages (built only when one is raised)."""
    return f"{location.public(raw.get('__url__', 'shard'))}: sample {raw['__key__']}"


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
    if "source" in samples[0]:
        batch["source"] = [s["source"] for s in samples]
    return batch


@dataclass(frozen=True, eq=False)
class _Source:
    """One shard folder's part of the stream."""
    folder: str
    decoder: _Decoder
    index: SampleIndex
    ids: np.ndarray  # the selected sample ids, ascending (= shard, then tar order)
    runs: tuple[tuple[int, int, int], ...]  # (shard, lo, hi): ids[lo:hi] lie in that shard
    weight: float  # visits of each sample per epoch (fractions: a random subset each epoch)
    size: int | None = None  # side of the images in pixels (the manifest's size)

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def per_epoch(self) -> int:
        return round(self.weight * self.count)

    def url(self, shard: int) -> str:
        return location.join(self.folder, self.index["shards"][shard].decode())


# (source index, shard number, sample ids): a run of consecutive samples of one shard
_Unit = tuple[int, int, np.ndarray]


class ShardStream(IterableDataset):
    """Batches from the shards in ``shards`` whose keys are in ``keys`` (None = all; an integer
    array: sample ids, as :func:`cmunet.data.splits.pool_ids` gives), plus,
    optionally, ``extra`` (folder, keys) sources (unlabelled archives, synthetic angiograms),
    each z-scored with its own statistics and joining with its weight in ``extra_weights``
    (default 1: in proportion to its number of samples; ``weight`` is the main folder's). See
    the module docstring."""

    def __init__(self, shards: str | Path, keys: Iterable[str] | np.ndarray | None,
                 batch_size: int, *,
                 extra: Sequence[tuple[str | Path, Iterable[str] | np.ndarray | None]] = (),
                 extra_weights: Sequence[float] | None = None, weight: float = 1.0,
                 seed: int = 0, shuffle_buffer: int = 256, with_masks: bool = False,
                 transform: Transform | None = None, rank: int | None = None,
                 world_size: int | None = None, batches_per_epoch: int | None = None,
                 epochs: int | None = None, with_source: bool = False):
        super().__init__()
        weights = [1.0] * len(extra) if extra_weights is None else [float(w) for w in extra_weights]
        if len(weights) != len(extra) or any(not w >= 0 for w in weights):
            raise ValueError(f"extra_weights {list(weights)} must give one weight >= 0 per "
                             f"extra folder ({len(extra)})")
        self.sources = [_source(folder, selection, w, with_masks) for (folder, selection), w
                        in zip([(shards, keys), *extra], [weight, *weights])]
        self.epoch_size = sum(s.per_epoch for s in self.sources)
        if self.epoch_size == 0:
            raise ValueError(f"no sample of {shards} or its extra folders is selected")
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, max(1, shuffle_buffer)
        self.transform, self.with_source = transform, with_source
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = batches_per_epoch  # per rank; None = one pass, rounded up
        self.epoch, self.skip_batches = 0, 0  # where to start (resume)
        self.epochs = epochs  # where to stop (None: endless)
        self.remote = location.remote_config()  # the job's time-outs, for the loader workers

    @property
    def keys(self) -> set[str]:
        """Every selected key of every source (built when asked for: a set of strings)."""
        return {k for s in self.sources for k in s.index.keys_of(s.ids)}

    def layout(self) -> tuple[int, int, int]:
        """(rank, world size, batches per rank and epoch) as the workers will see them."""
        rank, world = rank_and_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        per_rank = self.batches_per_epoch or math.ceil(self.epoch_size /
                                                       (world * self.batch_size))
        return rank, world, per_rank

    def __iter__(self):
        location.configure(self.remote)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world, per_epoch = self.layout()
        start = self.epoch * per_epoch + self.skip_batches  # the rank's batch counter
        stop = None if self.epochs is None else self.epochs * per_epoch
        # the loader asks its workers in turn, beginning with worker 0: batch g is made by the
        # worker whose slot is g % workers
        slot = (worker + start) % workers
        epoch = self.epoch
        while stop is None or epoch * per_epoch < stop:
            first, end = epoch * per_epoch, (epoch + 1) * per_epoch
            lo, hi = max(first, start), end if stop is None else min(end, stop)
            yield from self._epoch(epoch, rank, world, per_epoch, slot, workers,
                                   own_before=_owned(slot, workers, first, lo),
                                   own_until=_owned(slot, workers, first, hi))
            epoch += 1

    def _epoch(self, epoch: int, rank: int, world: int, per_epoch: int, slot: int, workers: int,
               own_before: int, own_until: int):
        """This worker's batches of one epoch, from its ``own_before``-th to ``own_until``-th."""
        if own_until <= own_before:
            return
        first = epoch * per_epoch
        counts = [_owned(s, workers, first, first + per_epoch) for s in range(workers)]
        per_rank = per_epoch * self.batch_size
        begin = (epoch * world + rank) * per_rank + sum(counts[:slot]) * self.batch_size
        pieces = self._pieces(begin, begin + counts[slot] * self.batch_size)
        seed = _seed(self.seed, epoch, rank, slot, workers)
        raw = _buffer_shuffle(self._read(pieces), self.shuffle_buffer,
                              min(self.batch_size, self.shuffle_buffer), random.Random(seed))
        batch: list[dict] = []
        skip = own_before * self.batch_size
        end = own_until * self.batch_size
        for index, (source, sample) in enumerate(raw):
            if index < skip:
                continue
            if index >= end:
                break
            rng = np.random.default_rng(_seed(seed, index)) if self.transform else None
            item = _sample(*self.sources[source].decoder(sample), self.transform, rng)
            if self.with_source:
                item["source"] = source
            batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []

    # ---- the sequence -------------------------------------------------------------------------
    def _pieces(self, begin: int, end: int) -> list[_Unit]:
        """The units covering positions [begin, end) of the job's sequence (one rank's part of
        one epoch). When an epoch spans at least a pass, epoch e's positions walk pass e and the
        few past its end wrap to its start; shorter epochs walk through pass after pass."""
        _, world, per_rank = self.layout()
        span, n = per_rank * self.batch_size * world, self.epoch_size  # positions of an epoch
        pieces: list[_Unit] = []
        while begin < end:
            if span >= n:
                pass_index, offset = divmod(begin, span)
                offset %= n
            else:
                pass_index, offset = divmod(begin, n)
            take = min(end - begin, n - offset)
            pieces += _cut(self._units(pass_index), offset, offset + take)
            begin += take
        return pieces

    @functools.lru_cache(maxsize=2)
    def _units(self, pass_index: int) -> list[_Unit]:
        """Pass ``pass_index``: every source's samples (weighted), shard by shard, shards in an
        order drawn from (seed, pass)."""
        rng = np.random.default_rng(_seed(self.seed, pass_index, 0x5EED))
        units: list[_Unit] = []
        for index, source in enumerate(self.sources):
            whole, part = divmod(source.per_epoch, source.count)
            units += [(index, shard, source.ids[lo:hi]) for _ in range(whole)
                      for shard, lo, hi in source.runs]
            if part:  # a random subset of the folder, kept in shard and tar order
                chosen = np.zeros(source.count, dtype=bool)
                chosen[rng.choice(source.count, part, replace=False)] = True
                units += [(index, shard, source.ids[lo:hi][chosen[lo:hi]])
                          for shard, lo, hi in source.runs if chosen[lo:hi].any()]
        return [units[i] for i in rng.permutation(len(units))]

    def _read(self, pieces: list[_Unit]):
        """(source index, raw sample) of each piece's samples, each shard read once per piece."""
        for source, shard, ids in pieces:
            url = self.sources[source].url(shard)
            wanted = set(self.sources[source].index.keys_of(ids))
            found = 0
            samples = location.tar_samples(url)
            try:
                for sample in samples:
                    if sample["__key__"] in wanted:
                        yield source, sample
                        found += 1
                        if found == len(wanted):
                            break
            finally:
                samples.close()
            if found < len(wanted):
                raise _lacks(url, len(wanted) - found)


def _lacks(url: str, count: int) -> location.ReadError:
    return location.ReadError(url, f"lacks {count} of the samples its manifest lists: the shard "
                                   "set is damaged; rebuild it with tools/shard.py")


def _owned(slot: int, workers: int, first: int, upto: int) -> int:
    """How many of the batch numbers first..upto-1 fall to ``slot`` (those with g % workers)."""
    return len(range(first + (slot - first) % workers, upto, workers)) if upto > first else 0


def _cut(units: list[_Unit], begin: int, end: int) -> list[_Unit]:
    """The parts of ``units`` (laid end to end) that cover positions [begin, end)."""
    pieces, position = [], 0
    for source, shard, ids in units:
        lo, hi = max(begin - position, 0), min(end - position, len(ids))
        if lo < hi:
            pieces.append((source, shard, ids[lo:hi]))
        position += len(ids)
        if position >= end:
            break
    return pieces


def _buffer_shuffle(items, size: int, initial: int, rng: random.Random):
    """Shuffle a stream in a buffer that starts yielding at ``initial`` items and grows by one
    item per yield up to ``size``; what is left is drained in random order at the end."""
    buffer: list = []
    fill = initial
    for item in items:
        buffer.append(item)
        if len(buffer) >= fill:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
            fill = min(size, fill + 1)
    rng.shuffle(buffer)
    yield from buffer


def _source(folder: str | Path, keys: Iterable[str] | np.ndarray | None, weight: float,
            with_masks: bool) -> _Source:
    manifest = load_manifest(folder)
    index = SampleIndex.open(folder, manifest)
    ids = _selected(folder, index, keys)
    offsets = index["shard_offsets"]
    bounds = np.searchsorted(ids, offsets.astype(ids.dtype))  # shard s: ids[bounds[s]:bounds[s+1]]
    runs = tuple((s, int(lo), int(hi)) for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
                 if lo < hi)
    return _Source(str(folder), _Decoder(manifest["mean"], manifest["std"], with_masks), index,
                   ids, runs, weight, manifest.get("size"))


def _selected(folder: str | Path, index: SampleIndex,
              keys: Iterable[str] | np.ndarray | None) -> np.ndarray:
    """The selected sample ids, ascending and each once."""
    if keys is None:
        ids = np.arange(len(index))
    elif isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        ids = keys if np.all(keys[1:] > keys[:-1]) else np.unique(keys)  # pool_ids: ascending
        if len(ids) and (ids[0] < 0 or ids[-1] >= len(index)):
            raise ValueError(f"sample ids outside 0..{len(index) - 1} are selected in {folder}")
    else:
        ids, missing = index.find(keys)
        if missing:
            raise ValueError(f"{len(missing)} selected keys are not in {folder} "
                             f"(e.g. {', '.join(missing[:3])}): splits and shards disagree")
        ids = np.unique(ids)
    if not len(ids):
        raise ValueError(f"no sample of {folder} is selected")
    return ids.astype(np.int32)  # 4 bytes a selected sample (a set holds < 2**31)


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False,
                worker_init_fn=None) -> DataLoader:
    """A DataLoader over the stream. Take one iterator for the whole job: the stream does not
    stop between epochs, so its workers (and their shuffle buffers) live from the first batch to
    the last instead of restarting every epoch."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers else None, worker_init_fn=worker_init_fn)


class InMemorySet(Dataset):
    """The selected samples of a shard folder, decoded once and held in memory (small labelled
    sets: fine-tuning pools, validation folds, test splits)."""

    def __init__(self, shards: str | Path, keys: Iterable[str], *, with_masks: bool = True,
                 transform: Transform | None = None, seed: int = 0):
        manifest = load_manifest(shards)
        index = SampleIndex.open(shards, manifest)
        wanted = list(dict.fromkeys(keys))
        ids, missing = index.find(wanted)
        if missing:
            raise ValueError(f"{len(missing)} keys are not in {shards} (e.g. {missing[0]})")
        names = index.shard_names()
        shard_of = [names[s] for s in index.shard_of(ids).tolist()]
        urls = [location.join(shards, name) for name in sorted(set(shard_of))]
        selected = set(wanted)
        raw = {s["__key__"]: s for u in urls for s in location.tar_samples(u)
               if s["__key__"] in selected}
        lacking = [name for k, name in zip(wanted, shard_of) if k not in raw]
        if lacking:
            raise _lacks(location.join(shards, lacking[0]), lacking.count(lacking[0]))
        decoder = _Decoder(manifest["mean"], manifest["std"], with_masks)
        self.items = [decoder(raw[k]) for k in wanted]
        self.spacing = [r["spacing"] for r in index.records(ids)]
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(_seed(self.seed, self.epoch, index)) if self.transform else None
        return _sample(*self.items[index], self.transform, rng)
