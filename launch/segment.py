#!/usr/bin/env python
"""Segment the coronary vessels of new angiograms with a fine-tuned UNet.

The command `cmunet-segment`; its code is cmunet/cli/segment.py (see --help).
"""

import sys

from cmunet.cli.segment import main

if __name__ == "__main__":
    sys.exit(main())
