"""Triton PatchMatch, one query pixel per lane: the search rebuilt for the GPU's instruction budget.

Same folded contract, candidates and random streams as :mod:`.search_tiles` (the launcher in
:mod:`.search` picks one of the two): init, then per iteration the jump-flood propagation steps
8, 4, 2, 1 (all ``K`` matches of the four neighbours at each step) and the random search (one
uniform candidate in each window of radius ``max(Hk, Wk) / 2^s`` around each of the ``K``
matches). The random search only reads the lane's own list, so it runs in the launch of the last
propagation step: four launches per iteration instead of five, and the same field.

What changed against the tiles, and why (``docs/gpu`` and ``../shared/GPU-STATIC.md`` measured
the tiles issue-bound at about 126 SASS instructions per patch value, the authors' kernel at 8):

- One lane is one query pixel and owns its whole patch: a patch value costs two loads, a
  subtraction and a fused multiply-add, with no reduction across lanes and no block barrier.
- The patch loops are compile-time: the channels of a row (``CU`` of them, a divisor of ``C``)
  and its ``P`` columns are unrolled, and only the rows are a run-time loop, with the l2 early
  exit after each row (``tl.max`` over the block: shuffles inside one warp).
- Positions and offsets within a map are int32; the only 64-bit arithmetic is a lane's map base
  pointer, computed once per program (``C * padded map`` must stay below 2**31: the launcher
  checks).
- ``PAD``: the maps are replicate-padded copies (``r`` on each side, in their own dtype), so a
  patch row is ``P`` contiguous values at compile-time offsets from one row pointer, with no
  clamp. Without ``PAD`` the caller's tensors are read in place and every column is clamped
  (one more integer instruction per value, no copy: the layer's memory).
- Lists are ``K`` separate ``(BLOCK,)`` register tensors (``K`` compile-time), int32 indices and
  float32 costs, kept sorted with compile-time selects; fields between launches are int32.
- Loads carry no masks: lanes past the end read pixel 0 of map 0 and candidates that cannot be
  taken read a valid position; their costs are computed and dropped.
- ``TILE`` (for Triton's interpreter, where every op costs Python time): a row is one
  ``(CU2, PW, BLOCK)`` tile instead of ``CU * P`` scalar loads. Same sums, another order.

Ties, NaN (read as +inf), empty slots (index -1, cost +inf: they rank after every real entry,
+inf included), masks and duplicates behave as in the tiles kernels, and the random counters are
the same, so both kernels return the same field up to the last bits of the costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..device import cuda_device_of
from .counters import launch_key, uniform
from .neighbours import jump_neighbour

_SIZES = ["N", "H", "W", "Hk", "Wk", "C", "M", "QW", "QS", "KW", "KS", "has_mask", "key_lo", "key_hi"]


@triton.jit
def _any(x):
    """Whether any lane of the block holds True (a scalar)."""
    return tl.max(x.to(tl.int32), axis=0) > 0


@triton.jit
def _row_cost(
    acc, qr, kr, qj0, kj0, Wm, Wkm, QS, KS, c0,
    P: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``acc`` plus the cost of channels ``c0 .. c0 + CU`` of one patch row, unrolled. ``qr``/``kr``:
    the lanes' row pointers (``PAD``: at the patch's first column; else at column 0 of the row,
    and ``qj0``/``kj0`` the patch's first column, clamped per value)."""
    for c in tl.static_range(CU):
        qc = qr + (c0 + c) * QS
        kc = kr + (c0 + c) * KS
        for dj in tl.static_range(P):
            if PAD:
                a = tl.load(qc + dj).to(ACC)
                b = tl.load(kc + dj).to(ACC)
            else:
                a = tl.load(qc + tl.minimum(tl.maximum(qj0 + dj, 0), Wm)).to(ACC)
                b = tl.load(kc + tl.minimum(tl.maximum(kj0 + dj, 0), Wkm)).to(ACC)
            if DOT:
                acc -= a * b
            else:
                d = a - b
                acc += d * d
    return acc


