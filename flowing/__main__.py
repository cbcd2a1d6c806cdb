"""``python -m flowing``: the same as the ``flowing`` command."""

import sys

from .cli import main

sys.exit(main())
