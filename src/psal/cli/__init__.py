"""Programs run from the command line (``python -m psal.cli.demo``); they print, the library does not."""
