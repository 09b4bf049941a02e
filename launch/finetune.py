#!/usr/bin/env python
"""Fine-tune a segmentation UNet on the fine-tuning pool of a PT-FT ratio.

The command `cmunet-finetune`; its code is cmunet/cli/finetune.py (see --help).
"""

import sys

from cmunet.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
