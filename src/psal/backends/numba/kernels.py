"""Every numba kernel of psal: the search's and the attention's, in one module.

numba's disk cache (``cache=True``) is keyed by the file that defines a kernel and does not see
edits in other files, so jitted code lives together here; ``search.py`` and ``attend.py`` only
lay out the arrays and launch. See those two modules for the schemes.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous; fields and scores are ``(N, H, W, K)``. The
attention's kernels take volumes as their padded frames stacked (``attend.py``) and a frame tuple
``fr = (pt, H, H + 2r, Hk, Hk + 2r)``: the patch's frames and the rows per frame of query and key,
unpadded and padded; a map is ``(1, H, H + 2r, Hk, Hk + 2r)``, one frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# No 'nnan'/'ninf': NaN costs from NaN inputs must stay visible to the comparisons, and infinite
# scores must keep their meaning. 'reassoc' lets the channel loops vectorise; the compiled order is
# fixed, so results stay bitwise reproducible.
_FASTMATH: set[str] = {"nsz", "arcp", "contract", "reassoc"}
# error_model="numpy": integer division needs no zero check (no divisor here is ever 0), and the
# hot helpers are inlined into the kernels; together these made the search 1.6x faster.
_HOT: dict[str, Any] = dict(cache=True, error_model="numpy")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Aggregations, as the attention kernels take them.
CENTER, PATCH, PATCH_MEAN = 0, 1, 2
# The stages of a search iteration, as bits of ``search_iterate``'s ``stages``: every one in the
# library; the profile (``python -m psal.bench profile``) leaves one out at a time.
PROPAGATE, RANDOM, BOUND, COST = 1, 2, 4, 8
ALL_STAGES = PROPAGATE | RANDOM | BOUND | COST


# ----------------------------------------------------------------------------------------------
# Shared: the patch cost.


# The bytes of one SIMD register: AVX-512's (16 float32 or 8 float64 lanes). On a machine with
# narrower vectors LLVM splits each operation in two or four; the sums stay the same.
_VECTOR_BYTES = 64


def _row_sum(context, builder, sig, args, dot):
    """LLVM for :func:`_row_cost`: full vectors of the row while they fit, then one masked vector
    for the rest (masked-off lanes read no memory), summed lane-wise and reduced once.

    numba's own loops over a runtime-length row leave the vector body unused for the short rows
    of small patches (21 values at RGB p = 7 ran as 8 lanes plus 13 scalars, one dependent FMA
    each); here every row is at most ``ceil(n / lanes)`` vector FMAs."""
    aty, _, bty, _, _ = sig.args
    a = context.make_array(aty)(context, builder, args[0])
    b = context.make_array(bty)(context, builder, args[2])
    ao, bo, n = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 3, 4))
    elt = context.get_value_type(aty.dtype)
    lanes = _VECTOR_BYTES // (aty.dtype.bitwidth // 8)
    vec, i32, i64 = ir.VectorType(elt, lanes), ir.IntType(32), ir.IntType(64)
    mask_t, index_t = ir.VectorType(ir.IntType(1), lanes), ir.VectorType(i32, lanes)
    suffix = f"v{lanes}f{aty.dtype.bitwidth}"
    pa = builder.gep(a.data, [ao], inbounds=True, source_etype=elt)
    pb = builder.gep(b.data, [bo], inbounds=True, source_etype=elt)
    mod = builder.module
    masked_load = cgutils.get_or_insert_function(mod, ir.FunctionType(vec, [pa.type, i32, mask_t, vec]), f"llvm.masked.load.{suffix}.p0")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.{suffix}")
    reduce = cgutils.get_or_insert_function(mod, ir.FunctionType(elt, [elt, vec]), f"llvm.vector.reduce.fadd.{suffix}")
    zero = ir.Constant(vec, [0.0] * lanes)
    align = ir.Constant(i32, aty.dtype.bitwidth // 8)

    def term(x, y, acc):
        if dot:
            return builder.call(fma, [x, y, acc])
        d = builder.fsub(x, y)
        return builder.call(fma, [d, d, acc])

    entry = builder.basic_block
    loop = builder.append_basic_block("row.loop")
    body = builder.append_basic_block("row.body")
    tail = builder.append_basic_block("row.tail")
    last_full = builder.sub(n, ir.Constant(i64, lanes - 1))
    builder.branch(loop)
    builder.position_at_end(loop)
    t = builder.phi(i64)
    acc = builder.phi(vec)
    t.add_incoming(ir.Constant(i64, 0), entry)
    acc.add_incoming(zero, entry)
    builder.cbranch(builder.icmp_signed("<", t, last_full), body, tail)
    builder.position_at_end(body)
    x = builder.load(builder.gep(pa, [t], inbounds=True, source_etype=elt), typ=vec, align=align.constant)
    y = builder.load(builder.gep(pb, [t], inbounds=True, source_etype=elt), typ=vec, align=align.constant)
    t.add_incoming(builder.add(t, ir.Constant(i64, lanes)), body)
    acc.add_incoming(term(x, y, acc), body)
    builder.branch(loop)
    builder.position_at_end(tail)
    rest = builder.trunc(builder.sub(n, t), i32)
    splat = builder.shuffle_vector(
        builder.insert_element(ir.Constant(index_t, ir.Undefined), rest, ir.Constant(i32, 0)),
        ir.Constant(index_t, ir.Undefined),
        ir.Constant(index_t, [0] * lanes),
    )
    mask = builder.icmp_signed("<", ir.Constant(index_t, list(range(lanes))), splat)
    x = builder.call(masked_load, [builder.gep(pa, [t], inbounds=True, source_etype=elt), align, mask, zero])
    y = builder.call(masked_load, [builder.gep(pb, [t], inbounds=True, source_etype=elt), align, mask, zero])
    total = builder.call(reduce, [ir.Constant(elt, -0.0), term(x, y, acc)], fastmath=("reassoc", "nsz"))
    return builder.fsub(ir.Constant(elt, 0.0), total) if dot else total


def _row_signature(a, ao, b, bo, n):
    if not (isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 and a.dtype in (types.float32, types.float64)):
        return None
    if not (isinstance(b, types.Array) and b.layout == "C" and b.ndim == 1 and b.dtype == a.dtype):
        return None
    return a.dtype(a, ao, b, bo, n)


def _row_cost_typer(typingctx, a, ao, b, bo, n):
    return _row_signature(a, ao, b, bo, n), lambda c, bld, s, args: _row_sum(c, bld, s, args, False)


def _row_neg_dot_typer(typingctx, a, ao, b, bo, n):
    return _row_signature(a, ao, b, bo, n), lambda c, bld, s, args: _row_sum(c, bld, s, args, True)


# ``_row_cost(a, ao, b, bo, n)``: ``sum((a[ao:ao + n] - b[bo:bo + n]) ** 2)`` of two contiguous
# float32 or float64 rows, in their dtype, in SIMD registers (:func:`_row_sum`);
# ``_row_neg_dot``: ``-sum(a[ao:ao + n] * b[bo:bo + n])`` the same way. (Typed ``Any``: mypy sees
# an intrinsic's typing function, with its typing context, not the call in jitted code.)
_row_cost: Any = intrinsic(_row_cost_typer)
_row_neg_dot: Any = intrinsic(_row_neg_dot_typer)


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _patch_cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, zero, early, bound):
    """Cost of the query patch at padded corner (qi, qj) against the key patch at (ki, kj), in
    the maps' dtype (that of ``zero``).

    A patch row is ``p * C`` contiguous values, summed in SIMD registers (:func:`_row_cost`).
    With ``early``, an l2 cost stops once it reaches ``bound``: partial sums only grow, so the
    candidate can no longer beat the worst kept match (attention passes ``early=False``, so that
    NaN inputs still give NaN costs).
    """
    span = p * C
    qo = qj * C
    ko = kj * C
    acc = zero
    for di in range(p):
        if dot:
            acc += _row_neg_dot(qp[n, qi + di], qo, kp[n, ki + di], ko, span)
        else:
            acc += _row_cost(qp[n, qi + di], qo, kp[n, ki + di], ko, span)
        if early and not dot and acc >= bound:
            return acc
    return acc


# ----------------------------------------------------------------------------------------------
# The search.


@njit(inline="always", **_HOT)
def _mix(z):
    """splitmix64 finaliser: a bijective hash of a uint64."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always", **_HOT)
