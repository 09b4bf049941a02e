#!/usr/bin/env python
"""Turn folders of angiograms (PNG/JPEG/TIFF 8/16-bit, DICOM) into WebDataset shards.

The command `cmunet-shard`; its code is cmunet/cli/shard.py (see --help).
"""

import sys

from cmunet.cli.shard import main

if __name__ == "__main__":
    sys.exit(main())
