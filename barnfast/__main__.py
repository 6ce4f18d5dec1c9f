"""``python -m barnfast SUBCOMMAND ...``: the ``barnfast`` console script without the script."""

import sys

from barnfast.cli import main

sys.exit(main())