def _below(state, n):
    """Next state and a uniform integer in ``[0, n)`` (``n < 2**32``)."""
    state = state + _GOLDEN
    z = _mix(state)
    return state, np.int64(((z >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _clamped_cost(q, k, n, qi, qj, ki, kj, p, C, dot, bound):
    """The patch cost read in place from the caller's ``(N, C, H, W)`` maps, replicate padding as
    clamped coordinates: the same sum as :func:`_patch_cost` over padded channel-last copies (up
    to rounding: channel by channel within a patch row), stopping early at ``bound`` after each
    patch row."""
    r = p // 2
    H, W, Hk, Wk = q.shape[2], q.shape[3], k.shape[2], k.shape[3]
    acc = np.float32(0.0)
    if r <= qi < H - r and r <= qj < W - r and r <= ki < Hk - r and r <= kj < Wk - r:
        # Both patches inside their maps (most pixels): no clamps, each channel's patch row one
        # contiguous run.
        for di in range(p):
            s = np.float32(0.0)
            for c in range(C):
                qr = q[n, c, qi + di - r]
                kr = k[n, c, ki + di - r]
                if dot:
                    s += _row_neg_dot(qr, qj - r, kr, kj - r, p)
                else:
                    s += _row_cost(qr, qj - r, kr, kj - r, p)
            acc += s
            if not dot and acc >= bound:
                return acc
        return acc
    for di in range(p):
        qy = min(max(qi + di - r, 0), H - 1)
        ky = min(max(ki + di - r, 0), Hk - 1)
        s = np.float32(0.0)
        for dj in range(p):
            qx = min(max(qj + dj - r, 0), W - 1)
            kx = min(max(kj + dj - r, 0), Wk - 1)
            for c in range(C):
                a = q[n, c, qy, qx]
                b = k[n, c, ky, kx]
                if dot:
                    s -= a * b
                else:
                    e = a - b
                    s += e * e
        acc += s
        if not dot and acc >= bound:
            return acc
    return acc


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _volume_cost(qp, kp, n, qi, qj, ki, kj, g, C, dot, bound):
    """The cost of a space-time patch ``(pt, p, p)`` read in place from channel-last volumes
    ``(N, T * H, W * C)`` (frames stacked, no padding): ``g = (pt, p, H, T, Hk, Tk)``; map row
    ``i`` is row ``i % H`` of frame ``i // H``. Replicate padding in time and space as clamped
    frames, rows and columns; a patch row's ``p * C`` values are one contiguous run where both
    patches lie inside their frames' columns. Early exit after each row."""
    pt, p, H, T, Hk, Tk = g
    r = p // 2
    rt = pt // 2
    W = qp.shape[2] // C
    Wk = kp.shape[2] // C
    tq = qi // H
    yq = qi - tq * H
    tk = ki // Hk
    yk = ki - tk * Hk
    inside = r <= qj < W - r and r <= kj < Wk - r
    acc = np.float32(0.0)
    for dt in range(pt):
        fq = min(max(tq + dt - rt, 0), T - 1) * H
        fk = min(max(tk + dt - rt, 0), Tk - 1) * Hk
        for di in range(p):
            rq = fq + min(max(yq + di - r, 0), H - 1)
            rk = fk + min(max(yk + di - r, 0), Hk - 1)
            if inside:
                if dot:
                    acc += _row_neg_dot(qp[n, rq], (qj - r) * C, kp[n, rk], (kj - r) * C, p * C)
                else:
                    acc += _row_cost(qp[n, rq], (qj - r) * C, kp[n, rk], (kj - r) * C, p * C)
            else:
                for dj in range(p):
                    qx = min(max(qj + dj - r, 0), W - 1)
                    kx = min(max(kj + dj - r, 0), Wk - 1)
                    if dot:
                        acc += _row_neg_dot(qp[n, rq], qx * C, kp[n, rk], kx * C, C)
                    else:
                        acc += _row_cost(qp[n, rq], qx * C, kp[n, rk], kx * C, C)
            if not dot and acc >= bound:
                return acc
    return acc


def _frame_rows(p):
    """The key's rows per frame for a volume's patch tuple ``(pt, p, H, T, Hk, Tk)``, 0 for a map's
    patch side: compiled to a constant 0 for maps."""
    raise NotImplementedError("numba-only")  # pragma: no cover


@overload(_frame_rows, jit_options=dict(error_model="numpy"))
def _frame_rows_of(p):
    if isinstance(p, types.BaseTuple):
        return lambda p: p[4]
    return lambda p: 0


def _cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, bound):
    """The search's float32 patch cost of query pixel (qi, qj) against key pixel (ki, kj),
    stopping early at ``bound``: over padded channel-last rows ``(N, H + 2r, (W + 2r) * C)``
    (:func:`_patch_cost`, whose padded corner is the pixel), in place over channel-last volumes
    when ``p`` is the tuple ``(pt, p, H, T, Hk, Tk)`` (:func:`_volume_cost`), or in place over the
    caller's ``(N, C, H, W)`` maps (:func:`_clamped_cost`), chosen at compile time by the maps'
    rank and the type of ``p``. Compiled once per layout, not inlined into every candidate's
    call site."""
    raise NotImplementedError("numba-only")  # pragma: no cover


@overload(_cost, jit_options=dict(fastmath=_FASTMATH, error_model="numpy"))
def _cost_layout(qp, kp, n, qi, qj, ki, kj, p, C, dot, bound):
    if isinstance(p, types.BaseTuple):
        return lambda qp, kp, n, qi, qj, ki, kj, p, C, dot, bound: _volume_cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, bound)
    if qp.ndim == 4:
        return lambda qp, kp, n, qi, qj, ki, kj, p, C, dot, bound: _clamped_cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, bound)
    return lambda qp, kp, n, qi, qj, ki, kj, p, C, dot, bound: _patch_cost(
        qp, kp, n, qi, qj, ki, kj, p, C, dot, np.float32(0.0), True, bound
    )


