#!/usr/bin/env python
"""Cross-validated fine-tuning search on Ray Tune; retrains, tests and registers the winner.

    python launch/tune.py --config configs/tune/cpu.yaml data.shards=SHARDS init=EXPORT out=OUT
    python launch/tune.py --config configs/tune/paper.yaml data.shards=SHARDS init=models:/cmunet-pretrain/3 out=OUT search.address=auto
    python launch/tune.py --config ... --dry-run      # the pool, folds and trials; no Ray

Every lr x batch size is one trial: 3-fold cross-validation on the fine-tuning pool, folds grouped
by patient, every fold from the same initial weights. The best trial is retrained on the whole
pool, evaluated once on the test split and registered in MLflow (models:/cmunet@champion).
Writes OUT/trials.csv, OUT/folds.json, OUT/model/, OUT/model.onnx, OUT/test/, OUT/result.json. See
docs/tuning.md.
SIGTERM / SIGINT stop the search after saving its state (exit 75); relaunching the same command
(same out=) continues it without running finished trials, or finished folds, again.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-tune", argv)  # --version; one line if the 'tune' extra is missing
    from cmunet.config import parse_command
    from cmunet.job import mark_preempted
    from cmunet.preempt import PREEMPTED, Interrupted
    from cmunet.training.tune import TuneConfig, run_tune

    cfg, args = parse_command(TuneConfig, __doc__, argv, command="cmunet-tune",
                              kind="tune", dry_run="print the pool, the folds and the trials "
                              "and exit, without starting Ray")
    try:
        if args.dry_run:
            from cmunet.training.dry_run import search_plan

            print(search_plan(cfg))
            return 0
        run_tune(cfg)
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        mark_preempted()
        return PREEMPTED
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
