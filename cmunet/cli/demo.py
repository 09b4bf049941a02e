#!/usr/bin/env python
"""The demo: the whole pipeline on synthetic angiograms, with no arguments and no private data.

    make demo            (or: python launch/demo.py [out=demo] [key=value ...])

Synthetic angiograms -> shards -> 2-rank deepspeed CM-UNet pre-training -> Ray Tune
cross-validated fine-tuning without and with pre-training -> test evaluation -> the winner
registered as models:/cmunet-demo@champion -> segmentation of held-out frames, then a summary.
About 10-15 minutes on 2 CPU cores. Everything lands in ./demo (MLflow store ./demo/mlflow.db);
relaunching continues an interrupted demo. See cmunet/demo.py for the keys.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-demo", argv)  # --version; one line if the 'tune' extra is missing
    from cmunet.config import parse_cli
    from cmunet.demo import DemoConfig, run_demo

    run_demo(parse_cli(DemoConfig, __doc__, argv, command="cmunet-demo"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
