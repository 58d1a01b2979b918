"""Seeds for the kernels' counter-based random numbers, derived in Python the same way for every
compiled backend: splitmix64 (Steele, Lea and Flood) of the caller's seed and a per-launch tag."""

from __future__ import annotations

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def stream(seed: int, tag: int) -> int:
    """A 64-bit key for launch ``tag`` (an iteration, or -1 for the initialisation) of a search
    seeded with ``seed``: splitmix64 of ``seed + (tag + 1) * golden``, with wrap-around."""
    z = (seed + (tag + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
