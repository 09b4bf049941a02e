#!/usr/bin/env python
"""A study in one command: pre-training arms x label budgets x seeds, scored on the test split.

    python launch/study.py --config configs/study/tiny.yaml out=OUT          # synthetic, minutes
    python launch/study.py --config configs/study/xca-cadml.yaml out=OUT     # real angiograms
    python launch/study.py --config configs/study/xca-cadml.yaml out=OUT report_only=true

Relaunch the same command to continue an interrupted study (finished cells are skipped).
SIGTERM or SIGINT stops it after the running search or pre-training saved its state (exit 75).
Writes OUT/results.csv, OUT/results.md and OUT/dice_vs_budget.png; see docs/study.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-study", argv)  # --version; one line if the 'tune' extra is missing
    from cmunet.config import parse_cli
    from cmunet.outdir import OutputError
    from cmunet.job import mark_preempted
    from cmunet.preempt import PREEMPTED, Interrupted, signals_interrupt
    from cmunet.study import StudyConfig, run_study

    cfg = parse_cli(StudyConfig, __doc__, argv, command="cmunet-study", kind="study")
    try:
        with signals_interrupt("the study"):
            out = run_study(cfg)
    except Interrupted as stop:  # the running search or pre-training saved its state first
        print(f"stopped: {stop}", file=sys.stderr)
        mark_preempted()
        return PREEMPTED
    except OutputError as err:  # out= is, holds or lies inside an input
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'dice_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
