"""Triton attention over a k-NN field: forward and backward, for CUDA tensors.

Same folded contract as ``psal.backends.torch.attend`` (read its docstring for the notation): query
``(N, C, H, W)``, key ``(N, C, Hk, Wk)``, value ``(N, Cv, Hk, Wk)``, indices ``(N, K, H, W)``
(int64 or int32), a 0-dim temperature; the heads are already in the batch. On CPU tensors the
kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite
checks them without a GPU.

Memory first. The features are read where they are, channel-first, in their own dtype: no
channel-last, padded or float32 copies. Every gradient is accumulated in float32 registers and
stored once, in its tensor's dtype, on the unpadded map: the replicate padding's adjoint (a
border pixel receives what every clamped read of it contributed) is folded inside the kernels.
What is ``O(N * K * L)`` (scores, weights, the softmax's backward, the temperature gradient) is
left to PyTorch: a few float32 values per match.

- ``_costs``: the patch cost of every match, recomputed from the indices (one lane per match).
- ``_votes``: each output pixel ``z`` gathers its own votes (all offsets ``d`` and matches ``j``
  of the query patches ``x = z - d`` that cover it), so the forward pass writes without atomics.
- ``_score_grad``: ``d loss / d score`` of every match, again by gathering.
- ``_query_grad``: the query gradient, one lane per query pixel ``u``, gathering over the
  patches whose clamped reads land on ``u`` (one per offset inside the map; up to ``r + 1`` per
  axis on its border).
- Key and value gradients receive from many queries. ``_gather`` (deterministic: the path of
  ``torch.use_deterministic_algorithms(True)``):
  the matches are sorted by key position once (stable), and every key pixel sums, in a fixed
  order, the contributions of the matches whose clamped reads land on it. ``_scatter`` (the
  default, :func:`key_grad_path`): float32 atomics into a zero-initialised float32 map, then a
  cast; one such map at a time, below the backward's peak.

Tiles are ``(BLOCK, CB)``, lanes by channels. Their gathers have no provable contiguity on
either axis, and Triton's coalescing then orders threads along the first: a warp's threads hold
neighbouring pixels (coalesced loads from channel-first maps) and each thread its own pixel's
``CB`` channels, so that sums over channels stay inside a thread (``python -m psal.bench kernels``
shows it: no shuffles in the loops). Positions within a map are int32 (the dispatcher sends only problems whose channels
times map fit in 2**31 here) above per-lane map base offsets in int64; under the interpreter,
which checks every int32 operation for overflow, they are int64. Everything accumulates in
float32 (float64 for float64 inputs).

Sparse queries (``positions``, the pure-PyTorch backend's contract): the forward only. ``_costs``
takes its lanes from the list, and ``_votes`` gives one lane to each listed pixel, reading the list
slot of each covering patch from a ``(p * p, M)`` table (``layout.offset_tables``; -1: not
listed, no vote); the per-pixel max of "patch" is taken over the same table in PyTorch. Their
backward is the pure-PyTorch one (the dispatcher's ``SPARSE_BACKWARD``).

Only the block sizes, the channel chunk (a power of two, with masks), the dtype and the mode are
compile-time constants; sizes, ``K`` and the patch size are run-time arguments excluded from
specialisation, so a new image size or patch size never triggers a recompile.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import tall
from ..device import cuda_device_of, triton_interpreted
from ..layout import compute_dtype, offset_tables

_SIZES = ["C", "H", "W", "Hk", "Wk", "K", "P", "N", "M"]
# The indices these kernels read as they are.
INDEX_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _clamp(x, n):
    return tl.minimum(tl.maximum(x, 0), n - 1)


@triton.jit
def _covering(zi, zj, H, W, r):
    """How many query patches of radius ``r`` cover pixel ``(zi, zj)`` (``layout.vote_counts``)."""
    rows = tl.minimum(zi + r, H - 1) - tl.maximum(zi - r, 0) + 1
    cols = tl.minimum(zj + r, W - 1) - tl.maximum(zj - r, 0) + 1
    return (rows * cols).to(tl.float32)


@triton.jit
def _fold_range(u, n, d):
    """The positions ``x`` of a map of ``n`` whose read at offset ``d``, clamped, lands on ``u``:
    ``[lo, lo + count)`` (one inside the map, up to ``|d| + 1`` on its border, none past it)."""
    lo = tl.maximum(tl.where(u == 0, 0, u - d), 0)
    hi = tl.minimum(tl.where(u == n - 1, n - 1, u - d), n - 1)
    return lo, tl.maximum(hi - lo + 1, 0)


@triton.jit
def _pixel_lanes(N, M, Wm, C, BLOCK: tl.constexpr, CB: tl.constexpr, IDX: tl.constexpr):
    """A program's lanes over the pixels of ``N`` maps of ``M`` pixels, ``Wm`` wide, and its
    chunk of ``CB`` of the ``C`` channels: ``(on, n, u, ui, uj, ch, cm)``."""
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * M
    n, u = f // M, (f % M).to(IDX)
    ch = tl.program_id(1) * CB + tl.arange(0, CB)[None, :]
    return on, n, u, u // Wm, u % Wm, ch, ch < C


@triton.jit
def _fold_pairs(ui, uj, H, W, a, b, r, on):
    """The positions of an ``H x W`` map whose read at offset ``(a - r, b - r)``, clamped, lands on
    the lanes' pixel ``(ui, uj)``: a ``cnt`` of them (0 off the lanes ``on``), the ``t``-th
    being :func:`_fold_pair` ``(t, lo_i, lo_j, n_j, W)``."""
    lo_i, n_i = _fold_range(ui, H, a - r)
    lo_j, n_j = _fold_range(uj, W, b - r)
    return lo_i, lo_j, n_j, tl.where(on, n_i * n_j, 0)


@triton.jit
def _fold_pair(t, lo_i, lo_j, n_j, W):
    """The flat position of the ``t``-th pair of :func:`_fold_pairs` (valid where ``t < cnt``)."""
    ti = t // tl.maximum(n_j, 1)
    return (lo_i + ti) * W + lo_j + (t - ti * n_j)


@triton.jit(do_not_specialize=_SIZES)
def _costs(
    q, k, idx, cost, listed, C, H, W, Hk, Wk, K, P, N, M,
    DOT: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
    IDX: tl.constexpr,
):  # fmt: skip
    """cost[n, j, x] for a block of the flat (n, j, x) lanes (``x``: the ``M`` listed pixels
    ``listed`` when ``SPARSE``, else every pixel)."""
    L = M if SPARSE else H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L  # int64: sizes arrive as int32, their product may not fit
    n = f // (K * L)
    x = (f % L).to(IDX)
    if SPARSE:
        x = tl.load(listed + x, mask=on, other=0).to(IDX)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(IDX)
    yi, yj = y // Wk, y % Wk
    qb = q + n * C * H * W
    kb = k + n * C * Hk * Wk
    cc = tl.arange(0, CB)[None, :]
    r = P // 2
    acc = tl.zeros([BLOCK], ACC)
    for a in range(P):
        qrow = _clamp(xi + a - r, H) * W
        krow = _clamp(yi + a - r, Hk) * Wk
        for b in range(P):
            qpos = (qrow + _clamp(xj + b - r, W))[:, None]
            kpos = (krow + _clamp(yj + b - r, Wk))[:, None]
            for c0 in range(0, C, CB):
                ch = c0 + cc
                m = on[:, None] & (ch < C)
                u = tl.load(qb[:, None] + (ch * (H * W) + qpos), mask=m, other=0.0).to(ACC)
                v = tl.load(kb[:, None] + (ch * (Hk * Wk) + kpos), mask=m, other=0.0).to(ACC)
                if DOT:
                    acc -= tl.sum(u * v, axis=1)
                else:
                    d = u - v
                    acc += tl.sum(d * d, axis=1)
    tl.store(cost + f, acc, mask=on)


@triton.jit(do_not_specialize=_SIZES)
def _votes(
    v, idx, logw, shift, out, den_out, listed, tab, C, H, W, Hk, Wk, K, P, N, M,
    PATCH: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
    IDX: tl.constexpr,
):  # fmt: skip
    """out[n, c, z] = sum over offsets d and matches j of the patch x = z - d (on the map) of
    exp(logw[n, j, x] - shift[n, z]) * v[n, c, y_j(x) + d], divided by the sum of those weights
    ("patch": shift is the per-pixel max) or by the number of patches covering z (otherwise).
    ``SPARSE``: lanes are the ``M`` listed pixels ``listed``, and only listed patches vote: the list
    slot of ``x = z - d`` is ``tab[d, lane]`` (-1: not listed), per-match tensors are ``(N, K, M)``.
    ``out`` is ``(N, C, H * W)`` (``(N, C, M)``) in its own dtype."""
    L = M if SPARSE else H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * L
    n, lane = f // L, (f % L).to(IDX)
    if SPARSE:
        z = tl.load(listed + lane, mask=on, other=0).to(IDX)
    else:
        z = lane
    zi, zj = z // W, z % W
    ch = tl.program_id(1) * CB + tl.arange(0, CB)[None, :]
    cm = ch < C
    vb = v + n * C * Hk * Wk
    if PATCH:
        zs = tl.load(shift + n * L + lane, mask=on, other=0.0)
    else:
        zs = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, CB], ACC)
    den = tl.zeros([BLOCK], ACC)
    count = tl.zeros([BLOCK], ACC)
    r = P // 2
    for a in range(P):
        xi = zi - (a - r)
        for b in range(P):
            xj = zj - (b - r)
            if SPARSE:
                slot = tl.load(tab + (a * P + b) * M + lane, mask=on, other=-1)
                real = on & (slot >= 0)
                x = tl.where(real, slot, 0).to(IDX)
            else:
                real = on & (xi >= 0) & (xi < H) & (xj >= 0) & (xj < W)
                x = tl.where(real, xi * W + xj, 0)
            count += tl.where(real, 1.0, 0.0)
            for j in range(K):
                row = (n * K + j) * L + x
                y = tl.load(idx + row, mask=real, other=0).to(IDX)
                w = tl.exp(tl.load(logw + row, mask=real, other=float("-inf")) - zs)
                w = tl.where(real, w, 0.0)
                kpos = _clamp(y // Wk + a - r, Hk) * Wk + _clamp(y % Wk + b - r, Wk)
                val = tl.load(vb[:, None] + (ch * (Hk * Wk) + kpos[:, None]), mask=real[:, None] & cm, other=0.0)
                acc += w[:, None] * val.to(ACC)
                den += w
    if not PATCH:
        # the number of (listed) query patches covering z, each contributing weights that sum to one
        den = count
    den = tl.where(on, den, 1.0)
    tl.store(out + (n * C * L + lane)[:, None] + ch * L, acc / den[:, None], mask=on[:, None] & cm)
    if PATCH:
        tl.store(den_out + n * L + lane, den, mask=on & (tl.program_id(1) == 0))


@triton.jit(do_not_specialize=_SIZES)
def _score_grad(
    g, v, idx, logw, shift, g0, out, C, H, W, Hk, Wk, K, P, N,
    WEIGHTED: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
    IDX: tl.constexpr,
):  # fmt: skip
    """out[n, j, x] = sum over offsets d with z = x + d on the map of
    <g[n, :, z], v[n, :, y_j(x) + d]> (unweighted; ``MEAN``: each divided by the number of patches
    covering z, the "patch_mean" aggregation), or of exp(logw[n, j, x] - shift[n, z]) *
    (<g[n, :, z], v[n, :, y_j(x) + d]> - g0[n, z]) (weighted, the "patch" aggregation)."""
    L = H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L
    n, x = f // (K * L), (f % L).to(IDX)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(IDX)
    yi, yj = y // Wk, y % Wk
    gb = g + n * C * L
    vb = v + n * C * Hk * Wk
    if WEIGHTED:
        lw = tl.load(logw + f, mask=on, other=0.0)
    cc = tl.arange(0, CB)[None, :]
    r = P // 2
    acc = tl.zeros([BLOCK], ACC)
    for a in range(P):
        zi = xi + a - r
        krow = _clamp(yi + a - r, Hk) * Wk
        for b in range(P):
            zj = xj + b - r
            real = on & (zi >= 0) & (zi < H) & (zj >= 0) & (zj < W)
            z = tl.where(real, zi * W + zj, 0)
            kpos = krow + _clamp(yj + b - r, Wk)
            dot = tl.zeros([BLOCK], ACC)
            for c0 in range(0, C, CB):
                ch = c0 + cc
                m = real[:, None] & (ch < C)
                gz = tl.load(gb[:, None] + (ch * L + z[:, None]), mask=m, other=0.0).to(ACC)
                val = tl.load(vb[:, None] + (ch * (Hk * Wk) + kpos[:, None]), mask=m, other=0.0).to(ACC)
                dot += tl.sum(gz * val, axis=1)
            if WEIGHTED:
                zs = tl.load(shift + n * L + z, mask=real, other=0.0)
                go = tl.load(g0 + n * L + z, mask=real, other=0.0)
                acc += tl.where(real, tl.exp(lw - zs) * (dot - go), 0.0)
            elif MEAN:
                acc += dot / _covering(zi, zj, H, W, r)
            else:
                acc += dot
    tl.store(out + f, acc, mask=on)


@triton.jit(do_not_specialize=_SIZES)
def _query_grad(
    q, k, idx, gcost, out, C, H, W, Hk, Wk, K, P, N,
    DOT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """The gradient of sum(gcost * cost) for the query map, stored in ``out``'s dtype: the query
    pixel u gathers, over offsets d and the patches x whose read at d, clamped, is u, and their
    matches j, 2 gcost (q[u] - k[clamp(y_j(x) + d)]) ("l2") or -gcost k[...] ("dot")."""
    r = P // 2
    L = H * W
    on, n, u, ui, uj, ch, cm = _pixel_lanes(N, L, W, C, BLOCK, CB, IDX)
    kb = k + n * C * Hk * Wk
    acc = tl.zeros([BLOCK, CB], ACC)
    sg = tl.zeros([BLOCK], ACC)
    for a in range(P):
        for b in range(P):
            lo_i, lo_j, n_j, cnt = _fold_pairs(ui, uj, H, W, a, b, r, on)
            # One patch per offset inside the map; the block runs to its longest border list.
            for t in range(0, tl.max(cnt, axis=0)):
                real = t < cnt
                x = tl.where(real, _fold_pair(t, lo_i, lo_j, n_j, W), 0)
                for j in range(K):
                    row = (n * K + j) * L + x
                    y = tl.load(idx + row, mask=real, other=0).to(IDX)
                    gc = tl.load(gcost + row, mask=real, other=0.0)
                    kpos = _clamp(y // Wk + a - r, Hk) * Wk + _clamp(y % Wk + b - r, Wk)
                    kv = tl.load(kb[:, None] + (ch * (Hk * Wk) + kpos[:, None]), mask=real[:, None] & cm, other=0.0).to(ACC)
                    if DOT:
                        acc -= gc[:, None] * kv
                    else:
                        acc -= 2 * gc[:, None] * kv
                        sg += gc
    at = (n * C * L + u)[:, None] + ch * L
    if not DOT:
        qv = tl.load(q + at, mask=on[:, None] & cm, other=0.0).to(ACC)
        acc += 2 * sg[:, None] * qv
    tl.store(out + at, acc, mask=on[:, None] & cm)


@triton.jit
def _contribution(
    src, kf, logw, shift, coef, n, j, x, xi, xj, y_here, ok, a, b, r, ch, cm, C, H, W, K, L, Nk,
    MODE: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """What the match j of query pixels x gives, through the offset (a - r, b - r), to the key-side
    gradient at the key pixel ``y_here`` (a block of lanes, ``ok`` masks them), ``(CB, BLOCK)``.

    MODE 0 (value): exp(logw[j, x] - shift[z]) * src[z], z = x + d, nothing when z is off the map
    (``MEAN``: divided by the number of patches covering z).
    MODE 1 (key, "l2"): -2 coef[j, x] (src[clamped z] - kf[y_here]), src the query.
    MODE 2 (key, "dot"): -coef[j, x] * src[clamped z].
    """
    row = (n * K + j) * L + x
    if MODE == 0:
        zi = xi + a - r
        zj = xj + b - r
        ok = ok & (zi >= 0) & (zi < H) & (zj >= 0) & (zj < W)
        z = tl.where(ok, zi * W + zj, 0)
        w = tl.load(logw + row, mask=ok, other=0.0)
        if SHIFT:
            w -= tl.load(shift + n * L + z, mask=ok, other=0.0)
        w = tl.where(ok, tl.exp(w), 0.0)
        if MEAN:
            w = w / _covering(zi, zj, H, W, r)
    else:
        z = _clamp(xi + a - r, H) * W + _clamp(xj + b - r, W)
        w = tl.load(coef + row, mask=ok, other=0.0)
    m = ok[:, None] & cm
    s = tl.load(src + (n * C * L + z)[:, None] + ch * L, mask=m, other=0.0).to(ACC)
    if MODE == 0:
        return w[:, None] * s
    elif MODE == 1:
        kv = tl.load(kf + (n * C * Nk + y_here)[:, None] + ch * Nk, mask=m, other=0.0).to(ACC)
        return -2 * w[:, None] * (s - kv)
    else:
        return -w[:, None] * s


@triton.jit(do_not_specialize=_SIZES)
def _scatter(
    src, kf, idx, logw, shift, coef, dst, C, H, W, Hk, Wk, K, P, N,
    MODE: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr,
    ACC: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """Key-side gradient by atomics: every (x, j, d) adds its contribution at its clamped key
    position of the float32 map ``dst`` ``(N, C, Hk * Wk)``."""
    L = H * W
    Nk = Hk * Wk
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L
    n, j, x = f // (K * L), ((f // L) % K).to(IDX), (f % L).to(IDX)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(IDX)
    yi, yj = y // Wk, y % Wk
    ch = tl.program_id(1) * CB + tl.arange(0, CB)[None, :]
    cm = ch < C
    r = P // 2
    for a in range(P):
        krow = _clamp(yi + a - r, Hk) * Wk
        for b in range(P):
            kpos = krow + _clamp(yj + b - r, Wk)
            val = _contribution(
                src, kf, logw, shift, coef, n, j, x, xi, xj, kpos, on, a, b, r, ch, cm, C, H, W, K, L, Nk, MODE, SHIFT, MEAN, ACC
            )
            tl.atomic_add(dst + (n * C * Nk + kpos)[:, None] + ch * Nk, val, mask=on[:, None] & cm, sem="relaxed")


@triton.jit(do_not_specialize=_SIZES)
def _gather(
    src, kf, rowptr, order, logw, shift, coef, dst, C, H, W, Hk, Wk, K, P, N,
    MODE: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr,
    ACC: tl.constexpr, IDX: tl.constexpr,
):  # fmt: skip
    """Key-side gradient without atomics, stored in ``dst``'s dtype ``(N, C, Hk * Wk)``: the key
    pixel u sums, for every offset d and every key position y whose read at d, clamped, is u, the
    contributions of the matches of y, read from the list of such matches
    (``order[rowptr[y]:rowptr[y + 1]]``, sorted, so the order is fixed)."""
    r = P // 2
    L = H * W
    Nk = Hk * Wk
    on, n, u, ui, uj, ch, cm = _pixel_lanes(N, Nk, Wk, C, BLOCK, CB, IDX)
    acc = tl.zeros([BLOCK, CB], ACC)
    for a in range(P):
        for b in range(P):
            lo_i, lo_j, n_j, cnt = _fold_pairs(ui, uj, Hk, Wk, a, b, r, on)
            for t in range(0, tl.max(cnt, axis=0)):
                has = t < cnt
                y = n * Nk + tl.where(has, _fold_pair(t, lo_i, lo_j, n_j, Wk), 0)
                start = tl.load(rowptr + y, mask=has, other=0)
                count = tl.load(rowptr + y + 1, mask=has, other=0) - start
                # Each program runs to the longest list among its own lanes, not the map's longest.
                for s in range(0, tl.max(count, axis=0)):
                    ok = has & (s < count)
                    e = tl.load(order + start + s, mask=ok, other=0).to(IDX)
                    j = e // L
                    x = e % L
                    acc += _contribution(
                        src, kf, logw, shift, coef, n, j, x, x // W, x % W, u, ok, a, b, r, ch, cm, C, H, W, K, L, Nk,
                        MODE, SHIFT, MEAN, ACC,
                    )  # fmt: skip
    tl.store(dst + (n * C * Nk + u)[:, None] + ch * Nk, acc, mask=on[:, None] & cm)


# ----------------------------------------------------------------------------------------------
# Launch helpers.


def _acc(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _tiles(lanes: int, channels: int, cb_max: int = 16) -> dict:
    """``BLOCK`` lanes x ``CB`` channels per program, the warps to run them, and the position dtype.

    GPU: one lane a thread (``BLOCK = 32 x warps``), each thread holding its pixel's ``CB``
    channels. ptxas (sm_90a, Triton 3.6): at 32 channels most kernels used 128-255 registers
    and spilled; at 16 they use 56-91, and the key-side gather still spilled inside its loops,
    which it does not at 8 (``cb_max``). Interpreter: programs run one after another and
    every op costs Python overhead whatever its size, so one large block does all the work, with
    int64 positions (its int32 arithmetic is checked for overflow, op by op).
    """
    cb = triton.next_power_of_2(max(channels, 1))
    if triton_interpreted():
        return dict(BLOCK=min(triton.next_power_of_2(max(lanes, 1)), 8192), CB=min(cb, 256), IDX=tl.int64)
    return dict(BLOCK=128, CB=min(cb, cb_max), num_warps=4, IDX=tl.int32)


def _stored(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels store a result of ``dtype`` in: its own on a GPU (rounded to nearest);
    float32 for bfloat16 under the interpreter, which truncates on that conversion (the caller
    then rounds with PyTorch, as the GPU would)."""
    return torch.float32 if dtype == torch.bfloat16 and triton_interpreted() else dtype