@njit(inline="always", **_HOT)
def _insert(li, lc, cand, c, last):
    """Insert (cand, c) into the ascending list ``li[:last + 1]``, dropping what was at ``last``."""
    j = last
    while j > 0 and lc[j - 1] > c:
        lc[j] = lc[j - 1]
        li[j] = li[j - 1]
        j -= 1
    lc[j] = c
    li[j] = cand


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _bound(sq, sk, n, m, ki, kj):
    """Squared distance of two sketches, searched pixel ``m``'s and key position (ki, kj)'s: a
    lower bound of the l2 patch cost (0 with no sketch)."""
    a = sq[n, m]
    b = sk[n, ki, kj]
    lb = np.float32(0.0)
    for t in range(np.uint64(sq.shape[2])):
        e = a[t] - b[t]
        lb += e * e
    return lb


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, ki, kj, Wk, p, C, dot, stages=ALL_STAGES):
    """Offer key position (ki, kj) to the list of searched pixel ``m`` at (i, j).

    Kept if allowed, not in the list yet, and strictly better than the worst. The sketch lower
    bound rejects most random candidates before their cost is computed. ``stages`` without
    ``BOUND`` or ``COST`` (the profile's variants) skips the bound or stops before the cost.
    """
    cand = ki * Wk + kj
    if has_mask and not mask[n, cand]:
        return
    K = li.shape[0]
    for t in range(K):
        if li[t] == cand:
            return
    worst = lc[K - 1]
    if stages & BOUND and sq.shape[2] > 0 and _bound(sq, sk, n, m, ki, kj) >= worst:
        return
    if not stages & COST:
        return
    c = _cost(qp, kp, n, i, j, ki, kj, p, C, dot, worst)
    if c < worst:  # False for NaN
        _insert(li, lc, cand, c, K - 1)


# Searched pixels: every pixel of the query map (``dense``: list index m is the flat position), or
# the ascending flat positions ``qpos``. ``up``/``down`` give the list index of the pixel one row
# above/below (-1: not listed) and ``row_start[i]`` the first list index of row ``i``.


@njit(inline="always", **_HOT)
def _position(qpos, dense, m):
    return m if dense else qpos[m]


# Kernels over a list of M searched pixels run N * ceil(M / _CHUNK) tasks of _CHUNK list entries.
_CHUNK = 64


@njit(inline="always", **_HOT)
def _chunk(t, nc, M):
    """Task ``t`` of ``N * nc``: its map and its list range ``[m0, m1)``."""
    m0 = (t % nc) * _CHUNK
    return t // nc, m0, min(m0 + _CHUNK, M)


@njit(inline="always", **_HOT)
def _tasks(field):
    """The sizes ``N, M, K`` of a list field ``(N, M, K)`` and how many list chunks of ``_CHUNK``
    cover its ``M`` listed pixels (``nc`` of :func:`_chunk`: the kernel runs ``N * nc`` tasks)."""
    N, M, K = field.shape
    return N, M, K, (M + _CHUNK - 1) // _CHUNK