@triton.jit
def _tile_cost(
    qb, kb, qi, qj, ki, kj, H, W, Hk, Wk, C, QW, QS, KW, KS,
    P: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, CU2: tl.constexpr, PW: tl.constexpr,
):  # fmt: skip
    """The whole patch cost as ``(PW, CU2, PW, BLOCK)`` tiles (rows, channels, columns, lanes):
    what the interpreter runs, a few ops per candidate instead of a few per value."""
    R: tl.constexpr = P // 2
    di = tl.arange(0, PW)[:, None, None, None]
    c = tl.arange(0, CU2)[None, :, None, None]
    dj = tl.arange(0, PW)[None, None, :, None]
    inside = (di < P) & (c < CU) & (dj < P)
    if PAD:
        qo = (qi[None, None, None, :] + di) * QW + qj[None, None, None, :] + dj
        ko = (ki[None, None, None, :] + di) * KW + kj[None, None, None, :] + dj
    else:
        qo = tl.minimum(tl.maximum(qi[None, None, None, :] + (di - R), 0), H - 1) * QW
        qo += tl.minimum(tl.maximum(qj[None, None, None, :] + (dj - R), 0), W - 1)
        ko = tl.minimum(tl.maximum(ki[None, None, None, :] + (di - R), 0), Hk - 1) * KW
        ko += tl.minimum(tl.maximum(kj[None, None, None, :] + (dj - R), 0), Wk - 1)
    acc = tl.zeros([BLOCK], ACC)
    for c0 in range(0, C, CU):
        a = tl.load(qb[None, None, None, :] + (qo + (c0 + c) * QS), mask=inside, other=0.0).to(ACC)
        b = tl.load(kb[None, None, None, :] + (ko + (c0 + c) * KS), mask=inside, other=0.0).to(ACC)
        if DOT:
            acc -= tl.sum(tl.reshape(a * b, [PW * CU2 * PW, BLOCK]), axis=0)
        else:
            d = a - b
            acc += tl.sum(tl.reshape(d * d, [PW * CU2 * PW, BLOCK]), axis=0)
    return acc


@triton.jit
def _patch_cost(
    qb, kb, qi, qj, ki, kj, live, worst, H, W, Hk, Wk, C, QW, QS, KW, KS,
    P: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, CU2: tl.constexpr, PW: tl.constexpr,
):  # fmt: skip
    """Patch costs ``(BLOCK,)`` between the lanes' query pixels ``(qi, qj)`` and key positions
    ``(ki, kj)`` (int32, valid everywhere). The l2 sum stops after the row where no lane of the
    block ``live`` can still beat its ``worst``; a stopped lane's cost is a partial sum, already
    at or above its worst, so it is never taken."""
    if TILE:
        return _tile_cost(qb, kb, qi, qj, ki, kj, H, W, Hk, Wk, C, QW, QS, KW, KS, P, CU, PAD, DOT, ACC, BLOCK, CU2, PW)
    R: tl.constexpr = P // 2
    acc = tl.zeros([BLOCK], ACC)
    if PAD:
        # Padded coordinates: the patch of (i, j) starts at padded (i, j).
        qj0 = qj
        kj0 = kj
    else:
        qj0 = qj - R
        kj0 = kj - R
    go = _any(live)
    di = 0
    while (di < P) & go:
        if PAD:
            qr = qb + ((qi + di) * QW + qj)
            kr = kb + ((ki + di) * KW + kj)
        else:
            qr = qb + tl.minimum(tl.maximum(qi + (di - R), 0), H - 1) * QW
            kr = kb + tl.minimum(tl.maximum(ki + (di - R), 0), Hk - 1) * KW
        for c0 in range(0, C, CU):
            acc = _row_cost(acc, qr, kr, qj0, kj0, W - 1, Wk - 1, QS, KS, c0, P, CU, PAD, DOT, ACC)
        if not DOT:
            # Partial l2 sums only grow (a NaN partial sum stops too: the cost reads as +inf).
            live = live & (acc < worst)
            go = _any(live)
        di += 1
    return acc