def key_grad_path() -> str:
    """How the key and value gradients are summed: ``"atomic"`` (the default) or ``"gather"``
    (deterministic: what ``torch.use_deterministic_algorithms(True)`` takes, or
    ``PSAL_TRITON_KEY_GRAD=gather``). Both keep the layer's memory under SDPA's (measured through
    the interpreter: 1.3 and 1.4 x the bf16 features); the gather can be much slower where a few
    keys collect thousands of matches (a program runs to its longest list), which the GPU check
    times (``python -m psal.bench gpu``, section variants)."""
    if torch.are_deterministic_algorithms_enabled():
        return "gather"
    return "gather" if os.environ.get("PSAL_TRITON_KEY_GRAD", "atomic") == "gather" else "atomic"


class _Call:
    """Shapes and the costs of one forward or backward call."""

    def __init__(self, query, key, value, indices, temperature, patch_size, similarity, positions=None):
        self.dt = compute_dtype(query.dtype)
        self.acc = _acc(self.dt)
        self.N, self.K = indices.shape[:2]
        self.H, self.W = query.shape[-2:]
        self.positions = positions
        self.L = self.H * self.W if positions is None else positions.numel()
        self.qpos = indices if positions is None else positions.contiguous()  # (a dummy pointer when dense)
        self.C, self.Cv = query.shape[1], value.shape[1]
        self.Hk, self.Wk = key.shape[-2:]
        self.p, self.r = patch_size, patch_size // 2
        self.dot = similarity == "dot"
        self.q, self.k, self.v = query, key, value  # channel-first, read in place
        self.idx = indices.reshape(self.N, self.K, self.L)
        self.T = temperature.to(self.dt)
        self.lanes = self.N * self.K * self.L  # one lane per match
        self.cost = torch.empty(self.N, self.K, self.L, device=query.device, dtype=self.dt)
        t = _tiles(self.lanes, self.C)
        _costs[(triton.cdiv(self.lanes, t["BLOCK"]),)](
            self.q, self.k, self.idx, self.cost, self.qpos, *self.sizes_m(self.C), DOT=self.dot, SPARSE=positions is not None,
            ACC=self.acc, **t,
        )  # fmt: skip
        self.s = -self.cost / self.T

    def sizes(self, C, p=None):
        return (C, self.H, self.W, self.Hk, self.Wk, self.K, self.p if p is None else p, self.N)

    def sizes_m(self, C, p=None):
        """:meth:`sizes` and the number of listed pixels ``M`` (the sparse-aware kernels')."""
        return (*self.sizes(C, p), self.L)

    def listed_tables(self, p: int) -> torch.Tensor:
        """``(p * p, M)``: for offset ``(a, b)`` (row ``a * p + b``), the list slot of the patch
        ``x = z - (a - r, b - r)`` of each listed pixel ``z``, -1 where it is not listed."""
        r = p // 2
        moves = [(r - a, r - b) for a in range(p) for b in range(p)]
        return offset_tables(self.positions, (self.H, self.W), moves).contiguous()

    def votes(self, logw, shift, p: int, patch: bool, tab=None):
        """``_votes`` -> out ``(N, Cv, H, W)`` in the value's dtype (``(N, Cv, M)`` with the
        sparse ``tab`` of :meth:`listed_tables`) and, for "patch", the weight sums ``(N, L)``."""
        N, L, Cv = self.N, self.L, self.Cv
        out = torch.empty(N, Cv, L, device=logw.device, dtype=_stored(self.v.dtype))
        den = torch.empty(N, L, device=logw.device, dtype=self.dt) if patch else logw
        t = _tiles(N * L, Cv)
        _votes[(triton.cdiv(N * L, t["BLOCK"]), triton.cdiv(Cv, t["CB"]))](
            # one lane per output pixel
            self.v, self.idx, logw, logw if shift is None else shift, out, den, self.qpos, self.qpos if tab is None else tab,
            *self.sizes_m(Cv, p), PATCH=patch, SPARSE=tab is not None, ACC=self.acc, **t,
        )  # fmt: skip
        out = out.to(self.v.dtype)
        if tab is not None:
            return out, den
        return out.view(N, Cv, self.H, self.W), den

    def score_grad(self, g, p: int, logw=None, shift=None, g0=None, mean=False):
        out = torch.empty_like(self.cost)
        weighted = logw is not None
        dummy = self.cost
        t = _tiles(self.lanes, self.Cv)
        _score_grad[(triton.cdiv(self.lanes, t["BLOCK"]),)](
            g, self.v, self.idx, dummy if logw is None else logw, dummy if shift is None else shift,
            dummy if g0 is None else g0, out, *self.sizes(self.Cv, p),
            WEIGHTED=weighted, MEAN=mean, ACC=self.acc, **t,
        )  # fmt: skip
        return out

    @functools.cached_property
    def matches_by_key(self):
        """``(rowptr, order)``, the gather path's inverse field, computed once per call.

        The matches of each map sorted by key position (stable: ties keep their (j, x) order),
        and where each key position's list starts; the value and key gradients share them.
        int32 where they fit (half the memory of the sort's own int64 indices).
        """
        N, Hk, Wk, K, L = self.N, self.Hk, self.Wk, self.K, self.L
        keys = (self.idx + torch.arange(N, device=self.idx.device).view(N, 1, 1) * (Hk * Wk)).reshape(-1)
        small = N * Hk * Wk < 2**31 and K * L < 2**31
        sorted_keys, order = torch.sort(keys.int() if small else keys, stable=True)
        bounds = torch.arange(N * Hk * Wk + 1, device=keys.device, dtype=sorted_keys.dtype)
        rowptr = torch.searchsorted(sorted_keys, bounds)
        del sorted_keys
        order = order % (K * L)
        return (rowptr.int(), order.int()) if small else (rowptr, order)

    def key_side(self, src, p: int, mode: int, out_dtype, logw=None, shift=None, coef=None, mean=False):
        """Gradient for the key map (mode 1, 2) or the value map (mode 0), ``(N, C, Hk, Wk)`` in
        ``out_dtype``."""
        N, Hk, Wk = self.N, self.Hk, self.Wk
        C = src.shape[1]
        dummy = self.cost
        args = (dummy if logw is None else logw, dummy if shift is None else shift, dummy if coef is None else coef)
        flags = dict(MODE=mode, SHIFT=shift is not None, MEAN=mean, ACC=self.acc)
        if key_grad_path() == "atomic":
            dst = torch.zeros(N, C, Hk * Wk, device=src.device, dtype=self.dt)
            t = _tiles(self.lanes, C)
            _scatter[(triton.cdiv(self.lanes, t["BLOCK"]), triton.cdiv(C, t["CB"]))](
                src, self.k, self.idx, *args, dst, *self.sizes(C, p), **flags, **t
            )
            return dst.view(N, C, Hk, Wk).to(out_dtype)
        rowptr, order = self.matches_by_key
        dst = torch.empty(N, C, Hk * Wk, device=src.device, dtype=_stored(out_dtype))
        t = _tiles(N * Hk * Wk, C, cb_max=8)
        _gather[(triton.cdiv(N * Hk * Wk, t["BLOCK"]), triton.cdiv(C, t["CB"]))](
            src, self.k, rowptr, order, *args, dst, *self.sizes(C, p), **flags, **t
        )
        return dst.view(N, C, Hk, Wk).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# The backend contract.