@njit(inline="always", **_HOT)
def _listed(qpos, m, W):
    """Row and column of the ``m``-th listed pixel of a map ``W`` wide."""
    i = qpos[m] // W
    return i, qpos[m] - i * W


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def search_init(
    qp,
    kp,
    sq,
    sk,
    mask,
    has_mask,
    allowed,
    n_allowed,
    init_idx,
    has_init,
    out_idx,
    out_cost,
    qpos,
    dense,
    HW,
    W,
    Wk,
    p,
    C,
    dot,
    seed,
    screen,
    offers,
):
    """The first k-best lists: ``K`` distinct random allowed positions (their sketch bounds
    screening ``screen`` more), then ``offers`` more random positions offered at their true cost
    (where there is no sketch), then the warm-start candidates."""
    N, M, K, nc = _tasks(out_idx)
    inf = np.float32(np.inf)
    for t in prange(N * nc):
        n, m0, m1 = _chunk(t, nc, M)
        nal = n_allowed[n]
        for m in range(m0, m1):
            pos = _position(qpos, dense, m)
            i = pos // W
            j = pos - i * W
            li = out_idx[n, m]
            lc = out_cost[n, m]
            state = _mix(seed ^ np.uint64(n * HW + pos))
            # K distinct ranks, kept sorted in li: draw r below the count not taken yet, then step
            # it past every taken rank <= r.
            for a in range(K):
                state, r = _below(state, nal - a)
                at = 0
                while at < a and li[at] <= r:
                    r += 1
                    at += 1
                for q in range(a, at, -1):
                    li[q] = li[q - 1]
                li[at] = r
            for a in range(K):
                if has_mask:
                    li[a] = allowed[n, li[a]]
                lc[a] = _bound(sq, sk, n, m, li[a] // Wk, li[a] % Wk) if screen > 0 else np.float32(0.0)
            # Screening: `screen` more random positions, each replacing the kept one with the
            # highest sketch bound when its own bound is lower. Bounds cost a few operations
            # where a cost costs C * p * p, so the start is far better for little time.
            for _ in range(screen):
                state, r = _below(state, nal)
                y = allowed[n, r] if has_mask else r
                lb = _bound(sq, sk, n, m, y // Wk, y % Wk)
                top = 0
                for a in range(K):
                    if li[a] == y:
                        top = -1
                        break
                    if lc[a] > lc[top]:
                        top = a
                if top >= 0 and lb < lc[top]:
                    li[top] = y
                    lc[top] = lb
            for a in range(K):
                y = li[a]
                c = _cost(qp, kp, n, i, j, y // Wk, y % Wk, p, C, dot, inf)
                _insert(li, lc, y, inf if c != c else c, a)  # sorted as the list fills
            for _ in range(offers):
                state, r = _below(state, nal)
                y = allowed[n, r] if has_mask else r
                _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, y // Wk, y % Wk, Wk, p, C, dot)
            if has_init:
                for a in range(init_idx.shape[2]):
                    y = init_idx[n, m, a]
                    _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, y // Wk, y % Wk, Wk, p, C, dot)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def search_along_time(
    qp, kp, sq, sk, mask, has_mask, out_idx, out_cost, qpos, dense, W, Wk, p, C, dot, before, frame_start, key_frame, direction
):
    """Propagation along time for a volume searched as a map of its stacked frames (``search.py``): frame by frame
    in ``direction`` (+1: first to last), every listed pixel of a frame is offered the matches of
    the listed pixel ``before[m]`` at the same place one frame back (``-1``: none), moved
    ``direction`` key frames (``key_frame`` positions); a scan, so a good match travels the whole
    video in one pass. Frame ``t``'s pixels are list indices ``frame_start[t] .. frame_start[t + 1]``."""
    N, M, K = out_idx.shape
    T = frame_start.shape[0] - 1
    total = mask.shape[1] if has_mask else kp.shape[1] * Wk  # key positions (volumes: unpadded rows)
    for step in range(T - 1):
        t = step + 1 if direction > 0 else T - 2 - step
        lo = frame_start[t]
        n_px = frame_start[t + 1] - lo
        for u in prange(N * n_px):
            n = u // n_px
            m = lo + u - n * n_px
            s = before[m]
            if s < 0:
                continue
            pos = _position(qpos, dense, m)
            i = pos // W
            j = pos - i * W
            li = out_idx[n, m]
            lc = out_cost[n, m]
            for a in range(K):
                y = out_idx[n, s, a] + direction * key_frame
                if y >= 0 and y < total:
                    _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, y // Wk, y % Wk, Wk, p, C, dot)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def search_iterate(
    qp, kp, sq, sk, mask, has_mask, out_idx, out_cost, qpos, up, down, row_start, dense, H, W, Hk, Wk, p, C, dot, seed, it, band, stages
):
    N, M, K = out_idx.shape
    HW = H * W
    forward = it % 2 == 0
    d = 1 if forward else -1
    shift = ((it // 2) % 2) * (band // 2)
    nb = (H + shift + band - 1) // band
    for t in prange(N * nb):
        n, b = _split(t, nb)
        r0 = max(b * band - shift, 0)
        r1 = min((b + 1) * band - shift, H)
        lo = r0 * W if dense else row_start[r0]
        hi = r1 * W if dense else row_start[r1]
        for mm in range(hi - lo):
            m = lo + mm if forward else hi - 1 - mm
            pos = _position(qpos, dense, m)
            i = pos // W
            j = pos - i * W
            li = out_idx[n, m]
            lc = out_cost[n, m]
            # Propagation: the neighbour x - e behind in the scan matched y; x takes y + e.
            # All K matches of the neighbour are offered.
            jn = j - d
            mn = m - d
            propagate = stages & PROPAGATE
            if propagate and 0 <= jn < W and (dense or (lo <= mn < hi and qpos[mn] == pos - d)):
                nl = out_idx[n, mn]
                for a in range(K):
                    yr = nl[a] // Wk
                    yc = nl[a] - yr * Wk + d
                    if 0 <= yc < Wk:
                        _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, yr, yc, Wk, p, C, dot, stages)
            iN = i - d
            if propagate and r0 <= iN < r1:
                if dense:
                    mn = m - d * W
                else:
                    mn = up[m] if forward else down[m]
                if mn >= 0:
                    nl = out_idx[n, mn]
                    for a in range(K):
                        yr = nl[a] // Wk
                        yc = nl[a] - yr * Wk
                        yr += d
                        if 0 <= yr < Hk:
                            _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, yr, yc, Wk, p, C, dot, stages)
            # Random search around each kept match in turn, in windows of radius
            # max(Hk, Wk) / 2^s down to 1. Searching around all k (not only the best) is what
            # brings the 2nd..k-th matches within a few percent of exact (measured: the mean
            # cost ratio to exact went from 1.06 to 1.03 at 128x128).
            state = _mix(seed ^ np.uint64(n * HW + pos))
            for a in range(K if stages & RANDOM else 0):
                br = li[a] // Wk
                bc = li[a] - br * Wk
                R = max(Hk, Wk)
                while R >= 1:
                    lo_r = max(br - R, 0)
                    lo_c = max(bc - R, 0)
                    state, r = _below(state, min(br + R, Hk - 1) - lo_r + 1)
                    state, c = _below(state, min(bc + R, Wk - 1) - lo_c + 1)
                    _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, lo_r + r, lo_c + c, Wk, p, C, dot, stages)
                    R //= 2
                # Volumes: the match's place one key frame before and after, and a random
                # neighbour of it there (the windows above mix frames only once wider than one).
                fr = _frame_rows(p)
                for step in (-fr, fr):  # (not d: the scan's direction)
                    yr = br + step
                    if fr > 0 and 0 <= yr < Hk:
                        _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, yr, bc, Wk, p, C, dot, stages)
                        state, dr = _below(state, 3)
                        state, dc = _below(state, 3)
                        yr2 = min(max(yr + dr - 1, 0), Hk - 1)
                        yc2 = min(max(bc + dc - 1, 0), Wk - 1)
                        _try(qp, kp, sq, sk, mask, has_mask, n, m, i, j, li, lc, yr2, yc2, Wk, p, C, dot, stages)


