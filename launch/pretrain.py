#!/usr/bin/env python
"""Self-supervised pre-training of a UNet on unlabeled angiograms (CM-UNet and baselines).

One process (CPU or one GPU):
    python launch/pretrain.py --config configs/pretrain/cmunet-cpu.yaml data.shards=SHARDS out=OUT
Several ranks on one machine (CPU ranks use gloo, GPUs NCCL):
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/pretrain/cmunet-cpu.yaml ...
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
Several nodes:
    deepspeed --hostfile hostfile launch/pretrain.py --config configs/pretrain/cmunet.yaml ...

Relaunching the same command resumes from the newest compatible checkpoint in OUT/checkpoints.
The export for fine-tuning is written to OUT/export/.
"""

from __future__ import annotations

import sys

from cmunet.config import parse_cli
from cmunet.training.pretrain import pretrain
from cmunet.training.pretrain_config import PretrainConfig


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(PretrainConfig, __doc__, argv)
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
