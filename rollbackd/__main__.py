"""``python -m rollbackd``: the same as the ``rollbackd`` console script."""

import sys

from rollbackd.cli import main

sys.exit(main())
