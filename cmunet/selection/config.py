"""The typed config of ``cmunet-select`` (``launch/select_frames.py``): which shard set and pool,
which encoder, how many frames and by which strategy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cmunet.config import check
from cmunet.data import location
from cmunet.data.splits import POOLS, check_ratio
from cmunet.tracking.mlflow_run import TrackingConfig

TEST_POOLS = ("test", "all")  # pools holding test-split frames: selection never reads them
SELECTABLE = tuple(p for p in POOLS if p not in TEST_POOLS)
Strategy = Literal["typiclust", "kcenter", "random"]


@dataclass
class SelectData:
    """The frames to choose from: a non-test pool of a shard set's splits."""

    shards: str = ""  # shard set of tools/shard.py: folder or URL (s3://, gs://, https://, pipe:)
    ratio: str = "79-1"  # PT-FT ratio whose pool (pool=finetune or pretrain) the frames come from
    pool: str = "finetune"  # pool of splits.json to choose from: finetune, pretrain or train
    num_workers: int = 0  # DataLoader worker processes reading the shards
    # time-outs and retries of reads from a URL (s3://, gs://, http(s)://, pipe:)
    remote: location.RemoteConfig = field(default_factory=location.RemoteConfig)

    def __post_init__(self):
        check_ratio(self.ratio)
        check(self.pool not in TEST_POOLS, "pool", f"= {self.pool!r} holds test-split frames, "
              f"which selection never reads; use one of {', '.join(SELECTABLE)}")
        check(self.pool in SELECTABLE, "pool",
              f"= {self.pool!r} must be one of {', '.join(SELECTABLE)}")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class SelectConfig:
    # pre-training export folder (or .safetensors file, runs:/, models:/) whose encoder embeds
    # the frames, or "none" (random weights)
    export: str = "none"
    model_width: int = 64  # UNet width with export=none (an export brings its own width)
    budget: int = 8  # frames to pick
    # typiclust: the most typical frame of each k-means cluster (k = budget); kcenter: k-center
    # greedy (each pick the frame farthest from those picked); random: the reference
    strategy: Strategy = "typiclust"
    seed: int = 0  # seeds the picks (k-means start, first k-center, order) and export=none weights
    dims: int = 64  # principal components the strategies compare frames in (0 = all features)
    batch_size: int = 32  # frames embedded at once (the images held in memory)
    chunk_size: int = 1024  # frames per file of OUT/embeddings/ (what a rerun skips)
    out: str = ""  # output folder
    data: SelectData = field(default_factory=SelectData)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="cmunet-select"))

    def __post_init__(self):
        check(self.model_width > 0, "model_width", "must be positive")
        check(self.budget > 0, "budget", "must be positive")
        check(self.dims >= 0, "dims", "must be >= 0")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.chunk_size > 0, "chunk_size", "must be positive")