@triton.jit
def _insert(L: tl.constexpr, c, cand, take, K: tl.constexpr):
    """The sorted list ``L`` (``2K`` tensors: indices, then costs) after inserting candidate
    ``cand`` of cost ``c`` on the lanes ``take``: after every entry it does not beat (ties keep
    the older entry first), before every empty slot."""
    idx = ()
    cost = ()
    below_prev = take
    for j in tl.static_range(K):
        below = take & ((L[j] < 0) | (c < L[K + j]))
        if j == 0:
            nidx = tl.where(below, cand, L[j])
            ncost = tl.where(below, c, L[K + j])
        else:
            nidx = tl.where(below, tl.where(below_prev, L[j - 1], cand), L[j])
            ncost = tl.where(below, tl.where(below_prev, L[K + j - 1], c), L[K + j])
        idx = idx + (nidx,)
        cost = cost + (ncost,)
        below_prev = below
    return idx + cost


@triton.jit
def _offer(
    L, ki, kj, ok, qb, kb, qi, qj, mask_ptr, mbase, has_mask, H, W, Hk, Wk, C, QW, QS, KW, KS,
    P: tl.constexpr, K: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, TILE: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CU2: tl.constexpr, PW: tl.constexpr,
):  # fmt: skip
    """The list ``L`` after offering key position ``(ki, kj)`` (int32, inside the key map where
    ``ok``) to the lanes ``ok``; masked and duplicate candidates are dropped."""
    cand = ki * Wk + kj
    allowed = tl.load(mask_ptr + (mbase + cand), mask=ok & (has_mask != 0), other=1)
    ok = ok & (allowed != 0)
    for j in tl.static_range(K):
        ok = ok & (L[j] != cand)
    # Blocks where no lane has anything new (common once the field is coherent) skip the rest.
    if _any(ok):
        ki = tl.where(ok, ki, 0)
        kj = tl.where(ok, kj, 0)
        c = _patch_cost(
            qb, kb, qi, qj, ki, kj, ok, L[2 * K - 1], H, W, Hk, Wk, C, QW, QS, KW, KS,
            P, CU, PAD, TILE, DOT, ACC, BLOCK, CU2, PW,
        ).to(tl.float32)  # fmt: skip
        c = tl.where(c != c, float("inf"), c)  # NaN -> +inf
        L = _insert(L, c, cand.to(tl.int32), ok, K)
    return L


