"""Backends, by engine and op: ``torch/`` (pure PyTorch, the oracle and the portable fallback),
``numba/`` (CPU), ``triton/`` (CUDA), each with ``search.py`` and ``attend.py``; ``dense.py`` (full
attention, the exact baseline). They share ``layout`` (folding, padding, channel-last) and
``device``; none imports the dispatcher or the public layer above, nor another engine."""
