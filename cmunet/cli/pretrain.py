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

from cmunet.cli.common import start

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-pretrain", argv)  # --version; one line if the 'train' extra is missing
    from cmunet.config import parse_command
    from cmunet.job import mark_preempted
    from cmunet.preempt import PREEMPTED, Preempted
    from cmunet.training.pretrain import pretrain
    from cmunet.training.pretrain_config import PretrainConfig
    from cmunet.training.rendezvous import RendezvousError

    cfg, args = parse_command(PretrainConfig, __doc__, argv, command="cmunet-pretrain",
                              kind="pretrain", dry_run="print what it would do (pool, global "
                              "batch, lr, steps, checkpoint resumed) and exit, without starting")
    try:
        if args.dry_run:
            from cmunet.training.dry_run import describe, pretrain_plan

            print(describe(pretrain_plan(cfg)))
            return 0
        pretrain(cfg)
    except Preempted as stop:
        import signal

        # the checkpoint is complete: a launcher ending the other ranks once one of them exits
        # (deepspeed, torchrun) sends SIGTERM to this one too; it must not change the exit code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"preempted: {stop}", file=sys.stderr)
        mark_preempted()  # for a cmunet-job around the launcher
        return PREEMPTED
    except (*USER_ERRORS, RendezvousError) as err:  # a port in use: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
