"""The pre-training configuration (one YAML file per method and scale in configs/pretrain/)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from cmunet.config import check
from cmunet.data.location import RemoteConfig
from cmunet.methods import CMUNET_ABLATIONS
from cmunet.methods.cmunet import CMUNetConfig
from cmunet.methods.genesis import GenesisConfig
from cmunet.methods.mae import MAEConfig
from cmunet.methods.moco import MoCoConfig
from cmunet.methods.spark import SparKConfig
from cmunet.tracking.mlflow_run import TrackingConfig
from cmunet.training.probe import ProbeConfig
from cmunet.training.precision import Precision

MethodName = Literal["cmunet", "cmunet-rec", "cmunet-con", "none", "mae", "genesis", "spark",
                     "moco"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)


@dataclass
class ModelConfig:
    width: int = 64  # w: UNet widths w, 2w, 4w, 8w, 16w; 64 = the paper's 31.04 M UNet
    # batch norm of the UNets over the global batch, not each rank's micro-batch (slower: two
    # all-reduces per layer); the contrastive heads' batch norm is always global; on in the GPU
    # cmunet and cmunet-con configs and the contrastive study (+0.07-0.08 retrieval, results.md)
    sync_batch_norm: bool = False

    def __post_init__(self):
        check(self.width >= 2, "width", "must be >= 2")


@dataclass
class PretrainData:
    shards: str = ""  # shard set of tools/shard.py, folder or URL (s3://, gs://, https://, pipe:);
    # its test split is never pre-trained on
    ratio: str = "79-1"  # PT-FT ratio whose pool is used (splits.json)
    # train = every non-test sample; none = no sample of `shards` (pre-train on extra_shards only,
    # e.g. an archive from elsewhere; `shards` then only names the test split and the probe's pool)
    pool: Literal["pretrain", "train", "none"] = "pretrain"
    # more unlabeled images: every sample of these shard folders joins the pool (synthetic
    # angiograms, unlabeled archives); a folder holding a test image of `shards` (same source
    # SHA-256) is refused
    extra_shards: list[str] = field(default_factory=list)
    # visits per epoch of each extra folder's samples (one weight per folder; empty = 1 each,
    # i.e. in proportion to its size); 0.25 = a random quarter of the folder every epoch
    extra_weights: list[float] = field(default_factory=list)
    num_workers: int = 2  # data-loader processes per rank
    shuffle_buffer: int = 512
    # time-outs and retries of reads from a URL (s3://, gs://, http(s)://, pipe:)
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def __post_init__(self):
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(not self.extra_weights or len(self.extra_weights) == len(self.extra_shards),
              "extra_weights", "must give one weight per extra_shards folder (or none)")
        check(all(w >= 0 for w in self.extra_weights), "extra_weights", "must be >= 0")
        check(self.pool != "none" or bool(self.extra_shards), "pool",
              "none needs data.extra_shards: the folders to pre-train on")


@dataclass
class PretrainTrain:
    epochs: int = 300
    warmup_epochs: int = 40  # capped at epochs (a short trial run warms up over all of it)
    steps_per_epoch: int = 0  # optimizer steps per rank; 0 = one pass: pool / global batch, up
    micro_batch: int = 32  # per rank and micro-step
    grad_accum: int = 1
    # the global batch (micro_batch x grad_accum x ranks) the config was written for: a warning
    # when a run differs (LR, warm-up and batch statistics change with it); 0 = not stated
    global_batch: int = 0
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0  # 0 = no clipping
    zero_stage: int = 0
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the encoder and decoder (GPU; first steps slower)
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between MLflow metric points
    figure_every: int = 10  # epochs between reconstruction figures (and at the end)
    export_every: int = 0  # epochs between periodic exports (0 = final export only)
    export_epochs: list[int] = field(default_factory=list)  # more periodic exports, e.g. [30, 100]
    # seconds a rank waits in a collective before the job fails; rank 0 alone makes figures,
    # probes and exports at epoch ends while the others wait (DeepSpeed's default: 10 min)
    collective_timeout_s: int = 3600

    def __post_init__(self):
        check(self.epochs >= 0, "epochs", "must be >= 0 (0 = export the initialisation)")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.micro_batch >= 2, "micro_batch", "must be >= 2 (batch norm, negatives)")
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        check(self.global_batch >= 0, "global_batch", "must be >= 0 (0 = not stated)")
        check(0 < self.base_lr < float("inf"), "base_lr",
              "must be a positive number (the paper: 1.5e-4)")
        check(0 <= self.min_lr <= self.base_lr, "min_lr", "must be in [0, base_lr]")
        check(self.zero_stage in (0, 1, 2), "zero_stage", "must be 0, 1 or 2")
        check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(all(e > 0 for e in self.export_epochs), "export_epochs", "must be epochs >= 1")
        check(self.collective_timeout_s >= 60, "collective_timeout_s", "must be >= 60 seconds")


@dataclass
class PretrainConfig:
    method: MethodName = "cmunet"
    out: str = "runs/pretrain"
    seed: int = 0
    view_size: int = 224  # S: side of the views fed to the network
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    cmunet: CMUNetConfig = field(default_factory=CMUNetConfig)  # also cmunet-rec, cmunet-con
    mae: MAEConfig = field(default_factory=MAEConfig)
    genesis: GenesisConfig = field(default_factory=GenesisConfig)
    spark: SparKConfig = field(default_factory=SparKConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="cmunet-pretrain", register_as="cmunet-pretrain"))

    def __post_init__(self):
        check(self.view_size % 16 == 0, "view_size", "must be a multiple of 16")
        check(not (self.model.sync_batch_norm and self.method == "spark"), "model.sync_batch_norm",
              "is not available for spark (its masked batch norm runs per rank)")
        # what a method name implies wins over the sections, so the saved config says what ran
        if self.method in CMUNET_ABLATIONS:
            self.cmunet = replace(self.cmunet, **CMUNET_ABLATIONS[self.method])
        if self.method == "none":  # nothing to train: no step, the export is the initialisation
            self.train = replace(self.train, epochs=0, warmup_epochs=0, zero_stage=0)

    def warnings(self) -> list[str]:
        """Settings that run but bias what is learnt; logged at start-up (rank 0)."""
        found = []
        contrastive = (self.method.startswith("cmunet") and self.cmunet.contrastive
                       and self.cmunet.lambda_con > 0)
        if contrastive and self.train.grad_accum > 1:
            found.append(
                f"train.grad_accum={self.train.grad_accum}: InfoNCE's negatives come from one "
                f"micro-step ({self.train.micro_batch} x world size images), not from the global "
                "batch the learning rate is scaled for; prefer more ranks or a larger micro_batch "
                "(docs/pretraining.md)")
        return found
