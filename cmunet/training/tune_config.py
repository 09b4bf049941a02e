"""The settings of the cross-validated search (:class:`TuneConfig`, ``launch/tune.py``) and what
follows from them alone: the fine-tuning config of a trial, absolute paths, where Ray Tune keeps
the search's state. No Ray here: the dry run, the docs and the study read these without it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cmunet.config import check
from cmunet.data import location
from cmunet.data.augment import AugmentConfig
from cmunet.tracking.mlflow_run import TrackingConfig, resolve_uri
from cmunet.tracking.registry import is_mlflow_uri
from cmunet.training.finetune import DataConfig, EvalConfig, FinetuneConfig, TrainConfig
from cmunet.training.semi import UnlabelledConfig

SEARCHED = ("lr", "batch_size")  # the hyper-parameters a trial sets (search.<name> lists)
OPTIONAL = ("unlabelled_weight",)  # ... and these, when their search.<name> lists values


@dataclass
class SearchConfig:
    lr: list[float] = field(default_factory=lambda: [1e-2, 1e-3, 1e-4, 1e-5])
    batch_size: list[int] = field(default_factory=lambda: [16, 32])
    # weights of the unlabelled loss to search (replacing unlabelled.weight); [] = not searched
    unlabelled_weight: list[float] = field(default_factory=list)
    mode: Literal["grid", "random"] = "grid"  # grid: every lr x batch_size (x weight) once
    samples: int = 8  # random mode: configurations drawn (lr log-uniform in [min, max] of lr)
    asha: bool = False  # stop poor trials early (ASHA on the running cv_dice, reported per epoch)
    grace_period: int = 0  # ASHA: epochs (over folds) before a trial may be stopped; 0 = one fold
    folds: int = 3  # cross-validation folds, grouped by patient
    max_failures: int = 2  # retries of a failed trial
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials (0.5: two per GPU)
    max_concurrent: int = 0  # trials at once (0 = as many as the resources allow)
    address: str = ""  # "" = a local Ray started here; "auto" or ray://HOST:10001 = a cluster
    num_cpus: int = 0  # local Ray only: CPUs it may use (0 = every core)
    # local Ray only: a folder of this user alone (mode 0700; made if missing, refused if another
    # user owns it or others may write it) holding Ray's session folders and sockets (keep it
    # short: socket paths); "" = ray-cmunet-<uid> in the system temp folder
    temp_dir: str = ""
    storage: str = ""  # Ray Tune's result folder ("" = OUT/ray); shared or s3:// on a cluster
    # resume a search whose state is at a storage URL (s3://...): Ray unpickles that state, and
    # who wrote a bucket cannot be checked, so only when you alone can write it
    trust_storage: bool = False
    verbose: int = 1  # Ray Tune's console output: 0 quiet, 1 trial status tables, 2 + results

    def __post_init__(self):
        check(len(self.lr) > 0 and all(v > 0 for v in self.lr), "lr", "must be positive values")
        check(len(self.batch_size) > 0 and all(v > 0 for v in self.batch_size), "batch_size",
              "must be positive values")
        check(all(v >= 0 for v in self.unlabelled_weight), "unlabelled_weight",
              "must be values >= 0 (0 = no unlabelled frames)")
        check(self.samples > 0, "samples", "must be positive")
        check(self.grace_period >= 0, "grace_period", "must be >= 0")
        check(self.folds >= 2, "folds", "must be >= 2")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        check(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        check(self.gpus_per_trial >= 0, "gpus_per_trial", "must be >= 0")
        check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0")
        check(self.num_cpus >= 0, "num_cpus", "must be >= 0")


@dataclass
class TuneConfig:
    """The fine-tuning settings of :class:`FinetuneConfig` (same keys, except ``model``) plus the
    search. ``search.lr`` and ``search.batch_size`` replace ``train.lr`` and ``train.batch_size`` in
    every trial (and ``search.unlabelled_weight``, when it lists values, ``unlabelled.weight``);
    ``data.val_fraction`` is not used (the folds are the validation sets)."""

    init: str = "none"  # pre-training export, runs:/ or models:/ URI, or "none"
    out: str = ""  # output folder
    seed: int = 0  # initial weights, folds, batch order, augmentations, random draws
    model_width: int = 64  # UNet width with init=none
    alias: str = "champion"  # alias given to the registered winner ("" = none)
    onnx: bool = True  # also export the winner to OUT/model.onnx, checked with onnxruntime
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # semi-supervised fine-tuning on unlabelled frames (cmunet/training/semi.py); off by default
    unlabelled: UnlabelledConfig = field(default_factory=UnlabelledConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="cmunet-tune", register_as="cmunet"))

    def __post_init__(self):
        check(self.model_width > 0, "model_width", "must be positive")
        check(self.eval.pool == "test", "eval.pool",
              "must be test: the search evaluates its winner once, on the test split")
        check(self.search.grace_period <= self.search.folds * self.train.epochs,
              "search.grace_period", "must be <= search.folds x train.epochs")


def finetune_settings(cfg: TuneConfig, **train: Any) -> FinetuneConfig:
    """The fine-tuning config of the search, ``train`` fields replaced (lr, batch_size, ...)."""
    return FinetuneConfig(init=cfg.init, out=cfg.out, seed=cfg.seed, model_width=cfg.model_width,
                          data=cfg.data, train=replace(cfg.train, **train), augment=cfg.augment,
                          unlabelled=cfg.unlabelled, eval=cfg.eval, tracking=cfg.tracking)


def searched(search: SearchConfig) -> tuple[str, ...]:
    """The hyper-parameters a trial sets: :data:`SEARCHED`, and those of :data:`OPTIONAL` whose
    ``search.<name>`` lists values."""
    return SEARCHED + tuple(name for name in OPTIONAL if getattr(search, name))


def trial_settings(settings: FinetuneConfig, config: dict) -> FinetuneConfig:
    """``settings`` with a trial's (or the winner's) hyper-parameters: ``config["lr"]``,
    ``config["batch_size"]`` and, where searched, ``config["unlabelled_weight"]``."""
    cfg = replace(settings, train=replace(settings.train, lr=float(config["lr"]),
                                          batch_size=int(config["batch_size"])))
    if "unlabelled_weight" in config:
        weight = float(config["unlabelled_weight"])
        cfg = replace(cfg, unlabelled=replace(cfg.unlabelled, weight=weight))
    return cfg


def local_init(cfg: TuneConfig) -> str | None:
    """``init`` when it is a local path (an input the output folder must not be), else None."""
    return None if cfg.init == "none" or is_mlflow_uri(cfg.init) else cfg.init


def absolute(cfg: TuneConfig) -> TuneConfig:
    """Every path and the tracking URI made absolute (trials run in their own folders)."""
    init = cfg.init if local_init(cfg) is None else str(Path(cfg.init).resolve())
    return replace(cfg, init=init, out=str(Path(cfg.out).resolve()),
                   data=replace(cfg.data, shards=location.absolute(cfg.data.shards)),
                   tracking=replace(cfg.tracking, uri=resolve_uri(cfg.tracking.uri)))


def storage_root(cfg: TuneConfig) -> str:
    """Ray Tune's result folder: ``search.storage``, else OUT/ray."""
    return cfg.search.storage or str(Path(cfg.out) / "ray")


def search_state(cfg: TuneConfig) -> str:
    """Where Ray Tune keeps the search's state (a relaunch continues from it)."""
    return f"{storage_root(cfg).rstrip('/')}/search"
