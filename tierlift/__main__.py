"""``python -m tierlift``: the same entry as the ``tierlift`` console script."""

import sys

from tierlift.launch.cli import main

sys.exit(main())
