"""Patient-grouped, seeded splits: a test split and, per PT-FT ratio, pre-training and fine-tuning pools.

A ratio ``"79-1"`` means 79 % of the whole set for pre-training and 1 % for fine-tuning (in images);
the test split takes ``test_fraction`` (20 %) of the patients and, as closely as possible, of the
images; the pools share the rest. Every patient is on one
side only. The test split and the fine-tuning pools are drawn from labelled patients. The
fine-tuning pools of all ratios are prefixes of one seeded patient order, so smaller pools nest in
larger ones (the study's label budgets draw from the same order). Images of test patients that are
not in an official test list are excluded from every pool.

``splits.json`` (``cmunet-splits/2``) lists patients, never keys: a pool is the samples of its
patients in the set's :class:`~cmunet.data.index.SampleIndex` (a fine-tuning pool only the
labelled ones, the test split less the ``excluded`` keys), so it costs bytes per patient and
resolves to an integer array (:func:`pool_ids`). Files of the older layout, which listed every
key of every pool, are read too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmunet.data.index import SampleIndex, write_json

FORMAT = "cmunet-splits/2"  # patient lists; format 1 (no "format" entry) listed every key
PAPER_RATIOS = ("50-30", "60-20", "70-10", "75-5", "79-1")
POOLS = ("pretrain", "finetune", "train", "test", "all")


@dataclass(frozen=True)
class SampleInfo:
    key: str
    patient: str
    labelled: bool


def parse_ratio(name: str, test_fraction: float = 0.2) -> tuple[float, float]:
    """``"79-1"`` -> (0.79, 0.01), checked against the room left by the test split."""
    try:
        pt, ft = (float(part) / 100 for part in name.split("-"))
    except ValueError:
        raise ValueError(f"PT-FT ratio {name!r} must look like '79-1' (percent of the whole set)") \
            from None
    if pt < 0 or ft <= 0 or pt + ft > 1 - test_fraction + 1e-9:
        raise ValueError(f"PT-FT ratio {name!r} must have FT > 0 and PT + FT <= "
                         f"{100 * (1 - test_fraction):g} % (the rest is the test split)")
    return pt, ft


def check_ratio(ratio: str, key: str = "ratio") -> None:
    """Config validation (``__post_init__``): :func:`parse_ratio`'s error as a ConfigError
    naming ``key``."""
    from cmunet.config import ConfigError

    try:
        parse_ratio(ratio)
    except ValueError as err:
        raise ConfigError(str(err), key=key) from None


def make_splits(samples: list[SampleInfo], seed: int, test_fraction: float = 0.2,
                ratios: tuple[str, ...] | list[str] = PAPER_RATIOS,
                test_keys: set[str] | None = None) -> dict:
    """The splits document written to ``splits.json`` (see the module docstring)."""
    for ratio in ratios:
        parse_ratio(ratio, test_fraction)
    keys_of: dict[str, list[str]] = defaultdict(list)
    labelled_of: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        keys_of[s.patient].append(s.key)
        if s.labelled:
            labelled_of[s.patient].append(s.key)
    total = len(samples)
    rng = random.Random(seed)
    has_labels = bool(labelled_of)

    excluded: list[str] = []
    if test_keys is not None:
        unknown = sorted(test_keys - {s.key for s in samples})
        if unknown:
            raise ValueError(f"test list names {len(unknown)} images not in the dataset: "
                             f"{', '.join(unknown[:5])}")
        test_patients = sorted({s.patient for s in samples if s.key in test_keys})
        excluded = sorted(k for p in test_patients for k in keys_of[p] if k not in test_keys)
    else:
        candidates = sorted(labelled_of if has_labels else keys_of)
        test_patients = _draw_test(candidates, keys_of, test_fraction, total, rng)

    rest = sorted(p for p in keys_of if p not in set(test_patients))
    order = [p for p in rest if p in labelled_of]
    rng.shuffle(order)
    ft_counts = [len(labelled_of[p]) for p in order]
    document = {
        "format": FORMAT,
        "seed": seed,
        "by": "patient",
        "test_fraction": test_fraction,
        "test_source": "list" if test_keys is not None else "drawn",
        "total": total,
        "test": {"patients": test_patients},
        "train": {"patients": rest},
        "excluded": {"keys": excluded},
        "finetune_order": order,
        "new_patients": new_patient_rule(seed, test_keys is not None, has_labels),
        "ratios": {},
    }
    for ratio in ratios:
        _, ft = parse_ratio(ratio, test_fraction)
        n = _closest_prefix(ft_counts, ft * total) if order else 0
        ft_patients = sorted(order[:n])
        document["ratios"][ratio] = {
            "pretrain": {"patients": sorted(set(rest) - set(ft_patients))},
            "finetune": {"patients": ft_patients},
        }
    return document


def new_patient_rule(seed: int, test_listed: bool, has_labels: bool) -> dict:
    """How a patient the splits do not list (added since by ``tools/shard.py --append``) is
    placed: by a salted hash of its name alone (see :func:`place_new_patients`). ``test_from``:
    who may join the test split, as when it was drawn: ``labelled`` patients, ``all``, or
    ``none`` (an official test list)."""
    return {"rule": "sha256", "salt": f"cmunet-splits-{seed}",
            "test_from": "none" if test_listed else "labelled" if has_labels else "all"}


def place_new_patients(splits: dict, patients: list[str],
                       labelled: list[bool]) -> dict[tuple[str, str | None], list[str]]:
    """The pools of ``patients`` (not listed in ``splits``; ``labelled``: whether each has a
    labelled sample) by the rule of ``splits["new_patients"]``: with u and v two numbers in
    [0, 1) from the SHA-256 of ``salt:patient:test`` and ``salt:patient:finetune``, a patient
    that may join the test split does when u < test_fraction; every other one is a training
    patient, in the fine-tuning pool of a ratio PT-FT when it is labelled and
    v < FT / (100 - 100 x test_fraction) (so smaller pools nest in larger ones), else in its
    pre-training pool. Keys ``("test", None)``, ``("train", None)``, ``("finetune", ratio)``,
    ``("pretrain", ratio)``; every list sorted by v (the order they join ``finetune_order``)."""
    rule = splits["new_patients"]
    fraction = splits["test_fraction"]
    pools: dict[tuple[str, str | None], list[str]] = {("test", None): [], ("train", None): []}
    for ratio in splits["ratios"]:
        pools["finetune", ratio], pools["pretrain", ratio] = [], []
    ranked = sorted(zip(patients, labelled), key=lambda pair: _unit(rule, pair[0], "finetune"))
    for patient, has_label in ranked:
        may_test = rule["test_from"] == "all" or rule["test_from"] == "labelled" and has_label
        if may_test and _unit(rule, patient, "test") < fraction:
            pools["test", None].append(patient)
            continue
        pools["train", None].append(patient)
        for ratio in splits["ratios"]:
            share = parse_ratio(ratio, fraction)[1] / (1 - fraction)
            tune = has_label and _unit(rule, patient, "finetune") < share
            pools["finetune" if tune else "pretrain", ratio].append(patient)
    return pools


def _unit(rule: dict, patient: str, purpose: str) -> float:
    digest = hashlib.sha256(f"{rule['salt']}:{patient}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _draw_test(candidates: list[str], keys_of: dict[str, list[str]], fraction: float, total: int,
               rng: random.Random, tries: int = 2000) -> list[str]:
    """About ``fraction`` of the patients AND of the images: among seeded random sets of
    round(fraction x patients) patients, the one whose image count is closest to fraction x images.

    Drawing patients until the image share is reached instead would often give a test split of
    two or three patients when a few patients have many frames (xca-cadml: up to 39 of 344).
    """
    k = min(max(1, round(fraction * len(candidates))), max(1, len(candidates) - 1))
    target = fraction * total
    best, best_gap = None, float("inf")
    for _ in range(tries):
        chosen = rng.sample(candidates, k)
        gap = abs(sum(len(keys_of[p]) for p in chosen) - target)
        if gap < best_gap:
            best, best_gap = chosen, gap
    return sorted(best)


def _closest_prefix(counts: list[int], target: float) -> int:
    """The number k >= 1 of leading groups whose total is closest to ``target``."""
    best, best_gap, cum = 1, float("inf"), 0
    for k, n in enumerate(counts, start=1):
        cum += n
        gap = abs(cum - target)
        if gap < best_gap:
            best, best_gap = k, gap
    return min(best, len(counts))


def save_splits(document: dict, path: str | Path) -> None:
    """Write ``path`` (a temporary name, then renamed)."""
    write_json(path, document)


def load_splits(path: str | Path) -> Splits:
    """A ``splits.json``: a path or a URL (``location.join(shards, "splits.json")``, see
    :mod:`cmunet.data.location`); its pools are resolved with the index of the set beside it."""
    from cmunet.data import location

    try:
        document = json.loads(location.read_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{location.public(path)} does not exist: build shards with "
                                "tools/shard.py first") from None
    return Splits(document, location.folder_of(path, "splits.json"))


class Splits(dict):
    """A splits document (a dict, as in the file) that knows its shard set (``shards``) and so
    its :class:`~cmunet.data.index.SampleIndex`. In the patient-list layout a pool's ``"keys"``
    (what the older layout stored) are worked out when first asked for."""

    def __init__(self, document: dict, shards: str | Path | None = None,
                 index: SampleIndex | None = None):
        super().__init__(document)
        self.shards, self._index = shards, index
        if _by_patients(document):
            for pool in ("test", "train"):
                self[pool] = _Part(self[pool], functools.partial(pool_keys, self, pool))
            self["ratios"] = {ratio: {name: _Part(part, functools.partial(
                pool_keys, self, name, ratio)) for name, part in pools.items()}
                for ratio, pools in self["ratios"].items()}

    @property
    def index(self) -> SampleIndex:
        if self._index is None:
            if self.shards is None:
                raise ValueError("this splits document names no shard set: load it with "
                                 "load_splits, or pass the set's index")
            self._index = SampleIndex.open(self.shards)
        return self._index


class _Part(dict):
    """A pool of a splits document; ``part["keys"]`` calls ``keys`` the first time."""

    def __init__(self, part: dict, keys):
        super().__init__(part)
        self._keys = keys

    def __missing__(self, name: str):
        if name != "keys":
            raise KeyError(name)
        self["keys"] = value = self._keys()
        return value


def _by_patients(splits: dict) -> bool:
    """Whether ``splits`` is of the patient-list layout (else: the key lists of format 1)."""
    return splits.get("format") == FORMAT


def pool_ids(splits: dict, pool: str, ratio: str | None = None,
             index: SampleIndex | None = None) -> np.ndarray:
    """The sample ids (rows of the set's index, ascending: shard and tar order) of a pool, as for
    :func:`pool_keys`; ``index`` defaults to that of the set of ``splits`` (see :class:`Splits`)."""
    _check_pool(splits, pool, ratio)
    index = index if index is not None else _index_of(splits)
    if not _by_patients(splits):  # format 1: the keys themselves
        return _ids_of_keys(index, pool_keys(splits, pool, ratio))
    if pool == "all":
        return np.union1d(pool_ids(splits, "train", index=index),
                          pool_ids(splits, "test", index=index))
    part = splits[pool] if pool in ("test", "train") else splits["ratios"][ratio][pool]
    codes = _codes(index, part["patients"])
    placed = new_patients(splits, index).get((pool, ratio if pool in ("pretrain",
                                                                     "finetune") else None))
    chosen = index.of_patients(codes if not placed else
                               np.concatenate([codes, _codes(index, placed)]))
    if pool == "finetune":
        chosen &= index["labelled"]
    if pool == "test" and splits["excluded"]["keys"]:
        chosen[_ids_of_keys(index, splits["excluded"]["keys"])] = False
    return np.flatnonzero(chosen)


def _codes(index: SampleIndex, patients: list[str]) -> np.ndarray:
    codes, missing = index.patient_codes(patients)
    if missing:
        raise ValueError(f"{index.where}: the splits name {len(missing)} patients the set does "
                         f"not hold (e.g. {missing[0]}): splits and shards disagree")
    return codes


def new_patients(splits: dict, index: SampleIndex) -> dict[tuple[str, str | None], list[str]]:
    """The pools of the patients of ``index`` that ``splits`` does not list (appended since it
    was written), by its ``new_patients`` rule; none without a rule."""
    if "new_patients" not in splits:
        return {}
    listed = np.zeros(len(index["patients"]), dtype=bool)
    listed[_codes(index, splits["test"]["patients"] + splits["train"]["patients"])] = True
    if listed.all():
        return {}
    labelled = np.zeros(len(listed), dtype=bool)
    labelled[index["patient"][index["labelled"]]] = True
    new = np.flatnonzero(~listed)
    return place_new_patients(splits, [index["patients"][c].decode() for c in new],
                              labelled[new].tolist())


def pool_keys(splits: dict, pool: str, ratio: str | None = None) -> list[str]:
    """The sample keys of a pool, sorted: ``pretrain``/``finetune`` (of a ratio), ``train``
    (every sample of a non-test patient), ``test``, or ``all`` (train and test)."""
    _check_pool(splits, pool, ratio)
    if _by_patients(splits):
        return sorted(_index_of(splits).keys_of(pool_ids(splits, pool, ratio)))
    if pool == "test":
        return list(splits["test"]["keys"])
    if pool == "train":
        return list(splits["train"]["keys"])
    if pool == "all":
        return sorted(splits["train"]["keys"] + splits["test"]["keys"])
    return list(splits["ratios"][ratio][pool]["keys"])


def _check_pool(splits: dict, pool: str, ratio: str | None) -> None:
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    if pool in ("pretrain", "finetune") and ratio not in splits["ratios"]:
        raise ValueError(f"ratio {ratio!r} is not in the splits file; it has "
                         f"{', '.join(splits['ratios'])}")


def _index_of(splits: dict) -> SampleIndex:
    if not isinstance(splits, Splits):
        raise ValueError("a splits document read without load_splits names no shard set: "
                         "pass its index")
    return splits.index


def _ids_of_keys(index: SampleIndex, keys: list[str]) -> np.ndarray:
    ids, missing = index.find(keys)
    if missing:
        raise ValueError(f"{len(missing)} keys of the splits are not in {index.where} (e.g. "
                         f"{missing[0]}): splits and shards disagree")
    return np.sort(ids)
