#!/usr/bin/env python
"""Run a launcher's command as one job that stops cleanly on SIGTERM or SIGINT.

    cmunet-job deepspeed --num_gpus 2 launch/pretrain.py --config configs/pretrain/cmunet.yaml ...
    cmunet-job torchrun --nproc-per-node 2 launch/pretrain.py --config ...

A signal to cmunet-job reaches every process of the job; the ranks write the checkpoint of the
step they agree on, and cmunet-job exits with 75 once every one of them has ended (else with
the command's own exit code). A second signal kills the job at once. See docs/multinode.md.
"""

from __future__ import annotations

import argparse
import sys

from cmunet.cli.common import add_common, apply_common, command_parser, start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-job", argv)
    from cmunet.job import GRACE_S, run_job

    parser = command_parser(__doc__)
    parser.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS",
                        help="after a signal, kill what is still running after this long "
                             f"(default {GRACE_S:g})")
    add_common(parser, "cmunet-job")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher's command")
    args = parser.parse_args(argv)
    apply_common(args)
    if args.grace <= 0:
        parser.error(f"--grace must be positive, got {args.grace:g}")
    try:
        return run_job(args.command, grace_s=args.grace)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
