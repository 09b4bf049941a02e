"""The search's cross-validation folds: the pool split by patient, and ``folds.json``."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

Folds = list[tuple[list[str], list[str]]]  # per fold: (training keys, validation keys)


def patient_folds(keys: Sequence[str], patient_of: dict[str, str], k: int, seed: int,
                  warn: Callable[[str], None] = print) -> Folds:
    """``k`` (training, validation) splits of ``keys`` whose validation sets partition the keys and
    never share a patient with their training set.

    Patients, in a seeded order, largest first, each go to the fold with the fewest images so far,
    so folds hold about the same number of images. With fewer patients than folds, frames are
    dealt out instead and ``warn`` says so: validation then shares patients with training.
    """
    if len(keys) < k:
        raise ValueError(f"the fine-tuning pool has {len(keys)} image(s), fewer than "
                         f"search.folds={k}: lower search.folds or choose a larger data.ratio")
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(patient_of[key], []).append(key)
    folds: list[list[str]] = [[] for _ in range(k)]
    if len(groups) >= k:
        patients = sorted(groups)
        rng.shuffle(patients)
        for patient in sorted(patients, key=lambda p: -len(groups[p])):  # stable: seeded ties
            min(folds, key=len).extend(groups[patient])
    else:
        warn(f"warning: the fine-tuning pool has {len(groups)} patient(s), fewer than "
             f"search.folds={k}; folding frames instead (validation is not patient-independent)")
        order = sorted(keys)
        rng.shuffle(order)
        for i, key in enumerate(order):
            folds[i % k].append(key)
    return [(sorted(set(keys) - set(fold)), sorted(fold)) for fold in folds]


def write_folds(folds: Folds, patient_of: dict[str, str], path: Path) -> None:
    """folds.json: each fold's validation keys and patients."""
    folds_json = [{"validation": val, "patients": sorted({patient_of[k] for k in val})}
                  for _, val in folds]
    path.write_text(json.dumps(folds_json, indent=1) + "\n")
