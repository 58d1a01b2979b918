"""Backends. ``reference`` is pure PyTorch (the oracle and the portable search); ``numba_cpu`` is
the compiled CPU search. Nothing here imports from the public layer above."""
