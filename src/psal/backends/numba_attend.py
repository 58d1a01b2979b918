"""Compiled CPU attention over a k-NN field (numba): forward and backward, parallel over every core.

Same contract as :mod:`psal.backends.reference_attend` (notation, folded layouts, the returned
statistic, border rules); read its docstring first. In short: ``s_j(x) = -cost_j(x) / T``, a vote
of query patch ``x`` with offset ``(a, b)`` in ``[0, p)^2`` lands on ``z = x + (a, b) - r`` and
carries the value at padded key position ``y_j(x) + (a, b)``; votes landing outside the query map
are dropped; key and value are read with replicate padding.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous (as in ``numba_cpu``); the field comes as the
rows and columns of the matches and the scores as ``(N, H, W, K)``. The patch of query pixel ``x``
starts at padded ``x``, the patch of key position ``y`` at padded ``y``. Gradients are produced
channel-last too and transposed once at the end.

Forward. Pass 1, parallel over query rows: the ``K`` costs and scores of every pixel (for
``"center"`` also the softmax and the output). Pass 2 (``"patch"``, ``"patch_mean"``), parallel over
output rows: every pixel ``z`` gathers the ``p * p * K`` votes of the patches covering it from the
stored scores, so no cost is computed more than once.

Backward. Costs are recomputed from the indices; nothing of size ``p * p * K * C`` ever exists.
Pass 1, parallel over query rows: ``d loss / d s_j(x)`` of each pixel (it only reads ``grad`` and
the statistic around ``x``), hence ``d loss / d cost_j(x)``, and one partial sum of the temperature
gradient per row. Every feature gradient is then computed as a *gather*: each output element is
written by exactly one task, which sums its terms in a fixed order.

- ``grad_query`` at pixel ``u``: over the padded query positions ``Q`` that replicate padding maps
  to ``u`` (one, or up to ``r + 1`` per axis on the border: this applies the adjoint of the padding
  in place), over offsets ``(a, b)`` and neighbours ``j`` of the patch ``x = Q - (a, b)``.
- ``grad_key`` and ``grad_value`` at key position ``u``: the same over padded key positions ``P``
  and offsets ``(a, b)``, then over the query pixels ``x`` and neighbours ``j`` with
  ``y_j(x) = P - (a, b)``. Those are found through the inverse of the field, built per map by a
  counting sort (CSR: offsets per key position, entries ``x * K + j`` in increasing order).
  Memory stays ``O((C + Cv) * H * W + K * H * W)``: padded copies of the maps, a few
  ``(N, H, W, K)`` arrays (scores, cost gradients, the inverse field).
- ``grad_temperature``: the row partials (float64) summed in their fixed order.

Why deterministic: no two tasks write one element, every sum runs in an order fixed by the loops
and the counting sort, never by the schedule; the result is bitwise the same for any thread
count. (Scattering with ``+=`` from parallel query loops would race, since many query pixels
match one key position.)

NaN inputs propagate through the arithmetic to NaN outputs; indices never depend on values.
Compiled once per dtype (float32, float64), cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from .reference import compute_dtype
from .reference_attend import vote_counts

# No 'nnan'/'ninf': NaN inputs must come out as NaN, and infinite scores must keep their meaning.
# 'reassoc' lets the channel loops vectorise; the compiled order is fixed, so results stay
# bitwise reproducible.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_HOT = dict(cache=True, error_model="numpy")
_CENTER, _PATCH, _PATCH_MEAN = 0, 1, 2
_AGGREGATIONS = {"center": _CENTER, "patch": _PATCH, "patch_mean": _PATCH_MEAN}


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _patch_cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, zero):
    """Cost of the query patch at padded corner (qi, qj) against the key patch at (ki, kj).

    Unsigned offsets: numba then drops its negative-index wrap-around, which otherwise keeps the
    loops from vectorising.
    """
    span = np.uint64(p * C)
    qo = np.uint64(qj * C)
    ko = np.uint64(kj * C)
    acc = zero
    for di in range(p):
        qr = qp[n, qi + di]
        kr = kp[n, ki + di]
        s = zero
        if dot:
            for t in range(span):
                s -= qr[qo + t] * kr[ko + t]
        else:
            for t in range(span):
                d = qr[qo + t] - kr[ko + t]
                s += d * d
        acc += s
    return acc


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


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _forward_scores(qp, kp, vp, yr, yc, T, C, p, dot, agg, score, stat, out):
    """Pass 1, one task per query row: the ``K`` scores of every pixel.

    ``score`` receives ``s`` for ``"patch"`` (pass 2 needs the max over the covering patches) and
    the softmax weights ``w`` otherwise, with their logsumexp in ``stat``; ``"center"`` also
    writes its output here, since it needs nothing from the neighbouring pixels.
    """
    N, H, W, K = yr.shape
    Cv = out.shape[3]
    zero = score.dtype.type(0)
    for t in prange(N * H):
        n = t // H
        i = t % H
        for j in range(W):
            sv = score[n, i, j]
            for m in range(K):
                c = _patch_cost(qp, kp, n, i, j, yr[n, i, j, m], yc[n, i, j, m], p, C, dot, zero)
                sv[m] = -c / T
            if agg == _PATCH:
                continue
            lse = _logsumexp(sv, zero)
            stat[n, i, j] = lse
            for m in range(K):
                sv[m] = np.exp(sv[m] - lse)
            if agg == _CENTER:
                o = out[n, i, j]
                o[:] = zero
                for m in range(K):
                    _axpy(o, sv[m], vp[n, yr[n, i, j, m]], yc[n, i, j, m] * Cv, Cv)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _forward_votes(vp, yr, yc, score, p, agg, stat, out):
    """Pass 2, one task per output row: pixel ``z`` gathers the votes of the patches covering it.

    The patch of ``x = z + r - (a, b)`` votes with the value at padded ``y_j(x) + (a, b)``;
    only patches inside the query map vote.
    """
    N, H, W, K = yr.shape
    Cv = out.shape[3]
    r = p // 2
    zero = out.dtype.type(0)
    for t in prange(N * H):
        n = t // H
        zi = t % H
        a_lo = max(zi + r - H + 1, 0)
        a_hi = min(zi + r, p - 1)
        for zj in range(W):
            b_lo = max(zj + r - W + 1, 0)
            b_hi = min(zj + r, p - 1)
            mx = np.float32(-np.inf) + zero
            if agg == _PATCH:
                # One softmax over all the votes of z, shifted by their max for stability.
                for a in range(a_lo, a_hi + 1):
                    for b in range(b_lo, b_hi + 1):
                        sv = score[n, zi + r - a, zj + r - b]
                        for m in range(K):
                            if sv[m] > mx:
                                mx = sv[m]
            o = out[n, zi, zj]
            o[:] = zero
            den = zero
            for a in range(a_lo, a_hi + 1):
                xi = zi + r - a
                for b in range(b_lo, b_hi + 1):
                    xj = zj + r - b
                    for m in range(K):
                        e = score[n, xi, xj, m]
                        if agg == _PATCH:
                            e = np.exp(e - mx)
                        den += e
                        _axpy(o, e, vp[n, yr[n, xi, xj, m] + a], (yc[n, xi, xj, m] + b) * Cv, Cv)
            if agg == _PATCH:
                stat[n, zi, zj] = mx + np.log(den)
            else:
                den = zero + np.float32((a_hi - a_lo + 1) * (b_hi - b_lo + 1))  # the vote count
            for c in range(Cv):
                o[c] = o[c] / den


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _backward_scores(qp, kp, vp, yr, yc, T, C, p, dot, agg, g, go, stat, sw, gcost, part):
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
        n = t // H
        i = t % H
        cost = np.empty(K, sw.dtype)
        gs = np.empty(K, sw.dtype)
        acc = 0.0
        # Votes of x = (i, j) at offset (a, b) land on z = x + (a, b) - r; keep those in the map.
        a_lo = max(r - i, 0)
        a_hi = min(H - 1 - i + r, p - 1)
        for j in range(W):
            b_lo = max(r - j, 0)
            b_hi = min(W - 1 - j + r, p - 1)
            sv = sw[n, i, j]
            for m in range(K):
                cost[m] = _patch_cost(qp, kp, n, i, j, yr[n, i, j, m], yc[n, i, j, m], p, C, dot, zero)
                sv[m] = -cost[m] / T
            if agg != _PATCH:
                lse = stat[n, i, j]
                for m in range(K):
                    sv[m] = np.exp(sv[m] - lse)
            for m in range(K):
                yi = yr[n, i, j, m]
                yj = yc[n, i, j, m]
                d = zero
                if agg == _CENTER:
                    d = _dot(g[n, i, j], 0, vp[n, yi], yj * Cv, Cv, zero)
                else:
                    for a in range(a_lo, a_hi + 1):
                        zi = i + a - r
                        vr = vp[n, yi + a]
                        for b in range(b_lo, b_hi + 1):
                            zj = j + b - r
                            dv = _dot(g[n, zi, zj], 0, vr, (yj + b) * Cv, Cv, zero)
                            if agg == _PATCH:
                                # e_j(x) / D(z) * <g(z), v(y_j + d) - out(z)>
                                d += np.exp(sv[m] - stat[n, zi, zj]) * (dv - go[n, zi, zj])
                            else:
                                d += dv
                gs[m] = d
            if agg != _PATCH:  # through the softmax over j
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
def _invert(idxf, W, K, M, off, ent):
    """Per map, the inverse of the field by a counting sort (CSR).

    ``idxf (N, L * K)`` is the field flattened pixel-major, so a position ``q`` in it *is* the
    entry ``x * K + j``. The entries of key position ``y`` are ``ent[n, off[n, y] : off[n, y + 1]]``,
    in increasing ``q``: the gathers that read them then sum in an order fixed by the data alone.
    Each entry is stored as ``(q, row of x, column of x)``, decoded here once rather than by two
    integer divisions in every one of the ``p * p`` visits of the gathers.
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
            cur[y] += 1


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _backward_key_value(qp, kp, g, sw, stat, gcost, off, ent, p, dot, agg, gk, gv):
    """One task per key row: the key and value gradients at every key position ``u``, gathered.

    Padded key positions ``P`` that replicate padding reads from ``u`` (the adjoint of the
    padding), offsets ``(a, b)``, then the entries ``(x, j)`` with ``y_j(x) = P - (a, b)``.
    ``sw`` and ``gcost`` come flattened to ``(N, H * W * K)``, indexed by the entries' ``q``.
    """
    N, Hk, Wk, C = gk.shape
    Cv = gv.shape[3]
    H, W = g.shape[1], g.shape[2]
    r = p // 2
    zero = gk.dtype.type(0)
    scale = np.float32(-1.0) if dot else np.float32(-2.0)
    for t in prange(N * Hk):
        n = t // Hk
        u = t % Hk
        acck = np.empty(C, gk.dtype)
        accv = np.empty(Cv, gv.dtype)
        row_lo, row_hi = _pad_range(u, Hk, r)
        krow = kp[n, u + r]
        for v in range(Wk):
            col_lo, col_hi = _pad_range(v, Wk, r)
            ko = (v + r) * C
            acck[:] = zero
            accv[:] = zero
            for Pr in range(row_lo, row_hi + 1):
                for a in range(max(Pr - Hk + 1, 0), min(Pr, p - 1) + 1):
                    yi = Pr - a
                    for Pc in range(col_lo, col_hi + 1):
                        for b in range(max(Pc - Wk + 1, 0), min(Pc, p - 1) + 1):
                            y = yi * Wk + Pc - b
                            for e in range(off[n, y], off[n, y + 1]):
                                q = ent[n, e, 0]
                                xi = ent[n, e, 1]
                                xj = ent[n, e, 2]
                                gc = gcost[n, q]
                                if dot:
                                    _axpy(acck, gc, qp[n, xi + a], (xj + b) * C, C)
                                else:
                                    _axpy_diff(acck, gc, qp[n, xi + a], (xj + b) * C, krow, ko, C)
                                if agg != _CENTER:
                                    zi = xi + a - r
                                    zj = xj + b - r
                                    if 0 <= zi < H and 0 <= zj < W:  # votes off the map were dropped
                                        coef = sw[n, q]
                                        if agg == _PATCH:
                                            coef = np.exp(coef - stat[n, zi, zj])
                                        _axpy(accv, coef, g[n, zi, zj], 0, Cv)
            if agg == _CENTER:  # the value is read at y itself, unpadded
                y = u * Wk + v
                for e in range(off[n, y], off[n, y + 1]):
                    _axpy(accv, sw[n, ent[n, e, 0]], g[n, ent[n, e, 1], ent[n, e, 2]], 0, Cv)
            dk = gk[n, u, v]
            for c in range(C):
                dk[c] = scale * acck[c]
            gv[n, u, v] = accv


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _backward_query(qp, kp, yr, yc, gcost, p, dot, gq):
    """One task per query row: the query gradient at every pixel ``u``, gathered.

    Padded query positions ``Q`` that replicate padding reads from ``u``, offsets ``(a, b)``,
    and the ``K`` matches of the patch ``x = Q - (a, b)``.
    """
    N, H, W, C = gq.shape
    K = yr.shape[3]
    r = p // 2
    zero = gq.dtype.type(0)
    scale = np.float32(-1.0) if dot else np.float32(2.0)
    for t in prange(N * H):
        n = t // H
        u = t % H
        acc = np.empty(C, gq.dtype)
        row_lo, row_hi = _pad_range(u, H, r)
        qrow = qp[n, u + r]
        for v in range(W):
            col_lo, col_hi = _pad_range(v, W, r)
            qo = (v + r) * C
            acc[:] = zero
            for Qr in range(row_lo, row_hi + 1):
                for a in range(max(Qr - H + 1, 0), min(Qr, p - 1) + 1):
                    xi = Qr - a
                    for Qc in range(col_lo, col_hi + 1):
                        for b in range(max(Qc - W + 1, 0), min(Qc, p - 1) + 1):
                            xj = Qc - b
                            for m in range(K):
                                gc = gcost[n, xi, xj, m]
                                kr = kp[n, yr[n, xi, xj, m] + a]
                                ko = (yc[n, xi, xj, m] + b) * C
                                if dot:
                                    _axpy(acc, gc, kr, ko, C)
                                else:
                                    _axpy_diff(acc, gc, qrow, qo, kr, ko, C)
            dq = gq[n, u, v]
            for c in range(C):
                dq[c] = scale * acc[c]


