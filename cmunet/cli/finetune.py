#!/usr/bin/env python
"""Fine-tune a segmentation UNet on the fine-tuning pool of a PT-FT ratio.

    python launch/finetune.py --config configs/finetune/cpu.yaml data.shards=SHARDS init=EXPORT out=OUT
    python launch/finetune.py --config configs/finetune/cpu.yaml data.shards=SHARDS init=none out=OUT
    python launch/finetune.py --config configs/finetune/cpu.yaml data.shards=SHARDS init=EXPORT out=OUT unlabelled.weight=0.5

The third also trains on the split's unlabelled frames (consistency with an EMA teacher; off by
default). Validation images are carved out of the pool by patient; the test split is never read.
Writes OUT/best.safetensors, OUT/config.yaml, OUT/history.csv and OUT/result.json, and one MLflow
run. See docs/finetune.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-finetune", argv)  # --version; one line if the 'train' extra is missing
    from cmunet.config import parse_cli
    from cmunet.training.finetune import FinetuneConfig, run_finetune

    cfg = parse_cli(FinetuneConfig, __doc__, argv, command="cmunet-finetune",
                    kind="finetune")
    try:
        run_finetune(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
