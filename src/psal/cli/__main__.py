"""``python -m psal.cli``: the same as the ``psal`` command."""

from .main import entry

entry()