def _rows(x: torch.Tensor, r: int, dt: torch.dtype) -> np.ndarray:
    """``(N, C, H, W)`` -> numpy ``(N, H + 2r, (W + 2r) * C)`` in ``dt``, replicate padded."""
    N, C, H, W = x.shape
    x = x.detach().to(dt)
    if r:
        x = F.pad(x, (r, r, r, r), mode="replicate")
    return x.permute(0, 2, 3, 1).contiguous().numpy().reshape(N, H + 2 * r, (W + 2 * r) * C)


def _field(indices: torch.Tensor, Wk: int):
    """Rows and columns ``(N, H, W, K)`` of the matches, so that no kernel divides by ``Wk``."""
    idx = indices.permute(0, 2, 3, 1).contiguous()
    rows = torch.div(idx, Wk, rounding_mode="floor")
    return idx.numpy(), rows.numpy(), (idx - rows * Wk).numpy()


def _channel_last(x: torch.Tensor, dt: torch.dtype) -> np.ndarray:
    return x.detach().to(dt).permute(0, 2, 3, 1).contiguous().numpy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """Channel-last ``(N, H, W, C)`` -> contiguous ``(N, C, H, W)``."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _scalar(temperature: torch.Tensor, dt: torch.dtype):
    """The temperature rounded to the compute dtype, as the reference does, as a numpy scalar."""
    t = temperature.detach().to(dt).item()
    return np.float64(t) if dt == torch.float64 else np.float32(t)


def attend_forward(query, key, value, indices, temperature, patch_size: int, aggregation: str, similarity: str):
    """``out (N, Cv, H, W)`` and the statistic ``(N, H, W)``, both in the compute dtype."""
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K, H, W = indices.shape
    Wk = key.shape[-1]
    Cv = value.shape[1]
    p, r = patch_size, patch_size // 2
    agg = _AGGREGATIONS[aggregation]
    qp = _rows(query, r, dt)
    kp = _rows(key, r, dt)
    vp = _rows(value, 0 if agg == _CENTER else r, dt)
    _, yr, yc = _field(indices, Wk)
    T = _scalar(temperature, dt)
    score = np.empty((N, H, W, K), dtype=np_dt)
    stat = np.empty((N, H, W), dtype=np_dt)
    out = np.empty((N, H, W, Cv), dtype=np_dt)
    dot = similarity == "dot"
    _forward_scores(qp, kp, vp, yr, yc, T, query.shape[1], p, dot, agg, score, stat, out)
    if agg != _CENTER:
        _forward_votes(vp, yr, yc, score, p, agg, stat, out)
    return _to_torch(out), torch.from_numpy(stat)


def attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size: int, aggregation: str, similarity: str):
    """Gradients ``(query, key, value, temperature)``, in the compute dtype; deterministic."""
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K, H, W = indices.shape
    C, Cv = query.shape[1], value.shape[1]
    Hk, Wk = key.shape[-2:]
    p, r = patch_size, patch_size // 2
    agg = _AGGREGATIONS[aggregation]
    dot = similarity == "dot"
    qp = _rows(query, r, dt)
    kp = _rows(key, r, dt)
    vp = _rows(value, 0 if agg == _CENTER else r, dt)
    idx, yr, yc = _field(indices, Wk)
    T = _scalar(temperature, dt)
    g = grad.detach().to(dt)
    if agg == _PATCH:
        go = (g * out.detach().to(dt)).sum(1).contiguous().numpy()
    else:
        go = np.zeros((1, 1, 1), dtype=np_dt)
        if agg == _PATCH_MEAN:
            g = g / vote_counts(H, W, p, g.device, dt)
    g = _channel_last(g, dt)
    stat_np = stat.detach().to(dt).contiguous().numpy()

    sw = np.empty((N, H, W, K), dtype=np_dt)
    gcost = np.empty((N, H, W, K), dtype=np_dt)
    part = np.empty(N * H, dtype=np.float64)
    _backward_scores(qp, kp, vp, yr, yc, T, C, p, dot, agg, g, go, stat_np, sw, gcost, part)

    M = Hk * Wk
    off = np.empty((N, M + 1), dtype=np.int64)
    ent = np.empty((N, H * W * K, 3), dtype=np.int64)
    _invert(idx.reshape(N, H * W * K), W, K, M, off, ent)
    gk = np.empty((N, Hk, Wk, C), dtype=np_dt)
    gv = np.empty((N, Hk, Wk, Cv), dtype=np_dt)
    LK = H * W * K
    _backward_key_value(qp, kp, g, sw.reshape(N, LK), stat_np, gcost.reshape(N, LK), off, ent, p, dot, agg, gk, gv)
    gq = np.empty((N, H, W, C), dtype=np_dt)
    _backward_query(qp, kp, yr, yc, gcost, p, dot, gq)

    # s = -cost / T, so d s / d T = cost / T^2; the row partials are summed in a fixed order.
    T64 = float(T)
    gT = torch.tensor(float(part.sum()) / (T64 * T64), dtype=torch.float64).to(dt)
    return _to_torch(gq), _to_torch(gk), _to_torch(gv), gT
