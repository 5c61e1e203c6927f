"""``python -m longcat_native ...`` (and ``torchrun --nproc-per-node N -m longcat_native generate
...``): the command line of longcat_native/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
