"""``python -m portattn``: the same command as the ``portattn`` console script."""

import sys

from .cli import main

sys.exit(main())
