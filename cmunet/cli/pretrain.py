#!/usr/bin/env python
"""Self-supervised pre-training of a UNet on unlabeled angiograms (CM-UNet and baselines).

One process (CPU or one GPU):
    python launch/pretrain.py --config configs/pretrain/cmunet-cpu.yaml data.shards=SHARDS out=OUT
Several ranks on one machine (CPU ranks use gloo, GPUs NCCL):
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/pretrain/cmunet-cpu.yaml ...
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
Several nodes:
    deepspeed --hostfile hostfile launch/pretrain.py --config configs/pretrain/cmunet.yaml ...
What it would do (pool, global batch, lr, steps, checkpoint resumed), without starting:
    python launch/pretrain.py --config ... --dry-run

Relaunching the same command resumes from the newest compatible checkpoint in OUT/checkpoints.
SIGTERM / SIGINT write a checkpoint and exit with 75 (relaunch to resume). User mistakes exit 2
with a one-line error. The export for fine-tuning is written to OUT/export/.
"""

from __future__ import annotations

import sys

from cmunet.config import parse_cli
from cmunet.preempt import PREEMPTED, Preempted
from cmunet.training.pretrain import pretrain
from cmunet.training.pretrain_config import PretrainConfig

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    cfg = parse_cli(PretrainConfig, __doc__, [a for a in argv if a != "--dry-run"])
    try:
        if dry_run:
            from cmunet.training.dry_run import describe, pretrain_plan

            print(describe(pretrain_plan(cfg)))
            return 0
        pretrain(cfg)
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return PREEMPTED
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
