#!/usr/bin/env python
"""Cross-validated fine-tuning search on Ray Tune; retrains, tests and registers the winner.

The command `cmunet-tune`; its code is cmunet/cli/tune.py (see --help).
"""

import sys

from cmunet.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
