#!/usr/bin/env python
"""Evaluate a fine-tuned UNet on the test split (or another pool, eval.pool=...).

    python launch/evaluate.py --config configs/finetune/cpu.yaml data.shards=SHARDS model=OUT out=EVAL

Reads OUT/best.safetensors; writes EVAL/metrics.json, EVAL/per_image.csv, EVAL/overlays.png and
EVAL/bland_altman.png, and one MLflow run. See docs/finetune.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-evaluate", argv)  # --version; one line if the 'train' extra is missing
    from cmunet.config import parse_cli
    from cmunet.evaluation.evaluate import run_evaluation
    from cmunet.training.finetune import FinetuneConfig

    cfg = parse_cli(FinetuneConfig, __doc__, argv, command="cmunet-evaluate",
                    kind="finetune")
    try:
        run_evaluation(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
