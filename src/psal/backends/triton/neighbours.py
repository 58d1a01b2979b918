"""The jump-flood neighbours that both Triton search families propagate from."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def jump_neighbour(d, step, qi, qj, lane, slot, nbr_ptr, H, W, M, SPARSE: tl.constexpr):
    """For direction ``d`` (0, 1: the neighbours at (0, +step), (0, -step); 2, 3: (+step, 0),
    (-step, 0)) of the lanes' query pixels ``(qi, qj)``: the offset ``(dy, dx)``, the neighbour's
    list slot, and whether it exists (on the map; ``SPARSE``: listed, from the ``(4, M)`` table
    ``nbr_ptr`` of this step, -1 where not)."""
    sign = 1 - 2 * (d % 2)
    dy = sign * step * (d // 2)
    dx = sign * step * (1 - d // 2)
    if SPARSE:
        nslot = tl.load(nbr_ptr + (d * M + slot), mask=lane, other=-1)
        near = lane & (nslot >= 0)
    else:
        ni = qi + dy
        nj = qj + dx
        near = lane & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
        nslot = ni * W + nj
    return dy, dx, nslot, near
