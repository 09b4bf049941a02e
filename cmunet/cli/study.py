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

from cmunet.config import parse_cli
from cmunet.preempt import PREEMPTED, Interrupted, signals_interrupt
from cmunet.study import StudyConfig, run_study


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(StudyConfig, __doc__, argv)
    try:
        with signals_interrupt("the study"):
            out = run_study(cfg)
    except Interrupted as stop:  # the running search or pre-training saved its state first
        print(f"stopped: {stop}", file=sys.stderr)
        return PREEMPTED
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'dice_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
