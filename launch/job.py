#!/usr/bin/env python
"""Run a launcher's command as one job that stops cleanly on SIGTERM or SIGINT (exit 75).

The command `cmunet-job`; its code is cmunet/cli/job.py (see --help).
"""

import sys

from cmunet.cli.job import main

if __name__ == "__main__":
    sys.exit(main())