# ----------------------------------------------------------------------------------------------
# Attention.


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _axpy(acc, alpha, x, xo, n):
    """``acc[:n] += alpha * x[xo : xo + n]``."""
    o = np.uint64(xo)
    for c in range(np.uint64(n)):
        acc[c] += alpha * x[o + c]


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _axpy_diff(acc, alpha, x, xo, y, yo, n):
    """``acc[:n] += alpha * (x[xo : xo + n] - y[yo : yo + n])``."""
    a = np.uint64(xo)
    b = np.uint64(yo)
    for c in range(np.uint64(n)):
        acc[c] += alpha * (x[a + c] - y[b + c])


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _dot(x, xo, y, yo, n, zero):
    a = np.uint64(xo)
    b = np.uint64(yo)
    s = zero
    for c in range(np.uint64(n)):
        s += x[a + c] * y[b + c]
    return s


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _logsumexp(s, zero):
    """``torch.logsumexp`` of a short vector, with its rule for infinite maxima (shift by 0)."""
    m = np.float32(-np.inf) + zero
    for t in range(s.shape[0]):
        if s[t] > m:
            m = s[t]
    if np.abs(m) == np.inf:
        m = zero
    acc = zero
    for t in range(s.shape[0]):
        acc += np.exp(s[t] - m)
    return np.log(acc) + m


@njit(inline="always", **_HOT)
def _pad_range(u, n, r):
    """Padded coordinates (inclusive bounds) that replicate padding by ``r`` reads from ``u``."""
    lo = 0 if u == 0 else u + r
    hi = n - 1 + 2 * r if u == n - 1 else u + r
    return lo, hi


@njit(inline="always", **_HOT)
def _split(t, rows):
    """The map and row of parallel task ``t`` over ``N * rows`` (one task per row of every map)."""
    return t // rows, t % rows


@njit(**_HOT)
def _fold_pairs(n, r, p):
    """For every coordinate ``u`` of a map side of ``n``: the pairs ``(x, a)`` (patch position,
    offset ``0 <= a < p``) whose padded read ``x + a`` replicate padding by ``r`` takes from ``u``,
    as ``pairs[start[u]:start[u + 1]]``: the adjoint of the padding, one side at a time."""
    start = np.zeros(n + 1, np.int64)
    for u in range(n):
        lo, hi = _pad_range(u, n, r)
        count = 0
        for P in range(lo, hi + 1):
            count += min(P, p - 1) - max(P - n + 1, 0) + 1
        start[u + 1] = start[u] + count
    pairs = np.empty((start[n], 2), np.int64)
    for u in range(n):
        lo, hi = _pad_range(u, n, r)
        at = start[u]
        for P in range(lo, hi + 1):
            for a in range(max(P - n + 1, 0), min(P, p - 1) + 1):
                pairs[at, 0] = P - a
                pairs[at, 1] = a
                at += 1
    return start, pairs