def attend_forward(query, key, value, indices, temperature, patch_size: int | tuple, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, H, W)`` in the value's dtype and the statistic ``(N, H, W)`` in the compute
    dtype (``(N, Cv, M)`` and ``(N, M)`` for sparse ``positions (M,)``: the pure-PyTorch
    backend's sparse contract; their backward is the pure-PyTorch one,
    ``psal._dispatch.SPARSE_BACKWARD``). Volumes ("center" aggregation): through
    :func:`psal.backends.tall.attend_forward`."""
    if isinstance(patch_size, tuple):
        return tall.attend_forward(attend_forward, query, key, value, indices, temperature, patch_size, aggregation, similarity)
    with cuda_device_of(query):
        if positions is not None:
            return _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions)
        return _attend_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity)


def _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity, positions)
    p = 1 if aggregation == "center" else f.p
    tab = f.listed_tables(p)  # (p * p, M)
    if aggregation == "patch":
        best = f.s.amax(1)  # (N, M)
        m = torch.full_like(best, float("-inf"))
        for row in tab:  # the max over the listed patches covering each listed pixel
            m = torch.maximum(m, torch.where(row >= 0, best[:, row.clamp(min=0)], float("-inf")))
        out, den = f.votes(f.s, m.contiguous(), p, patch=True, tab=tab)
        return out, m + torch.log(den)
    lse = torch.logsumexp(f.s, 1)  # (N, M)
    out, _ = f.votes((f.s - lse[:, None]).contiguous(), None, p, patch=False, tab=tab)
    return out, lse


def _attend_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity)
    N, K, H, W = f.N, f.K, f.H, f.W
    if aggregation == "patch":
        s4 = f.s.view(N, K, H, W)
        m = F.max_pool2d(s4.amax(1, keepdim=True), f.p, 1, f.r)[:, 0].reshape(N, f.L)
        out, den = f.votes(f.s, m.contiguous(), f.p, patch=True)
        return out, (m + torch.log(den)).view(N, H, W)
    lse = torch.logsumexp(f.s, 1)  # (N, L)
    p = 1 if aggregation == "center" else f.p
    out, _ = f.votes((f.s - lse[:, None]).contiguous(), None, p, patch=False)
    return out, lse.view(N, H, W)


def _channel_dot(a: torch.Tensor, b: torch.Tensor, dt: torch.dtype, chunk: int = 8) -> torch.Tensor:
    """``(a * b).sum(1)`` in ``dt`` over ``(N, C, H, W)`` maps, a few channels at a time: no
    ``dt`` copy of the whole maps."""
    out = torch.zeros(a.shape[0], *a.shape[2:], device=a.device, dtype=dt)
    for c in range(0, a.shape[1], chunk):
        out += (a[:, c : c + chunk].to(dt) * b[:, c : c + chunk].to(dt)).sum(1)
    return out


def attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size: int | tuple, aggregation: str, similarity: str):
    """Gradients ``(query, key, value, temperature)``: the first three in their tensors' dtypes,
    the temperature's in the compute dtype."""
    if isinstance(patch_size, tuple):
        return tall.attend_backward(
            attend_backward, grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity
        )
    with cuda_device_of(query):
        return _attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity)


