"""The pre-training probe: a brief fine-tuning of a copy of the current weights on a few labelled
images of the fine-tuning pool, scored by Dice on other images of that pool (never the test split).

Logged as ``probe_dice`` at each probe and attached to the registered export, so that pre-training
checkpoints can be sorted in the MLflow UI by a downstream figure rather than by their loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmunet.config import check
from cmunet.data import location
from cmunet.data.augment import AugmentConfig
from cmunet.data.splits import load_splits, pool_keys
from cmunet.models.export import load_into
from cmunet.models.unet import UNet


@dataclass
class ProbeConfig:
    every: int = 0  # epochs between probes (0 = no probe); a probe also runs at the end
    labelled: int = 8  # fine-tuning-pool images the probe trains on
    validation: int = 8  # other fine-tuning-pool images (other patients if possible) it is scored on
    epochs: int = 60  # long enough to converge; 10-epoch probes ranked checkpoints at random
    batch_size: int = 4
    lr: float = 1e-3
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        check(self.every >= 0, "every", "must be >= 0")
        check(self.labelled >= 1 and self.validation >= 1, "labelled", "and validation must be >= 1")
        check(self.epochs >= 1, "epochs", "must be >= 1")


def probe_keys(shards: str, ratio: str, cfg: ProbeConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) keys: both from the fine-tuning pool of ``ratio``, split by patient."""
    from cmunet.training.finetune import carve_validation, patients_of

    pool = pool_keys(load_splits(location.join(shards, "splits.json")), "finetune", ratio)
    fraction = cfg.validation / max(len(pool), 1)
    train, val = carve_validation(pool, patients_of(shards), min(max(fraction, 0.05), 0.5), seed,
                                  warn=lambda _: None)
    return train[:cfg.labelled], val[:cfg.validation]


def probe_dice(encoder_decoder: dict[str, torch.Tensor], width: int, shards: str, ratio: str,
               cfg: ProbeConfig, seed: int, precision: str = "auto") -> float:
    """Best validation Dice of a short fine-tuning from ``encoder_decoder`` (export naming)."""
    from cmunet.training.finetune import (DataConfig, FinetuneConfig, TrainConfig, cpu_state,
                                          fit)

    train, val = probe_keys(shards, ratio, cfg, seed)
    torch.manual_seed(seed)
    model = UNet(width)
    load_into(model, encoder_decoder, source="pre-training weights")
    ft = FinetuneConfig(seed=seed, model_width=width, augment=cfg.augment,
                        data=DataConfig(shards=shards, ratio=ratio),
                        train=TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                                          lr=cfg.lr, precision=precision))
    return fit(ft, train, val, initial_state=cpu_state(model)).best_val_dice


RANDOM_INIT = "random init"  # the probe's reference: a freshly initialised UNet, per seed


def probe_exports(exports: dict[str, Path], shards: str, ratio: str, cfg: ProbeConfig,
                  seeds: list[int], cache_file: Path) -> dict[str, list[float]]:
    """Name -> probe Dice of that export folder, one per seed, and the same for a random
    initialisation (:data:`RANDOM_INIT`, method ``none``'s initialisation for each seed, at the
    first export's width). Computed once, cached in ``cache_file`` (JSON, written atomically)
    under the probe's settings (other settings are other entries)."""
    from cmunet.methods.none import RandomInit
    from cmunet.models.export import load_export

    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    settings = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    loaded = {name: load_export(folder) for name, folder in exports.items()}
    widths = {name: info["width"] for name, (_, info) in loaded.items()}
    widths[RANDOM_INIT] = next(iter(widths.values()))

    def state(name: str, seed: int) -> dict:
        if name != RANDOM_INIT:
            return loaded[name][0]
        torch.manual_seed(seed)
        return RandomInit(widths[name]).export_state()

    scores: dict[str, list[float]] = {}
    for name in [*exports, RANDOM_INIT]:
        for seed in seeds:
            key = f"{name}/{seed}/{settings[:10]}"
            if key not in cache:
                cache[key] = probe_dice(state(name, seed), widths[name], shards, ratio, cfg, seed)
                tmp = cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache, indent=1) + "\n")
                tmp.replace(cache_file)
            scores.setdefault(name, []).append(cache[key])
    return scores
