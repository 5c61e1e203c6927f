"""``python -m longcat_native ...``: the ``longcat-native`` command (cli.py)."""

import sys

from .cli import main

sys.exit(main())