def _attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity)
    N, L = f.N, f.L
    dt = f.dt
    stat = stat.to(dt).reshape(N, L)
    if aggregation == "patch":
        g = grad.contiguous()
        g0 = _channel_dot(grad, out, dt).reshape(N, L).contiguous()
        s, log_den = f.s.contiguous(), stat.contiguous()
        gs = f.score_grad(g, f.p, logw=s, shift=log_den, g0=g0)
        gv = f.key_side(g, f.p, 0, value.dtype, logw=s, shift=log_den)
    else:
        p = 1 if aggregation == "center" else f.p
        # "patch_mean": the incoming gradient divided by the votes of each pixel, inside the kernels.
        mean = aggregation == "patch_mean"
        g = grad.contiguous()
        logw = (f.s - stat[:, None]).contiguous()
        w = torch.exp(logw)
        dots = f.score_grad(g, p, mean=mean)
        gs = w * (dots - (w * dots).sum(1, keepdim=True))
        del w, dots
        gv = f.key_side(g, p, 0, value.dtype, logw=logw, mean=mean)
    # s = -cost / T: d s / d cost = -1 / T and d s / d T = cost / T^2.
    gT = (gs * f.cost).sum() / f.T.square()
    gcost = (-gs / f.T).contiguous()
    del gs
    gq = torch.empty(query.shape, device=query.device, dtype=_stored(query.dtype))
    t = _tiles(N * L, f.C)
    _query_grad[(triton.cdiv(N * L, t["BLOCK"]), triton.cdiv(f.C, t["CB"]))](
        f.q, f.k, f.idx, gcost, gq, *f.sizes(f.C), DOT=f.dot, ACC=f.acc, **t
    )
    gk = f.key_side(f.q, f.p, 2 if f.dot else 1, key.dtype, coef=gcost)
    return gq.to(query.dtype), gk, gv, gT
