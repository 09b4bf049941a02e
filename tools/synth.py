"""Write a synthetic angiogram data set (images, vessel masks, meta.csv); see --help.

The command `cmunet-synth`; its code is cmunet/cli/synth.py (see --help).
Example: python tools/synth.py --out demo/synth --count 60 --size 256 --seed 0
"""

import sys

from cmunet.cli.synth import main

if __name__ == "__main__":
    sys.exit(main())
