#!/usr/bin/env python
"""Choose which frames of a shard set to annotate, with the encoder of a pre-training export.

The command `cmunet-select`; its code is cmunet/cli/select.py (see --help). This file is not
called select.py: as the first folder on sys.path, it would hide the standard library's `select`
from every script beside it.
"""

import sys

from cmunet.cli.select import main

if __name__ == "__main__":
    sys.exit(main())
