#!/usr/bin/env python
"""Evaluate a fine-tuned UNet on the test split (or another pool, eval.pool=...).

The command `cmunet-evaluate`; its code is cmunet/cli/evaluate.py (see --help).
"""

import sys

from cmunet.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
