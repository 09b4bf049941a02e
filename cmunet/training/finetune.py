"""Fine-tuning a segmentation UNet from few labels, optionally starting from a pre-training export.

The pieces, each usable on its own:

* :class:`FinetuneConfig` -- the typed config of ``launch/finetune.py`` and ``launch/evaluate.py``.
* :func:`build_model` -- the UNet to fine-tune: seeded random weights, then the encoder and decoder
  of an export (``init``), the 1x1 head freshly initialised; reports what was loaded.
* :func:`fit` -- train on the keys it is given, pick the best epoch by validation Dice, return its
  weights. It never reads the splits file: the caller decides which keys it may use (the
  cross-validated search calls it once per fold, every fold from the same ``initial_state``).
* :func:`carve_validation` -- hold out whole patients of the fine-tuning pool for validation.
* :func:`run_finetune` -- the whole job: pool -> validation carve -> fit -> files and MLflow run.

With ``unlabelled.weight`` > 0, :func:`fit` also trains on unlabelled frames, by consistency with
an EMA teacher (:mod:`cmunet.training.semi`); with 0, the default, it is plain fine-tuning.

Loss: cross-entropy + soft Dice of the foreground, 1:1. The soft Dice uses softmax probabilities
(differentiable); the public reference thresholded before its Dice, so that term had no gradient.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from cmunet.config import check, dump_config, flatten, save_config
from cmunet.data import location
from cmunet.data.augment import AugmentConfig, make_augment
from cmunet.data.index import SampleIndex
from cmunet.data.splits import POOLS, check_ratio, load_splits, pool_keys
from cmunet.data.stream import InMemorySet, collate, load_manifest, make_loader
from cmunet.evaluation.metrics import dice
from cmunet.log import logger
from cmunet.models.export import LoadReport, load_export, load_into
from cmunet.models.unet import UNet
from cmunet.outdir import MODEL, check_out
from cmunet.tracking.mlflow_run import Tracker, TrackingConfig
from cmunet.tracking.registry import resolve
from cmunet.training.precision import (Precision, autocast, compile_modules, default_device,
                                       speedups, use_bf16)
from cmunet.training.semi import (Consistency, TwoViews, UnlabelledConfig, unlabelled_keys,
                                  unlabelled_stream)

LOG = logger(__name__)
WEIGHTS = "best.safetensors"
PREPROCESSING = "preprocessing.json"


@dataclass
class DataConfig:
    shards: str = ""  # shard set of tools/shard.py: folder or URL (s3://, gs://, https://, pipe:)
    ratio: str = "79-1"  # PT-FT ratio whose fine-tuning pool is trained on
    val_fraction: float = 0.2  # share of the pool's images held out (by patient) for validation
    num_workers: int = 0  # DataLoader worker processes
    # time-outs and retries of reads from a URL (s3://, gs://, http(s)://, pipe:)
    remote: location.RemoteConfig = field(default_factory=location.RemoteConfig)

    def __post_init__(self):
        check_ratio(self.ratio)
        check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    precision: Precision = "auto"  # auto: bf16 autocast where the device runs it fast
    compile: bool = False  # torch.compile the UNet (GPU; the first epoch is slower)

    def __post_init__(self):
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass
class EvalConfig:
    pool: str = "test"  # pool of the shards' splits.json to evaluate (the test split by default)
    batch_size: int = 16  # inference batch (also for validation during fine-tuning)
    overlays: int = 8  # panels in overlays.png (from the worst to the best Dice)
    nsd_tolerance: float = 1.0  # normalised surface Dice tolerance in pixels (metric nsd)
    nsd_tolerance_mm: float = 0.5  # ... in mm (nsd_mm, for images with a known pixel spacing)

    def __post_init__(self):
        check(self.pool in POOLS, "pool", f"= {self.pool!r} must be one of {', '.join(POOLS)}")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.overlays > 0, "overlays", "must be positive")
        check(self.nsd_tolerance >= 0, "nsd_tolerance", "must be >= 0")
        check(self.nsd_tolerance_mm >= 0, "nsd_tolerance_mm", "must be >= 0")


@dataclass
class FinetuneConfig:
    init: str = "none"  # pre-training export folder (or .safetensors file), or "none"
    model: str = ""  # evaluation: the fine-tuning output folder holding best.safetensors
    out: str = ""  # output folder
    seed: int = 0
    model_width: int = 64  # UNet width with init=none (an export brings its own width)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # semi-supervised fine-tuning on unlabelled frames (cmunet/training/semi.py); off by default
    unlabelled: UnlabelledConfig = field(default_factory=UnlabelledConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="cmunet-finetune"))

    def __post_init__(self):
        check(self.model_width > 0, "model_width", "must be positive")


@dataclass
class FitResult:
    best_epoch: int  # 1-based
    best_val_dice: float
    # per epoch: epoch, train_loss, val_dice, seconds (+ unlabelled_loss, confident and
    # unlabelled_weight with unlabelled frames)
    history: list[dict]
    best_state: dict[str, torch.Tensor]  # full UNet state dict of the best epoch, fp32 on CPU
    n_unlabelled: int = 0  # unlabelled frames trained on (0: plain fine-tuning)


# ---- model -------------------------------------------------------------------------------------

def width_of(state: dict[str, torch.Tensor], source: str) -> int:
    """The UNet width of a state dict (the stem's first convolution's output channels)."""
    key = "encoder.stem.0.weight"
    if key not in state:
        raise ValueError(f"{source} has no {key}: not the weights of a cmunet UNet encoder")
    return int(state[key].shape[0])


def init_from_export(model: UNet, state: dict[str, torch.Tensor], info: dict,
                     source: str) -> LoadReport:
    """Copy the encoder and decoder of an export (``load_export``'s ``state`` and ``info``) into
    ``model``, leaving the head as it is. A width other than the model's is a ValueError."""
    width = info.get("width", width_of(state, source))
    if width != model.width:
        raise ValueError(f"{source} was pre-trained with width {width} but the fine-tuning UNet "
                         f"has width {model.width}: build the UNet with the export's width")
    return load_into(model, state, source=source)


def build_model(cfg: FinetuneConfig) -> tuple[UNet, LoadReport | None]:
    """The UNet to fine-tune, seeded with ``cfg.seed``: random weights for ``init=none``, else the
    export's encoder and decoder at the export's width, with a freshly initialised head."""
    torch.manual_seed(cfg.seed)
    if cfg.init == "none":
        return UNet(cfg.model_width), None
    state, info = load_export(resolve(cfg.init, cfg.tracking.uri))
    source = f"export {cfg.init}"
    model = UNet(info.get("width", width_of(state, source)))
    return model, init_from_export(model, state, info, source)


# ---- loss --------------------------------------------------------------------------------------

def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the foreground (class 1) over the batch, from softmax probabilities.

    ``logits`` (B, 2, H, W), ``target`` (B, H, W) of 0/1. Differentiable w.r.t. the logits.
    """
    prob = logits.float().softmax(dim=1)[:, 1]
    target = target.float()
    overlap = (prob * target).sum()
    return 1.0 - (2.0 * overlap + smooth) / (prob.sum() + target.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice, 1:1."""
    return F.cross_entropy(logits.float(), target.long()) + soft_dice_loss(logits, target)


# ---- data --------------------------------------------------------------------------------------

def patients_of(shards: str | Path) -> dict[str, str]:
    """Sample key -> patient group, from the shards' index."""
    return SampleIndex.open(shards).patient_of()


def carve_validation(keys: Sequence[str], patient_of: dict[str, str], fraction: float,
                     seed: int, warn: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """Split ``keys`` into (train, validation) by patient, seeded.

    Whole patients go to validation until their images come closest to ``fraction`` of the keys
    (at least one patient, and at least one left for training). With a single patient, frames are
    held out instead and ``warn`` says so: validation then shares a patient with training.
    """
    if len(keys) < 2:
        raise ValueError(f"the fine-tuning pool has {len(keys)} image(s): at least 2 are needed "
                         "to hold one out for validation; choose a larger data.ratio")
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(patient_of[key], []).append(key)
    if len(groups) == 1:
        warn(f"warning: the fine-tuning pool has a single patient; holding out {fraction:.0%} of "
             "its frames for validation (validation is not patient-independent)")
        order = sorted(keys)
        rng.shuffle(order)
        n_val = min(max(1, round(fraction * len(order))), len(order) - 1)
        return sorted(order[n_val:]), sorted(order[:n_val])
    patients = sorted(groups)
    rng.shuffle(patients)
    target, total, best, best_gap = fraction * len(keys), 0, 1, float("inf")
    for n, patient in enumerate(patients[:-1], start=1):
        total += len(groups[patient])
        if abs(total - target) < best_gap:
            best, best_gap = n, abs(total - target)
    val = sorted(k for p in patients[:best] for k in groups[p])
    return sorted(k for p in patients[best:] for k in groups[p]), val


def _loader(data: InMemorySet, batch_size: int, cfg: FinetuneConfig, train: bool,
            pin: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(data, batch_size=batch_size, shuffle=train, collate_fn=collate,
                      num_workers=cfg.data.num_workers, generator=generator,
                      persistent_workers=False, pin_memory=pin)


# ---- training ----------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: UNet, loader: Iterable[dict], device: torch.device,
            bf16: bool) -> list[np.ndarray]:
    """Argmax masks (bool (H, W)) of every image the loader yields, in order."""
    model.eval()
    masks = []
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with autocast(device, bf16):
            logits = model(image)
        masks.extend(m for m in (logits.argmax(dim=1) == 1).cpu().numpy())
    return masks


def mean_dice(preds: Sequence[np.ndarray], data: InMemorySet) -> float:
    """Mean over images of the hard Dice between predictions and the data set's masks."""
    return float(np.mean([dice(p, data[i]["mask"][0] > 0) for i, p in enumerate(preds)]))


def train_epoch(model: UNet, loader: DataLoader, optimizer: torch.optim.Optimizer,
                device: torch.device, bf16: bool, semi: Consistency | None = None) -> float:
    """One pass over the training data; returns the mean supervised loss over batches. The
    losses are summed on the device and read once, at the end (a read per batch stalls a GPU).
    ``semi`` adds its consistency loss to every step and updates its teacher after it."""
    model.train()
    total, batches = torch.zeros((), device=device), 0
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        target = batch["mask"][:, 0].to(device, non_blocking=True)
        with autocast(device, bf16):
            logits = model(image)
        loss = segmentation_loss(logits, target)
        total += loss.detach().float()
        batches += 1
        if semi is not None:
            loss = loss + semi.loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if semi is not None:
            semi.update(model)
    mean = float(total) / max(batches, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"non-finite loss {mean}: lower train.lr "
                                 f"(now {optimizer.param_groups[0]['lr']:g})")
    return mean


def fit(cfg: FinetuneConfig, train_keys: Sequence[str], val_keys: Sequence[str],
        initial_state: dict[str, torch.Tensor] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        device: torch.device | None = None) -> FitResult:
    """Fine-tune on ``train_keys`` of ``cfg.data.shards``, choosing the epoch by the mean hard Dice
    on ``val_keys``; only these keys are ever read.

    Starts from ``initial_state`` (a full UNet state dict; pass the same one to every fold), else
    from :func:`build_model`. ``on_epoch`` receives each epoch's history row as it is made.
    With no ``val_keys`` (the final retraining of the search on the whole pool) nothing is
    validated: ``val_dice`` is NaN and the weights after the last epoch are returned.
    ``device``: default :func:`default_device` (a Ray trial passes the GPU Ray gave it, or CPU).
    With ``unlabelled.weight`` > 0 it also reads the unlabelled frames of
    :func:`cmunet.training.semi.unlabelled_keys` (from the splits file: its non-test pool).
    """
    if not train_keys:
        raise ValueError("fit needs training keys, got none")
    if set(train_keys) & set(val_keys):
        raise ValueError("training and validation keys overlap")
    location.configure(cfg.data.remote)  # a trial of the search: its own process
    if initial_state is None:
        model, _ = build_model(cfg)
    else:
        model = UNet(width_of(initial_state, "initial_state"))
        model.load_state_dict(initial_state)
    torch.manual_seed(cfg.seed)
    device = device or default_device()
    speedups(device)
    bf16 = use_bf16(device, cfg.train.precision)
    model.to(device, memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_modules([model])
    train_set = InMemorySet(cfg.data.shards, train_keys, transform=make_augment(cfg.augment),
                            seed=cfg.seed)
    val_set = InMemorySet(cfg.data.shards, val_keys) if val_keys else None
    pin = device.type == "cuda"  # page-locked batches: copies overlap the computation
    train_loader = _loader(train_set, cfg.train.batch_size, cfg, train=True, pin=pin)
    val_loader = (_loader(val_set, cfg.eval.batch_size, cfg, train=False, pin=pin)
                  if val_set is not None else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay, fused=pin or None)
    result = FitResult(0, -1.0, [], {})
    semi = None  # weight 0: nothing of semi-supervision is built, no extra random draw
    if cfg.unlabelled.weight > 0:
        semi, result.n_unlabelled = _consistency(cfg, model, train_keys, val_keys, device, bf16,
                                                 pin)
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        train_set.epoch = epoch  # new augmentations every epoch
        if semi is not None:
            semi.start_epoch(epoch)
        loss = train_epoch(model, train_loader, optimizer, device, bf16, semi)
        val_dice = (mean_dice(predict(model, val_loader, device, bf16), val_set)
                    if val_set is not None else math.nan)
        row = {"epoch": epoch, "train_loss": loss, "val_dice": val_dice,
               **(semi.summary() if semi is not None else {}),
               "seconds": time.perf_counter() - start}
        result.history.append(row)
        if val_dice > result.best_val_dice:
            result.best_epoch, result.best_val_dice = epoch, val_dice
            result.best_state = cpu_state(model)
        if on_epoch is not None:
            on_epoch(row)
    if val_set is None:
        result.best_epoch, result.best_val_dice = cfg.train.epochs, math.nan
        result.best_state = cpu_state(model)
    return result


def _consistency(cfg: FinetuneConfig, model: UNet, train_keys: Sequence[str],
                 val_keys: Sequence[str], device: torch.device, bf16: bool,
                 pin: bool) -> tuple[Consistency, int]:
    """The unlabelled half of :func:`fit` (``unlabelled.weight`` > 0) and its number of frames:
    ``unlabelled.ratio`` unlabelled images per labelled image of a full batch."""
    u = cfg.unlabelled
    folder, keys = unlabelled_keys(u.source, cfg.data.shards, train_keys, val_keys,
                                   patients_of(cfg.data.shards))
    batch = max(1, round(u.ratio * min(cfg.train.batch_size, len(train_keys))))
    views = TwoViews(make_augment(cfg.augment), make_augment(u.strong))
    stream = unlabelled_stream(folder, keys, batch, views, cfg.seed)
    batches = iter(make_loader(stream, cfg.data.num_workers, pin_memory=pin))
    return Consistency(u, model, batches, device, bf16), len(keys)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the model's state dict, floating tensors in fp32."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            .contiguous().clone() for k, v in model.state_dict().items()}


# ---- the job -----------------------------------------------------------------------------------

def run_finetune(cfg: FinetuneConfig, log: Callable[[str], None] = LOG.info) -> FitResult:
    """Fine-tune on the fine-tuning pool of ``cfg.data.ratio`` and write ``cfg.out``:
    best.safetensors, config.yaml, history.csv, result.json; one MLflow run."""
    if not cfg.out:
        raise ValueError("out is not set: give the output folder, e.g. out=runs/finetune")
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the folder written by tools/shard.py")
    check_out(cfg.out, {"data.shards": cfg.data.shards, "init": cfg.init}, kind=MODEL)
    location.configure(cfg.data.remote)
    model, report = build_model(cfg)
    cfg = replace(cfg, model_width=model.width)  # the resolved config names the width used
    log(f"init: {cfg.init}, width {model.width} "
        + (f"({report.summary()})" if report else "(random weights)"))
    pool = pool_keys(load_splits(location.join(cfg.data.shards, "splits.json")), "finetune",
                     cfg.data.ratio)
    patient_of = patients_of(cfg.data.shards)
    train_keys, val_keys = carve_validation(pool, patient_of, cfg.data.val_fraction, cfg.seed, log)
    log(f"fine-tuning pool {cfg.data.ratio}: {len(pool)} images -> {len(train_keys)} train, "
        f"{len(val_keys)} validation (patients: {len(set(map(patient_of.get, train_keys)))} "
        f"train, {len(set(map(patient_of.get, val_keys)))} validation)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, run_name=out.name, params=flatten(cfg),
                      shards=[cfg.data.shards])
    try:
        start = time.perf_counter()
        result = fit(cfg, train_keys, val_keys, model.state_dict(),
                     _epoch_logger(cfg.train.epochs, tracker, log))
        summary = {"best_epoch": result.best_epoch, "best_val_dice": result.best_val_dice,
                   "width": model.width, "init": cfg.init, "init_report": _report_dict(report),
                   "ratio": cfg.data.ratio, "n_train": len(train_keys), "n_val": len(val_keys),
                   "val_patients": sorted({patient_of[k] for k in val_keys}),
                   "train_keys": train_keys, "val_keys": val_keys,
                   "n_unlabelled": result.n_unlabelled, "seconds": time.perf_counter() - start}
        save_outputs(result, summary, cfg, out)
        tracker.log_metrics({"best_val_dice": result.best_val_dice,
                             "best_epoch": result.best_epoch}, step=cfg.train.epochs)
        for name in ("config.yaml", "history.csv", "result.json", PREPROCESSING):
            tracker.log_artifact(out / name)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    log(f"best epoch {result.best_epoch}/{cfg.train.epochs}: validation Dice "
        f"{result.best_val_dice:.4f}; wrote {out / WEIGHTS} ({summary['seconds']:.0f} s)")
    return result


def _epoch_logger(epochs: int, tracker: Tracker,
                  log: Callable[[str], None]) -> Callable[[dict], None]:
    """The ``on_epoch`` callback of a job: MLflow metrics and one progress line per epoch."""
    best = [-1.0]

    def on_epoch(row: dict) -> None:
        tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "seconds")},
                            step=row["epoch"])
        mark = " *" if row["val_dice"] > best[0] else ""
        best[0] = max(best[0], row["val_dice"])
        semi = (f"  unlabelled {row['unlabelled_loss']:.4f} x {row['unlabelled_weight']:.3g} "
                f"({row['confident']:.0%} confident)" if "unlabelled_loss" in row else "")
        log(f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f}{semi}  "
            f"val Dice {row['val_dice']:.4f}{mark}  ({row['seconds']:.1f} s)")

    return on_epoch


