#!/usr/bin/env python
"""Self-supervised pre-training of a UNet on unlabeled angiograms (CM-UNet and baselines).

The command `cmunet-pretrain`; its code is cmunet/cli/pretrain.py (see --help).
"""

import sys

from cmunet.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
