#!/usr/bin/env python
"""A study in one command: pre-training arms x label budgets x seeds, scored on the test split.

    python launch/study.py --config configs/study/tiny.yaml out=OUT          # synthetic, minutes
    python launch/study.py --config configs/study/xca-cadml.yaml out=OUT     # real angiograms
    python launch/study.py --config configs/study/xca-cadml.yaml out=OUT report_only=true

Relaunch the same command to continue an interrupted study (finished cells are skipped).
Writes OUT/results.csv, OUT/results.md and OUT/dice_vs_budget.png; see docs/study.md.
"""

from __future__ import annotations

import sys

from cmunet.config import parse_cli
from cmunet.study import StudyConfig, run_study


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(StudyConfig, __doc__, argv)
    out = run_study(cfg)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'dice_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