@triton.jit
def _lanes(
    q_ptr, k_ptr, qpos_ptr, N, H, W, Hk, Wk, C, M, QW, QS, KW, KS,
    PAD: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """What a program computes once: its lanes (one searched query pixel each, of any map),
    their list slot ``m`` and map ``n``, global pixel ``g = n * H * W + pix`` (what random
    counters are keyed on), coordinates, and the map base pointers of query and key."""
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = s < N.to(tl.int64) * M
    s = tl.where(lane, s, 0)  # lanes past the end search pixel 0 of map 0, unseen
    n = s // M
    m = s - n * M
    if SPARSE:
        pix = tl.load(qpos_ptr + m).to(IDX)
    else:
        pix = m.to(IDX)
    g = n * H * W + pix
    qi = pix // W
    qj = pix - qi * W
    qb = q_ptr + n * C * QS
    kb = k_ptr + n * C * KS
    return s, lane, n, m.to(IDX), g, qi, qj, qb, kb


@triton.jit
def _load_list(src_idx, src_cost, n, m, lane, M, K: tl.constexpr, LOAD: tl.constexpr, BLOCK: tl.constexpr):
    """The lanes' lists (``K`` index tensors, then ``K`` cost tensors) from a field ``(N, K, M)``,
    or empty ones."""
    fbase = n * K * M + m
    idx = ()
    cost = ()
    for j in tl.static_range(K):
        if LOAD:
            idx = idx + (tl.load(src_idx + (fbase + j * M), mask=lane, other=-1),)
            cost = cost + (tl.load(src_cost + (fbase + j * M), mask=lane, other=float("inf")),)
        else:
            idx = idx + (tl.full([BLOCK], -1, tl.int32),)
            cost = cost + (tl.full([BLOCK], float("inf"), tl.float32),)
    return idx + cost


@triton.jit
def _store_list(L, dst_idx, dst_cost, n, m, lane, M, K: tl.constexpr):
    fbase = n * K * M + m
    for j in tl.static_range(K):
        tl.store(dst_idx + (fbase + j * M), L[j], mask=lane)
        tl.store(dst_cost + (fbase + j * M), L[K + j], mask=lane)


@triton.jit(do_not_specialize=_SIZES + ["K0"])
def _init_kernel(
    q_ptr, k_ptr, mask_ptr, table_ptr, nallowed_ptr, init_ptr, dst_idx, dst_cost, qpos_ptr,
    N, H, W, Hk, Wk, C, M, QW, QS, KW, KS, has_mask, key_lo, key_hi, K0,
    P: tl.constexpr, K: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, TILE: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
    CU2: tl.constexpr, PW: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    _, lane, n, slot, g, qi, qj, qb, kb = _lanes(q_ptr, k_ptr, qpos_ptr, N, H, W, Hk, Wk, C, M, QW, QS, KW, KS, PAD, SPARSE, BLOCK, IDX)
    L = _load_list(dst_idx, dst_cost, n, slot, lane, M, K, False, BLOCK)
    Nk = Hk * Wk
    mbase = n * Nk
    nal = tl.load(nallowed_ptr + n)
    # K distinct ranks among the allowed positions, kept sorted (as in the tiles kernel): the m-th
    # is drawn below the count not taken yet, then stepped past every taken rank at or below it.
    taken = ()
    for m in tl.static_range(K):
        r = uniform(key_lo, key_hi, g * K + m, nal - m)
        for s in tl.static_range(m):
            r += (r >= taken[s]).to(tl.int64)
        new = ()
        for s in tl.static_range(m + 1):
            if s == m:
                if m == 0:
                    new = new + (r,)
                else:
                    new = new + (tl.maximum(r, taken[m - 1]),)
            elif s == 0:
                new = new + (tl.minimum(r, taken[0]),)
            else:
                new = new + (tl.where(r < taken[s], tl.maximum(r, taken[s - 1]), taken[s]),)
        taken = new
    # A run-time loop over the ranks (one copy of the cost code, not K: compile time).
    for m in range(K):
        r = taken[0]
        for j in tl.static_range(1, K):
            r = tl.where(m == j, taken[j], r)
        y = tl.load(table_ptr + (mbase + r), mask=has_mask != 0, other=0).to(tl.int64)
        y = tl.where(has_mask != 0, y, r).to(IDX)
        ki = y // Wk
        # Allowed by construction: no mask lookup (has_mask = 0).
        L = _offer(
            L, ki, y - ki * Wk, lane, qb, kb, qi, qj, mask_ptr, mbase, 0, H, W, Hk, Wk, C, QW, QS, KW, KS,
            P, K, CU, PAD, TILE, DOT, ACC, BLOCK, CU2, PW,
        )  # fmt: skip
    for m in range(K0):
        y = tl.load(init_ptr + ((n * K0 + m) * M + slot), mask=lane, other=-1)
        ok = lane & (y >= 0) & (y < Nk)
        y = tl.where(ok, y, 0).to(IDX)
        ki = y // Wk
        L = _offer(
            L, ki, y - ki * Wk, ok, qb, kb, qi, qj, mask_ptr, mbase, has_mask, H, W, Hk, Wk, C, QW, QS, KW, KS,
            P, K, CU, PAD, TILE, DOT, ACC, BLOCK, CU2, PW,
        )  # fmt: skip
    _store_list(L, dst_idx, dst_cost, n, slot, lane, M, K)


@triton.jit(do_not_specialize=_SIZES + ["step", "num_radii", "prop_k", "rand_k"])
def _iterate_kernel(
    q_ptr, k_ptr, mask_ptr, src_idx, src_cost, dst_idx, dst_cost, qpos_ptr, nbr_ptr,
    N, H, W, Hk, Wk, C, M, QW, QS, KW, KS, has_mask, key_lo, key_hi, step, num_radii, prop_k, rand_k,
    P: tl.constexpr, K: tl.constexpr, CU: tl.constexpr, PAD: tl.constexpr, TILE: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
    CU2: tl.constexpr, PW: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """One jump-flood step at distance ``step`` (0: none), offering the first ``prop_k`` matches
    of each neighbour, then, when ``num_radii > 0``, the random search around the first
    ``rand_k`` matches (``K`` and ``K`` by default; fewer is the authors' cheaper scheme).
    ``SPARSE``: ``nbr_ptr`` holds, for each direction and listed pixel, the list slot of its
    neighbour at this step (-1: not listed), ``(4, M)``."""
    _, lane, n, slot, g, qi, qj, qb, kb = _lanes(q_ptr, k_ptr, qpos_ptr, N, H, W, Hk, Wk, C, M, QW, QS, KW, KS, PAD, SPARSE, BLOCK, IDX)
    L = _load_list(src_idx, src_cost, n, slot, lane, M, K, True, BLOCK)
    mbase = n * Hk * Wk
    if step > 0:
        for t in range(4 * prop_k):
            d = t // prop_k
            dy, dx, nslot, near = jump_neighbour(d, step, qi, qj, lane, slot, nbr_ptr, H, W, M, SPARSE)
            nslot = nslot.to(IDX)
            y = tl.load(src_idx + (n * K * M + nslot + (t - d * prop_k) * M), mask=near, other=0).to(IDX)
            ki = y // Wk
            kj = y - ki * Wk - dx
            ki -= dy
            ok = near & (ki >= 0) & (ki < Hk) & (kj >= 0) & (kj < Wk)
            L = _offer(
                L, ki, kj, ok, qb, kb, qi, qj, mask_ptr, mbase, has_mask, H, W, Hk, Wk, C, QW, QS, KW, KS,
                P, K, CU, PAD, TILE, DOT, ACC, BLOCK, CU2, PW,
            )  # fmt: skip
    # Random search: windows around the matches the list held after propagation.
    start = L
    Rmax = tl.maximum(Hk, Wk)
    ctr = g * (2 * K * num_radii)  # two draws (row, column) per window
    for t in range(rand_k * num_radii):
        a = t // num_radii
        s = t - a * num_radii
        y = start[0]
        for j in tl.static_range(1, K):
            y = tl.where(a == j, start[j], y)
        y = y.to(IDX)
        br = y // Wk
        bc = y - br * Wk
        R = Rmax >> s
        lo_r = tl.maximum(br - R, 0)
        lo_c = tl.maximum(bc - R, 0)
        c0 = ctr + 2 * t
        ki = lo_r + uniform(key_lo, key_hi, c0, tl.minimum(br + R, Hk - 1) - lo_r + 1).to(IDX)
        kj = lo_c + uniform(key_lo, key_hi, c0 + 1, tl.minimum(bc + R, Wk - 1) - lo_c + 1).to(IDX)
        L = _offer(
            L, ki, kj, lane, qb, kb, qi, qj, mask_ptr, mbase, has_mask, H, W, Hk, Wk, C, QW, QS, KW, KS,
            P, K, CU, PAD, TILE, DOT, ACC, BLOCK, CU2, PW,
        )  # fmt: skip
    _store_list(L, dst_idx, dst_cost, n, slot, lane, M, K)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# Channels of a patch row unrolled at compile time at most (a divisor of C: no channel masks). sm_90
# SASS per value, bf16 C = 64 p = 3: 8.25 at 8, 8.1 at 16, 8.06 at 32; compile time 4 s, 10 s, 33 s.
CU_MAX = 8
# Interpreter: one big block, a row tile of at most this many elements (a few MiB).
_INTERP_BLOCK_MAX, _INTERP_TILE = 4096, 1 << 18
# Under the interpreter a row is one tile (fast); False runs the unrolled GPU code instead (tests).
INTERPRETER_TILE = True


def channel_unroll(C: int, cap: int = CU_MAX) -> int:
    """The channels of a row unrolled at once: the largest divisor of ``C`` up to ``cap``."""
    return max(d for d in range(1, min(C, cap) + 1) if C % d == 0)


def config(pb, pad: bool = True, block: int = 32, warps: int = 1) -> dict:
    """The compile-time constants and launch options of a search of the prepared problem ``pb``."""
    cu = channel_unroll(pb.C)
    pw = _next_pow2(pb.P)
    # int32 positions on a GPU; int64 under the interpreter, which checks every int32 op for overflow.
    idx = tl.int64 if pb.interpreted else tl.int32
    cfg = dict(P=pb.P, K=pb.K, CU=cu, PAD=pad, DOT=pb.dot, ACC=pb.acc, SPARSE=pb.sparse, CU2=_next_pow2(cu), PW=pw, IDX=idx)
    if pb.interpreted:
        tile = INTERPRETER_TILE
        cap = _INTERP_BLOCK_MAX if not tile else max(16, min(_INTERP_BLOCK_MAX, _INTERP_TILE // (cfg["CU2"] * pw)))
        cap = 1 << (cap.bit_length() - 1)  # a power of two
        cfg.update(TILE=tile, BLOCK=min(max(_next_pow2(pb.N * pb.M), 16), cap))
    else:
        cfg.update(TILE=False, BLOCK=block, num_warps=warps)
    return cfg


def run(pb, pad: bool = True, block: int = 32, warps: int = 1, prop_k: int | None = None, rand_k: int | None = None):
    """The search of the prepared problem ``pb`` (:class:`.search.Problem`) with these kernels:
    fields ``(N, K, M)`` int32 and float32. ``prop_k``/``rand_k``: how many of a neighbour's
    matches are propagated and around how many of its own a pixel searches (default ``K``)."""
    prop_k = pb.K if prop_k is None else max(1, min(int(prop_k), pb.K))
    rand_k = pb.K if rand_k is None else max(1, min(int(rand_k), pb.K))
    N, C, H, W, Hk, Wk, P, M = pb.N, pb.C, pb.H, pb.W, pb.Hk, pb.Wk, pb.P, pb.M
    r = P // 2
    if pad:
        q = F.pad(pb.query.to(pb.dtype), (r, r, r, r), mode="replicate").contiguous()
        k = F.pad(pb.key.to(pb.dtype), (r, r, r, r), mode="replicate").contiguous()
    else:
        q, k = pb.query, pb.key  # read in place, each in its own dtype
    QW, KW = q.shape[-1], k.shape[-1]
    QS, KS = q.shape[-2] * QW, k.shape[-2] * KW
    cfg = config(pb, pad, block, warps)
    grid = (triton.cdiv(N * M, cfg["BLOCK"]),)
    sizes = (N, H, W, Hk, Wk, C, M, QW, QS, KW, KS, pb.has_mask)
    idx, cost, spare_idx, spare_cost = pb.buffers(torch.int32)
    with cuda_device_of(pb.query):
        _init_kernel[grid](
            q, k, pb.mask_u8, pb.table, pb.n_allowed, pb.init, idx, cost, pb.qpos, *sizes, *launch_key(pb.seed, -1), pb.K0, **cfg
        )
        for step, radii, nbr, key in pb.schedule():
            _iterate_kernel[grid](
                q, k, pb.mask_u8, idx, cost, spare_idx, spare_cost, pb.qpos, nbr, *sizes, *key, step, radii, prop_k, rand_k, **cfg
            )
            idx, cost, spare_idx, spare_cost = spare_idx, spare_cost, idx, cost
    return idx, cost
