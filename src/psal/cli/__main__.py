"""``python -m psal.cli``: the same as the ``psal`` command."""

import sys

from .main import main

sys.exit(main())