@njit(inline="always", **_HOT)
def _corner(i, rows, padded):
    """The padded row of the patch corner of stacked row ``i`` (frames of ``rows`` rows, each
    ``padded`` rows in the padded volume; a map is one frame: ``i`` itself)."""
    f = i // rows
    return f * padded + i - f * rows


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _st_cost(qp, kp, n, qi, qj, ki, kj, p, fr, C, dot, zero):
    """The attention's cost of a space-time patch over padded volumes (``fr``, the module's frame
    tuple): the ``pt`` frames' :func:`_patch_cost` summed; a map's is its :func:`_patch_cost`."""
    acc = zero
    for dt in range(fr[0]):
        acc += _patch_cost(qp, kp, n, qi + dt * fr[2], qj, ki + dt * fr[4], kj, p, C, dot, zero, False, zero)
    return acc


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def forward_scores(qp, kp, vp, yr, yc, vr, T, C, p, fr, dot, agg, score, stat, out):
    """Pass 1, one task per query row: the ``K`` scores of every pixel.

    ``score`` receives ``s`` for ``"patch"`` (pass 2 needs the max over the covering patches) and
    the softmax weights ``w`` otherwise, with their logsumexp in ``stat``; ``"center"`` also
    writes its output here, since it needs nothing from the neighbouring pixels.
    """
    N, H, W, K = yr.shape
    Cv = out.shape[1]
    zero = score.dtype.type(0)
    for t in prange(N * H):
        n, i = _split(t, H)
        xi = _corner(i, fr[1], fr[2])
        o = np.empty(Cv, out.dtype)
        for j in range(W):
            sv = score[n, i, j]
            for m in range(K):
                c = _st_cost(qp, kp, n, xi, j, yr[n, i, j, m], yc[n, i, j, m], p, fr, C, dot, zero)
                sv[m] = -c / T
            if agg == PATCH:
                continue
            lse = _logsumexp(sv, zero)
            stat[n, i, j] = lse
            for m in range(K):
                sv[m] = np.exp(sv[m] - lse)
            if agg == CENTER:
                o[:] = zero
                for m in range(K):
                    _axpy(o, sv[m], vp[n, vr[n, i, j, m]], yc[n, i, j, m] * Cv, Cv)
                for c in range(Cv):
                    out[n, c, i, j] = o[c]


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def forward_votes(vp, yr, yc, score, p, agg, stat, out):
    """Pass 2, one task per output row: pixel ``z`` gathers the votes of the patches covering it.

    The patch of ``x = z + r - (a, b)`` votes with the value at padded ``y_j(x) + (a, b)``;
    only patches inside the query map vote.
    """
    r = p // 2
    N, H, W, K = yr.shape
    Cv = out.shape[1]
    zero = out.dtype.type(0)
    for t in prange(N * H):
        n, zi = _split(t, H)
        o = np.empty(Cv, out.dtype)
        a_lo = max(zi + r - H + 1, 0)
        a_hi = min(zi + r, p - 1)
        for zj in range(W):
            b_lo = max(zj + r - W + 1, 0)
            b_hi = min(zj + r, p - 1)
            mx = np.float32(-np.inf) + zero
            if agg == PATCH:
                # One softmax over all the votes of z, shifted by their max for stability.
                for a in range(a_lo, a_hi + 1):
                    for b in range(b_lo, b_hi + 1):
                        sv = score[n, zi + r - a, zj + r - b]
                        for m in range(K):
                            if sv[m] > mx:
                                mx = sv[m]
            o[:] = zero
            den = zero
            for a in range(a_lo, a_hi + 1):
                xi = zi + r - a
                for b in range(b_lo, b_hi + 1):
                    xj = zj + r - b
                    for m in range(K):
                        e = score[n, xi, xj, m]
                        if agg == PATCH:
                            e = np.exp(e - mx)
                        den += e
                        _axpy(o, e, vp[n, yr[n, xi, xj, m] + a], (yc[n, xi, xj, m] + b) * Cv, Cv)
            if agg == PATCH:
                stat[n, zi, zj] = mx + np.log(den)
            else:
                den = zero + np.float32((a_hi - a_lo + 1) * (b_hi - b_lo + 1))  # the vote count
            for c in range(Cv):
                out[n, c, zi, zj] = o[c] / den


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def backward_scores(qp, kp, vp, yr, yc, vr, T, C, p, fr, dot, agg, g, go, stat, sw, gcost, part):
    """Backward pass 1, one task per query row: ``d loss / d cost_j(x)`` from the recomputed costs.

    ``g`` is the output gradient, channel-last (for ``"patch_mean"`` already divided by the vote
    counts); ``go`` is ``<g(z), out(z)>`` (``"patch"`` only). Writes the weights ``w``
    (``"center"``, ``"patch_mean"``) or scores ``s`` (``"patch"``) to ``sw`` for the later
    gathers, and the row's share of ``sum(d loss / d s * cost)`` to ``part`` in float64, so that
    the temperature gradient neither depends on the schedule nor loses precision in float32.
    """
    N, H, W, K = yr.shape
    Cv = g.shape[3]
    r = p // 2
    zero = sw.dtype.type(0)
    for t in prange(N * H):
        n, i = _split(t, H)
        cost = np.empty(K, sw.dtype)
        gs = np.empty(K, sw.dtype)
        acc = 0.0
        # Votes of x = (i, j) at offset (a, b) land on z = x + (a, b) - r; keep those in the map.
        a_lo = max(r - i, 0)
        a_hi = min(H - 1 - i + r, p - 1)
        xi = _corner(i, fr[1], fr[2])
        for j in range(W):
            b_lo = max(r - j, 0)
            b_hi = min(W - 1 - j + r, p - 1)
            sv = sw[n, i, j]
            for m in range(K):
                cost[m] = _st_cost(qp, kp, n, xi, j, yr[n, i, j, m], yc[n, i, j, m], p, fr, C, dot, zero)
                sv[m] = -cost[m] / T
            if agg != PATCH:
                lse = stat[n, i, j]
                for m in range(K):
                    sv[m] = np.exp(sv[m] - lse)
            for m in range(K):
                yi = yr[n, i, j, m]
                yj = yc[n, i, j, m]
                d = zero
                if agg == CENTER:
                    d = _dot(g[n, i, j], 0, vp[n, vr[n, i, j, m]], yj * Cv, Cv, zero)
                else:
                    for a in range(a_lo, a_hi + 1):
                        zi = i + a - r
                        vrow = vp[n, yi + a]
                        for b in range(b_lo, b_hi + 1):
                            zj = j + b - r
                            dv = _dot(g[n, zi, zj], 0, vrow, (yj + b) * Cv, Cv, zero)
                            if agg == PATCH:
                                # e_j(x) / D(z) * <g(z), v(y_j + d) - out(z)>
                                d += np.exp(sv[m] - stat[n, zi, zj]) * (dv - go[n, zi, zj])
                            else:
                                d += dv
                gs[m] = d
            if agg != PATCH:  # through the softmax over j
                mean = zero
                for m in range(K):
                    mean += sv[m] * gs[m]
                for m in range(K):
                    gs[m] = sv[m] * (gs[m] - mean)
            for m in range(K):
                gcost[n, i, j, m] = -gs[m] / T
                acc += gs[m] * cost[m]
        part[t] = acc


