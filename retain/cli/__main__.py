"""``python -m retain.cli``: the same as the ``retain`` command."""

import sys

from retain.cli import main

sys.exit(main())
