"""A study's settings and its grid of cells (``launch/study.py``): the arms (methods or named
variants of one), the label budgets and seeds, and the name of each cell's pre-training. No
training here: the docs, the dose report and the tests read these alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cmunet.config import check
from cmunet.tracking.mlflow_run import TrackingConfig
from cmunet.training.probe import ProbeConfig


@dataclass
class Arm:
    """A named pre-training variant: a method plus config overrides (pre-training and tuning)."""

    method: str = "cmunet"
    pretrain: list[str] = field(default_factory=list)  # key=value for launch/pretrain.py
    tune: list[str] = field(default_factory=list)  # key=value for the fine-tuning search
    share: str = ""  # reuse this arm's pre-training (a fine-tuning-only variant)
    # fine-tune from a periodic export of that pre-training (e.g. "epoch_0030", written with
    # train.export_epochs) instead of its final export: the doses of a dose-response study
    export: str = ""
    # which frames a cell labels: "random" (seeded, patient by patient) or a cmunet-select
    # strategy (typiclust, kcenter) run on the fine-tuning pool with a pre-trained encoder
    labels: Literal["random", "typiclust", "kcenter"] = "random"
    # the arm whose export embeds the pool, or an export path (with a "/"); "" = this arm's own
    label_encoder: str = ""


@dataclass
class StudyData:
    shards: str = ""  # "" = synthetic angiograms made in OUT/data (synthetic_* keys)
    ratio: str = "50-30"  # the split: its pre-training pool and its fine-tuning pool (budgets)
    # pre-train on every image of these shard folders instead of the split's pre-training pool
    # (an archive from elsewhere); a folder holding a test image of `shards` is refused
    pretrain_shards: list[str] = field(default_factory=list)
    synthetic_count: int = 96
    synthetic_size: int = 64


@dataclass
class StudyConfig:
    out: str = ""
    data: StudyData = field(default_factory=StudyData)
    arms: list[str] = field(default_factory=lambda: ["none", "cmunet"])  # methods or arm names
    reference: str = ""  # the arm gains are measured against ("" = the first arm)
    # "arm": every seed of an arm, then the next arm; "seed": every arm and budget of a seed,
    # then the next seed (a study stopped early then holds whole paired comparisons)
    order: Literal["arm", "seed"] = "arm"
    budgets: list[str] = field(default_factory=lambda: ["all"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    extra_cells: list[str] = field(default_factory=list)  # "arm@budget": added to the grid
    extra_seeds: list[int] = field(default_factory=list)  # seeds of extra_cells ([] = seeds)
    variants: dict[str, Arm] = field(default_factory=dict)  # arm name -> method and overrides
    pretrain_config: str = "configs/pretrain/{method}-cpu.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    pretrain_launcher: str = ""  # "" = this Python; e.g. "deepspeed --num_gpus 2"
    # true: one pre-training per arm (with the first seed) shared by every seed's fine-tuning --
    # cheaper, but the spread over seeds then leaves out the pre-training's own variance
    pretrain_once: bool = False
    # true: a cell whose pre-training export does not exist yet is left for a later relaunch
    # instead of pre-training now (the pre-training runs elsewhere, e.g. in the background)
    defer_pretraining: bool = False
    tune_config: str = "configs/tune/cpu.yaml"
    tune_overrides: list[str] = field(default_factory=list)
    # fine-tuning length grows for small budgets: each fold's training sees at least this many
    # samples (epochs = max(train.epochs, ceil(this / fold training images))); 0 = off
    min_samples_seen: int = 0
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="cmunet-study"))
    report_only: bool = False  # rebuild results.csv/.md and the figure from finished cells
    # dose studies: probe every dose's export with these seeds (dose.md, probe_vs_gain.png)
    probe_seeds: list[int] = field(default_factory=list)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        check(not self.reference or self.reference in self.arms, "reference",
              f"{self.reference!r} must be one of arms")
        for cell in self.extra_cells:
            check("@" in cell, "extra_cells", f"entry {cell!r} must look like 'mae@4'")
        for budget in self.budgets + [c.split("@")[-1] for c in self.extra_cells]:
            check(budget == "all" or budget.isdigit() or "-" in budget, "budgets",
                  f"entry {budget!r} must be 'all', a number of images or a PT-FT ratio")


@dataclass(frozen=True)
class Cell:
    arm: str
    budget: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-b{self.budget}-s{self.seed}"


def arm_of(cfg: StudyConfig, name: str) -> Arm:
    arm = cfg.variants.get(name, Arm(method=name))
    if arm.share and arm_of(cfg, arm.share).share:
        raise ValueError(f"variant {name!r} shares {arm.share!r}, which shares another arm")
    return arm


def cells(cfg: StudyConfig) -> list[Cell]:
    grid = [(a, b) for a in cfg.arms for b in cfg.budgets]
    extra = [tuple(c.split("@", 1)) for c in cfg.extra_cells]
    if cfg.order == "seed":
        main = [Cell(a, b, s) for s in cfg.seeds for a, b in grid]
    else:
        main = [Cell(a, b, s) for a, b in grid for s in cfg.seeds]
    return main + [Cell(a, b, s) for a, b in extra if (a, b) not in grid
                   for s in cfg.extra_seeds or cfg.seeds]


def pretrain_ratio(cfg: StudyConfig, budget: str) -> str:
    """The PT-FT ratio whose pre-training pool a cell pre-trains on: a ratio budget's own (the
    pools of one ratio are disjoint; ``data.ratio``'s pre-training pool holds most of a larger
    ratio's labels), else ``data.ratio``. With ``data.pretrain_shards`` no pool is used."""
    if budget == "all" or budget.isdigit() or cfg.data.pretrain_shards:
        return cfg.data.ratio
    return budget


def pretrain_name(cfg: StudyConfig, cell: Cell) -> tuple[str, str]:
    """(folder name, MLflow run name) of the cell's own pre-training (``share`` not resolved):
    ``<arm>-s<seed>``, or ``<arm>-r<ratio>-s<seed>`` for another ratio's pool."""
    seed = cfg.seeds[0] if cfg.pretrain_once else cell.seed
    ratio = pretrain_ratio(cfg, cell.budget)
    if ratio == cfg.data.ratio:
        return f"{cell.arm}-s{seed}", f"pretrain {cell.arm} seed {seed}"
    return f"{cell.arm}-r{ratio}-s{seed}", f"pretrain {cell.arm} ratio {ratio} seed {seed}"