def save_outputs(result: FitResult, summary: dict, cfg: FinetuneConfig, out: Path) -> None:
    """best.safetensors (state dict of the best epoch, with the resolved config in its metadata),
    history.csv and result.json."""
    tmp = out / (WEIGHTS + ".tmp")
    save_file(result.best_state, tmp,
              metadata={"format": "cmunet-finetune/1", "config": dump_config(cfg)})
    tmp.replace(out / WEIGHTS)  # never a half-written weights file
    write_history(result.history, out / "history.csv")
    (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_preprocessing(cfg.data.shards, out / PREPROCESSING)


def write_preprocessing(shards: str | Path, path: Path) -> None:
    """What inference on new images must repeat: the shards' preprocessing, size, storage type
    and z-score statistics (so a model can be used without its training shards)."""
    manifest = load_manifest(shards)
    keep = ("size", "dtype", "mean", "std", "preprocess")
    path.write_text(json.dumps({k: manifest[k] for k in keep}, indent=1) + "\n")


def write_history(history: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        columns = list(history[0]) if history else ["epoch", "train_loss", "val_dice", "seconds"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def _report_dict(report: LoadReport | None) -> dict | None:
    if report is None:
        return None
    return {"loaded": len(report.loaded), "missing": report.missing,
            "unexpected": report.unexpected, "summary": report.summary()}
