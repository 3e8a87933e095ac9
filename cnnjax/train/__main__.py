"""``python -m cnnjax.train``: the ``cnnjax-train`` command line."""

import sys

from cnnjax.train.cli import main

sys.exit(main())
