#!/usr/bin/env python
"""Choose which frames of a shard set to annotate, with the encoder of a pre-training export.

    python launch/select_frames.py --config configs/select/cpu.yaml data.shards=SHARDS export=EXPORT budget=8 out=OUT
    python launch/select_frames.py --config configs/select/cpu.yaml data.shards=SHARDS export=none strategy=random out=OUT

Every frame of a non-test pool of the shards' splits (data.pool: finetune, pretrain or train of
data.ratio; never the test split) is embedded with the encoder; a strategy (typiclust, kcenter,
random) then picks budget frames, at most one per patient until every patient has one. Writes
OUT/picks.csv, OUT/contact_sheet.png, OUT/result.json, OUT/config.yaml and OUT/embeddings/ (a
rerun reuses it), and one MLflow run. See docs/finetune.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import exit_status, start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-select", argv)  # --version; one line if the 'mlflow' extra is missing
    from cmunet.config import parse_cli
    from cmunet.selection.config import SelectConfig

    cfg = parse_cli(SelectConfig, __doc__, argv, command="cmunet-select", kind="select")
    from cmunet.selection.job import run_select  # torch: after --help and --print-config

    return exit_status(lambda: run_select(cfg))


if __name__ == "__main__":
    sys.exit(main())
