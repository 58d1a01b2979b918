"""Counter-based random numbers for the Triton search kernels: a 32-bit integer hash of (global
pixel, draw) under a per-launch key derived from the caller's seed, so that a pixel's draws depend
neither on which program runs it nor when, nor on which kernel family runs the search. (Triton's
Philox, ``tl.randint``, would do as well; the hash is a fraction of its operations, which matters
under the interpreter.)"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import rng


@triton.jit
def mix32(x):
    """lowbias32 (C. Wellons): a bijective hash of 32-bit values held in int64. Wrapping 64-bit
    products keep the low 32 bits exact, and 64-bit arithmetic carries no overflow check."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def uniform(key_lo, key_hi, ctr, n):
    """A uniform int64 in ``[0, n)`` (``1 <= n < 2^31``) for the int64 counter ``ctr``
    (``< 2^62``) under the launch key ``(key_lo, key_hi)`` (31 bits each)."""
    h = mix32(mix32((ctr & 0xFFFFFFFF) ^ key_lo) ^ (ctr >> 32) ^ key_hi)
    return (h * n.to(tl.int64)) >> 32


def launch_key(seed: int, tag: int) -> tuple[int, int]:
    """A per-launch hash key from the caller's seed (``rng.stream``; ``tag``: the iteration, -1
    for the initialisation): two 31-bit halves, so that they are always int32 arguments and the
    seed's value never changes the kernels' signature."""
    z = rng.stream(seed, tag)
    return z & 0x7FFFFFFF, (z >> 31) & 0x7FFFFFFF
