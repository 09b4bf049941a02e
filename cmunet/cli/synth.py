#!/usr/bin/env python
"""Write a synthetic angiogram data set (images, vessel masks, meta.csv), for trying the toolkit
without data of one's own.

    cmunet-synth --out SYN --count 60 --size 256 --seed 1      (or: python tools/synth.py ...)

Writes SYN/images/synNNNN.png, SYN/masks/synNNNN.png and SYN/meta.csv; shard it with
cmunet-shard --images SYN/images --masks SYN/masks --meta SYN/meta.csv --out SHARDS.
With --cine N --frames F instead of --count: N multi-frame XA DICOM cine loops whose contrast
arrives, peaks and washes out (SYN/images/cineNNNN.dcm, SYN/meta.csv, SYN/cine.csv: the truth).
See docs/synthetic-data.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import add_common, apply_common, start


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-synth", argv)
    from cmunet.data import synth

    parser = synth.build_parser()
    add_common(parser, "cmunet-synth")
    apply_common(parser.parse_known_args(argv)[0])  # --log-level
    return synth.main(argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
