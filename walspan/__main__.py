"""`python -m walspan ...`: the walspan command line."""

import sys

from .cli import main

sys.exit(main())
