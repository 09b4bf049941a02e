#!/usr/bin/env python
"""The demo: the whole pipeline on synthetic angiograms, with no arguments and no private data.

The command `cmunet-demo`; its code is cmunet/cli/demo.py (see --help).
"""

import sys

from cmunet.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
