#!/usr/bin/env python
"""A study in one command: pre-training arms x label budgets x seeds, scored on the test split.

The command `cmunet-study`; its code is cmunet/cli/study.py (see --help).
"""

import sys

from cmunet.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