@njit(parallel=True, **_HOT)
def invert_field(idxf, W, K, M, rows, padded, off, ent):
    """Per map, the inverse of the field by a counting sort (CSR).

    ``idxf (N, L * K)`` is the field flattened pixel-major, so a position ``q`` in it *is* the
    entry ``x * K + j``. The entries of key position ``y`` are ``ent[n, off[n, y] : off[n, y + 1]]``,
    in increasing ``q``: the gathers that read them then sum in an order fixed by the data alone.
    Each entry is stored as ``(q, row of x, column of x, padded row of x's patch corner)``
    (:func:`_corner`), decoded here once rather than by integer divisions in every one of the
    ``p * p`` visits of the gathers.
    """
    N, LK = idxf.shape
    for n in prange(N):
        o = off[n]
        o[:] = 0
        for q in range(LK):
            o[idxf[n, q] + 1] += 1
        for y in range(M):
            o[y + 1] += o[y]
        cur = o[:M].copy()
        for q in range(LK):
            y = idxf[n, q]
            x = q // K
            e = ent[n, cur[y]]
            e[0] = q
            e[1] = x // W
            e[2] = x - e[1] * W
            e[3] = _corner(e[1], rows, padded)
            cur[y] += 1


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def backward_key_value(qp, kp, g, sw, stat, gcost, off, ent, p, fr, dot, agg, gk, gv):
    """One task per key row: the key and value gradients at every key position ``u``, gathered.

    The key positions ``y`` and offsets ``(c, a, b)`` whose padded read ``y + (c, a, b)`` is
    ``u`` (:func:`_fold_pairs` along frames, rows and columns: the adjoint of the padding), then
    the entries ``(x, j)`` with ``y_j(x) = y``. Rows are the stacked frames' (``fr``).
    ``sw`` and ``gcost`` come flattened to ``(N, H * W * K)``, indexed by the entries' ``q``.
    """
    N, C, rows_k, Wk = gk.shape
    Cv = gv.shape[1]
    H, W = g.shape[1], g.shape[2]
    pt, Hqp, Hk, Hkp = fr[0], fr[2], fr[3], fr[4]
    Tk = rows_k // Hk
    r = p // 2
    rt = pt // 2
    zero = gk.dtype.type(0)
    scale = np.float32(-1.0) if dot else np.float32(-2.0)
    ts, frames = _fold_pairs(Tk, rt, pt)
    rs, rows = _fold_pairs(Hk, r, p)
    cs, cols = _fold_pairs(Wk, r, p)
    for t in prange(N * rows_k):
        n, urow = _split(t, rows_k)
        ut = urow // Hk
        u = urow - ut * Hk
        acck = np.empty(C, gk.dtype)
        accv = np.empty(Cv, gv.dtype)
        krow = kp[n, (ut + rt) * Hkp + u + r]
        for v in range(Wk):
            ko = (v + r) * C
            acck[:] = zero
            accv[:] = zero
            for it in range(ts[ut], ts[ut + 1]):
                yt, dt = frames[it, 0], frames[it, 1]
                for ia in range(rs[u], rs[u + 1]):
                    yi, a = rows[ia, 0], rows[ia, 1]
                    qa = dt * Hqp + a
                    for ib in range(cs[v], cs[v + 1]):
                        b = cols[ib, 1]
                        y = (yt * Hk + yi) * Wk + cols[ib, 0]
                        for e in range(off[n, y], off[n, y + 1]):
                            q = ent[n, e, 0]
                            xj = ent[n, e, 2]
                            gc = gcost[n, q]
                            if dot:
                                _axpy(acck, gc, qp[n, ent[n, e, 3] + qa], (xj + b) * C, C)
                            else:
                                _axpy_diff(acck, gc, qp[n, ent[n, e, 3] + qa], (xj + b) * C, krow, ko, C)
                            if agg != CENTER:  # maps only: one frame
                                zi = ent[n, e, 1] + a - r
                                zj = xj + b - r
                                if 0 <= zi < H and 0 <= zj < W:  # votes off the map were dropped
                                    coef = sw[n, q]
                                    if agg == PATCH:
                                        coef = np.exp(coef - stat[n, zi, zj])
                                    _axpy(accv, coef, g[n, zi, zj], 0, Cv)
            if agg == CENTER:  # the value is read at y itself, unpadded
                y = urow * Wk + v
                for e in range(off[n, y], off[n, y + 1]):
                    _axpy(accv, sw[n, ent[n, e, 0]], g[n, ent[n, e, 1], ent[n, e, 2]], 0, Cv)
            for c in range(C):
                gk[n, c, urow, v] = scale * acck[c]
            for c in range(Cv):
                gv[n, c, urow, v] = accv[c]


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def backward_query(qp, kp, yr, yc, gcost, p, fr, dot, gq):
    """One task per query row: the query gradient at every pixel ``u``, gathered.

    The patches ``x`` and offsets ``(c, a, b)`` whose padded read ``x + (c, a, b)`` is ``u``
    (:func:`_fold_pairs` along frames, rows and columns), and their ``K`` matches.
    """
    N, C, rows_q, W = gq.shape
    K = yr.shape[3]
    pt, H, Hqp, Hkp = fr[0], fr[1], fr[2], fr[4]
    T = rows_q // H
    r = p // 2
    rt = pt // 2
    zero = gq.dtype.type(0)
    scale = np.float32(-1.0) if dot else np.float32(2.0)
    ts, frames = _fold_pairs(T, rt, pt)
    rs, rows = _fold_pairs(H, r, p)
    cs, cols = _fold_pairs(W, r, p)
    for t in prange(N * rows_q):
        n, urow = _split(t, rows_q)
        ut = urow // H
        u = urow - ut * H
        acc = np.empty(C, gq.dtype)
        qrow = qp[n, (ut + rt) * Hqp + u + r]
        for v in range(W):
            qo = (v + r) * C
            acc[:] = zero
            for it in range(ts[ut], ts[ut + 1]):
                xt, dt = frames[it, 0], frames[it, 1]
                for ia in range(rs[u], rs[u + 1]):
                    xi, a = xt * H + rows[ia, 0], dt * Hkp + rows[ia, 1]
                    for ib in range(cs[v], cs[v + 1]):
                        xj, b = cols[ib, 0], cols[ib, 1]
                        for m in range(K):
                            gc = gcost[n, xi, xj, m]
                            kr = kp[n, yr[n, xi, xj, m] + a]
                            ko = (yc[n, xi, xj, m] + b) * C
                            if dot:
                                _axpy(acc, gc, kr, ko, C)
                            else:
                                _axpy_diff(acc, gc, qrow, qo, kr, ko, C)
            for c in range(C):
                gq[n, c, urow, v] = scale * acc[c]


