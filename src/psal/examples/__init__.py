"""Runnable examples: ``python -m psal.examples.<name>``."""
