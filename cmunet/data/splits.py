"""Patient-grouped, seeded splits: a test split and, per PT-FT ratio, pre-training and fine-tuning pools.

A ratio ``"79-1"`` means 79 % of the whole set for pre-training and 1 % for fine-tuning (in images);
the test split takes ``test_fraction`` (20 %) of the patients and, as closely as possible, of the
images; the pools share the rest. Every patient is on one
side only. The test split and the fine-tuning pools are drawn from labelled patients. The
fine-tuning pools of all ratios are prefixes of one seeded patient order, so smaller pools nest in
larger ones (the study's label budgets draw from the same order). Images of test patients that are
not in an official test list are excluded from every pool.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

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
        test = sorted(test_keys)
        excluded = sorted(k for p in test_patients for k in keys_of[p] if k not in test_keys)
    else:
        candidates = sorted(labelled_of if has_labels else keys_of)
        test_patients = _draw_test(candidates, keys_of, test_fraction, total, rng)
        test = sorted(k for p in test_patients for k in keys_of[p])

    rest = sorted(p for p in keys_of if p not in set(test_patients))
    order = [p for p in rest if p in labelled_of]
    rng.shuffle(order)
    ft_counts = [len(labelled_of[p]) for p in order]
    document = {
        "seed": seed,
        "by": "patient",
        "test_fraction": test_fraction,
        "test_source": "list" if test_keys is not None else "drawn",
        "total": total,
        "test": _part(test_patients, test),
        "train": _part(rest, sorted(k for p in rest for k in keys_of[p])),
        "excluded": {"keys": excluded},
        "finetune_order": order,
        "ratios": {},
    }
    for ratio in ratios:
        _, ft = parse_ratio(ratio, test_fraction)
        n = _closest_prefix(ft_counts, ft * total) if order else 0
        ft_patients = sorted(order[:n])
        pt_patients = sorted(set(rest) - set(ft_patients))
        document["ratios"][ratio] = {
            "pretrain": _part(pt_patients, sorted(k for p in pt_patients for k in keys_of[p])),
            "finetune": _part(ft_patients, sorted(k for p in ft_patients for k in labelled_of[p])),
        }
    return document


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


def _part(patients: list[str], keys: list[str]) -> dict:
    return {"patients": patients, "keys": keys}


def save_splits(document: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(document, indent=1) + "\n")


def load_splits(path: str | Path) -> dict:
    """A ``splits.json``: a path or a URL (``location.join(shards, "splits.json")``, see
    :mod:`cmunet.data.location`)."""
    from cmunet.data import location

    try:
        return json.loads(location.read_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{location.public(path)} does not exist: build shards with "
                                "tools/shard.py first") from None


def pool_keys(splits: dict, pool: str, ratio: str | None = None) -> list[str]:
    """The sample keys of a pool: ``pretrain``/``finetune`` (of a ratio), ``train`` (every sample of
    a non-test patient), ``test``, or ``all`` (train and test)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    if pool == "test":
        return list(splits["test"]["keys"])
    if pool == "train":
        return list(splits["train"]["keys"])
    if pool == "all":
        return sorted(splits["train"]["keys"] + splits["test"]["keys"])
    if ratio not in splits["ratios"]:
        raise ValueError(f"ratio {ratio!r} is not in the splits file; it has "
                         f"{', '.join(splits['ratios'])}")
    return list(splits["ratios"][ratio][pool]["keys"])