# ----------------------------------------------------------------------------------------------
# Attention over sparse queries: the listed ascending flat positions ``qpos (M,)`` of the query
# map; ``row_start[i]`` is the first list index of row ``i``. Fields and scores are ``(N, M, K)``.


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def sparse_forward_scores(qp, kp, vp, qpos, yr, yc, T, C, W, p, dot, agg, score, stat, out):
    """:func:`forward_scores` over the listed pixels, in chunks of the list."""
    N, M, K, nc = _tasks(yr)
    Cv = out.shape[2]
    zero = score.dtype.type(0)
    for t in prange(N * nc):
        n, m0, m1 = _chunk(t, nc, M)
        for m in range(m0, m1):
            i, j = _listed(qpos, m, W)
            sv = score[n, m]
            for a in range(K):
                c = _patch_cost(qp, kp, n, i, j, yr[n, m, a], yc[n, m, a], p, C, dot, zero, False, zero)
                sv[a] = -c / T
            if agg == PATCH:
                continue
            lse = _logsumexp(sv, zero)
            stat[n, m] = lse
            for a in range(K):
                sv[a] = np.exp(sv[a] - lse)
            if agg == CENTER:
                o = out[n, m]
                o[:] = zero
                for a in range(K):
                    _axpy(o, sv[a], vp[n, yr[n, m, a]], yc[n, m, a] * Cv, Cv)


@njit(inline="always", **_HOT)
def _first_listed(qpos, lo, hi, want):
    """The first list index in ``[lo, hi)`` whose position is at least ``want`` (``hi`` if none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if qpos[mid] < want:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(inline="always", **_HOT)
def _covering_run(qpos, row_start, xi, W, c_lo, c_hi):
    """List indices ``[q0, q1)`` of the listed pixels of row ``xi`` with columns in ``[c_lo, c_hi]``."""
    end = row_start[xi + 1]
    q0 = _first_listed(qpos, row_start[xi], end, xi * W + c_lo)
    return q0, _first_listed(qpos, q0, end, xi * W + c_hi + 1)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def sparse_forward_votes(vp, qpos, row_start, yr, yc, score, H, W, p, agg, stat, out):
    """:func:`forward_votes` over the listed pixels: listed pixel ``z`` gathers the votes of the
    listed patches that cover it. The patches of row ``x_i = z_i + r - a`` that cover ``z`` are the
    listed positions of that row with columns in ``[z_j - r, z_j + r]``: one contiguous run of the
    list, found by two binary searches."""
    N, M, K, nc = _tasks(yr)
    Cv = out.shape[2]
    r = p // 2
    zero = out.dtype.type(0)
    for t in prange(N * nc):
        n, m0, m1 = _chunk(t, nc, M)
        for m in range(m0, m1):
            zi, zj = _listed(qpos, m, W)
            c_lo = max(zj - r, 0)
            c_hi = min(zj + r, W - 1)
            mx = np.float32(-np.inf) + zero
            a_lo = max(zi + r - H + 1, 0)
            a_hi = min(zi + r, p - 1)
            if agg == PATCH:
                for a in range(a_lo, a_hi + 1):
                    q0, q1 = _covering_run(qpos, row_start, zi + r - a, W, c_lo, c_hi)
                    for q in range(q0, q1):
                        for s in range(K):
                            if score[n, q, s] > mx:
                                mx = score[n, q, s]
            o = out[n, m]
            o[:] = zero
            den = zero
            count = 0
            for a in range(a_lo, a_hi + 1):
                xi = zi + r - a
                q0, q1 = _covering_run(qpos, row_start, xi, W, c_lo, c_hi)
                for q in range(q0, q1):
                    b = zj + r - (qpos[q] - xi * W)
                    for s in range(K):
                        e = score[n, q, s]
                        if agg == PATCH:
                            e = np.exp(e - mx)
                        den += e
                        _axpy(o, e, vp[n, yr[n, q, s] + a], (yc[n, q, s] + b) * Cv, Cv)
                    count += 1
            if agg == PATCH:
                stat[n, m] = mx + np.log(den)
            else:
                den = zero + np.float32(count)
            for c in range(Cv):
                o[c] = o[c] / den
