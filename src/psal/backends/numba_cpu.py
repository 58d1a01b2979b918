"""Compiled CPU PatchMatch (numba), parallel over every core.

Scheme: sequential-scan propagation with alternating directions, inside horizontal bands of
``_BAND`` rows. Each (map, band) pair is one task of a ``prange``; a band only reads pixels of its
own band, so no task reads what another writes. The band boundaries move by half a band every
other iteration so that vertical propagation crosses them. Random numbers come from a counter
hash of (seed, iteration, pixel): results depend on neither the thread count nor the schedule.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous; fields are ``(N, H, W, K)``.

Compiled once, cached on disk (numba ``cache=True``), so later processes load instead of compile.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from .reference import allowed_table

# No 'nnan'/'ninf': NaN costs from NaN inputs must stay visible to the comparisons.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
# error_model="numpy": integer division needs no zero check (no divisor here is ever 0), and the
# hot helpers are inlined into the kernels; together these made the search 1.6x faster.
_HOT = dict(cache=True, error_model="numpy")
_BAND = 16  # rows per parallel task; fixed, so that results do not depend on the thread count
# Lower-bound sketch: values per pixel. The key's sketch is read at random places, so it must stay
# in cache: 8 values were fastest at 256x256 keys, 4 at 512x512 (8 took 1.2x longer there).
_SKETCH_DIMS_SMALL, _SKETCH_DIMS_LARGE, _SKETCH_LARGE_KEYS = 8, 4, 1 << 17
_SKETCH_CHANNELS = 8  # principal channel directions considered
# Random starts screened by their sketch bound per match (at most _SCREEN_MAX per pixel): at
# 256x256, p = 7, k = 3, 48 took the mean cost ratio to exact after 5 iterations from 1.045 to 1.032
# for 8% more time; one more iteration instead bought less (1.038 for 15%).
_SCREEN_PER_MATCH, _SCREEN_MAX = 16, 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


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


@njit(fastmath=_FASTMATH, **_HOT)
def _cost(qp, kp, n, qi, qj, ki, kj, p, C, dot, bound):
    """Patch cost of query corner (qi, qj) and key corner (ki, kj) in padded coordinates.

    A patch row is ``p * C`` contiguous values. Offsets are unsigned so that numba drops its
    negative-index wrap-around, which otherwise keeps the loop from vectorising (3x slower).
    An l2 cost stops early once it reaches ``bound``: partial sums only grow, so the candidate
    can no longer beat the worst kept match.
    """
    span = np.uint64(p * C)
    qo = np.uint64(qj * C)
    ko = np.uint64(kj * C)
    acc = np.float32(0.0)
    for di in range(p):
        qr = qp[n, qi + di]
        kr = kp[n, ki + di]
        s = np.float32(0.0)
        if dot:
            for t in range(span):
                s -= qr[qo + t] * kr[ko + t]
        else:
            for t in range(span):
                d = qr[qo + t] - kr[ko + t]
                s += d * d
        acc += s
        if not dot and acc >= bound:
            return acc
    return acc


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
def _bound(sq, sk, n, i, j, ki, kj):
    """Squared distance of two sketches: a lower bound of the l2 patch cost (0 with no sketch)."""
    a = sq[n, i, j]
    b = sk[n, ki, kj]
    lb = np.float32(0.0)
    for t in range(np.uint64(sq.shape[3])):
        e = a[t] - b[t]
        lb += e * e
    return lb


@njit(fastmath=_FASTMATH, inline="always", **_HOT)
def _try(qp, kp, sq, sk, mask, has_mask, n, i, j, li, lc, ki, kj, Wk, p, C, dot):
    """Offer key position (ki, kj) to the list of query pixel (i, j).

    Kept if allowed, not in the list yet, and strictly better than the worst. The sketch lower
    bound rejects most random candidates before their cost is computed.
    """
    cand = ki * Wk + kj
    if has_mask and not mask[n, cand]:
        return
    K = li.shape[0]
    for t in range(K):
        if li[t] == cand:
            return
    worst = lc[K - 1]
    if sq.shape[3] > 0 and _bound(sq, sk, n, i, j, ki, kj) >= worst:
        return
    c = _cost(qp, kp, n, i, j, ki, kj, p, C, dot, worst)
    if c < worst:  # False for NaN
        _insert(li, lc, cand, c, K - 1)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _init(qp, kp, sq, sk, mask, has_mask, allowed, n_allowed, init_idx, has_init, out_idx, out_cost, Wk, p, C, dot, seed, screen):
    N, H, W, K = out_idx.shape
    inf = np.float32(np.inf)
    for t in prange(N * H):
        n = t // H
        i = t % H
        nal = n_allowed[n]
        for j in range(W):
            li = out_idx[n, i, j]
            lc = out_cost[n, i, j]
            state = _mix(seed ^ np.uint64((n * H + i) * W + j))
            # K distinct ranks, kept sorted in li: draw r below the count not taken yet, then step
            # it past every taken rank <= r.
            for m in range(K):
                state, r = _below(state, nal - m)
                pos = 0
                while pos < m and li[pos] <= r:
                    r += 1
                    pos += 1
                for q in range(m, pos, -1):
                    li[q] = li[q - 1]
                li[pos] = r
            for m in range(K):
                if has_mask:
                    li[m] = allowed[n, li[m]]
                lc[m] = _bound(sq, sk, n, i, j, li[m] // Wk, li[m] % Wk) if screen > 0 else np.float32(0.0)
            # Screening: `screen` more random positions, each replacing the kept one with the
            # highest sketch bound when its own bound is lower. Bounds cost a few operations
            # where a cost costs C * p * p, so the start is far better for little time.
            for _ in range(screen):
                state, r = _below(state, nal)
                y = allowed[n, r] if has_mask else r
                lb = _bound(sq, sk, n, i, j, y // Wk, y % Wk)
                top = 0
                for m in range(K):
                    if li[m] == y:
                        top = -1
                        break
                    if lc[m] > lc[top]:
                        top = m
                if top >= 0 and lb < lc[top]:
                    li[top] = y
                    lc[top] = lb
            for m in range(K):
                y = li[m]
                c = _cost(qp, kp, n, i, j, y // Wk, y % Wk, p, C, dot, inf)
                _insert(li, lc, y, inf if c != c else c, m)  # sorted as the list fills
            if has_init:
                for m in range(init_idx.shape[3]):
                    y = init_idx[n, i, j, m]
                    _try(qp, kp, sq, sk, mask, has_mask, n, i, j, li, lc, y // Wk, y % Wk, Wk, p, C, dot)


@njit(parallel=True, fastmath=_FASTMATH, **_HOT)
def _iterate(qp, kp, sq, sk, mask, has_mask, out_idx, out_cost, Hk, Wk, p, C, dot, seed, it, band):
    N, H, W, K = out_idx.shape
    forward = it % 2 == 0
    d = 1 if forward else -1
    shift = ((it // 2) % 2) * (band // 2)
    nb = (H + shift + band - 1) // band
    for t in prange(N * nb):
        n = t // nb
        b = t % nb
        r0 = max(b * band - shift, 0)
        r1 = min((b + 1) * band - shift, H)
        for ii in range(r1 - r0):
            i = r0 + ii if forward else r1 - 1 - ii
            for jj in range(W):
                j = jj if forward else W - 1 - jj
                li = out_idx[n, i, j]
                lc = out_cost[n, i, j]
                # Propagation: the neighbour x - e behind in the scan matched y; x takes y + e.
                # All K matches of the neighbour are offered.
                jn = j - d
                if 0 <= jn < W:
                    nl = out_idx[n, i, jn]
                    for m in range(K):
                        yr = nl[m] // Wk
                        yc = nl[m] - yr * Wk + d
                        if 0 <= yc < Wk:
                            _try(qp, kp, sq, sk, mask, has_mask, n, i, j, li, lc, yr, yc, Wk, p, C, dot)
                iN = i - d
                if r0 <= iN < r1:
                    nl = out_idx[n, iN, j]
                    for m in range(K):
                        yr = nl[m] // Wk
                        yc = nl[m] - yr * Wk
                        yr += d
                        if 0 <= yr < Hk:
                            _try(qp, kp, sq, sk, mask, has_mask, n, i, j, li, lc, yr, yc, Wk, p, C, dot)
                # Random search around each kept match in turn, in windows of radius
                # max(Hk, Wk) / 2^s down to 1. Searching around all k (not only the best) is what
                # brings the 2nd..k-th matches within a few percent of exact (measured: the mean
                # cost ratio to exact went from 1.06 to 1.03 at 128x128).
                state = _mix(seed ^ np.uint64((n * H + i) * W + j))
                for a in range(K):
                    br = li[a] // Wk
                    bc = li[a] - br * Wk
                    R = max(Hk, Wk)
                    while R >= 1:
                        lo_r = max(br - R, 0)
                        lo_c = max(bc - R, 0)
                        state, r = _below(state, min(br + R, Hk - 1) - lo_r + 1)
                        state, c = _below(state, min(bc + R, Wk - 1) - lo_c + 1)
                        _try(qp, kp, sq, sk, mask, has_mask, n, i, j, li, lc, lo_r + r, lo_c + c, Wk, p, C, dot)
                        R //= 2


def _stream(seed: int, it: int) -> np.uint64:
    """A 64-bit seed per iteration, derived in Python with wrap-around arithmetic."""
    z = (seed + (it + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return np.uint64(z ^ (z >> 31))


def _padded_rows(x: torch.Tensor, r: int) -> np.ndarray:
    """``(N, C, H, W)`` -> float32 numpy ``(N, H + 2r, (W + 2r) * C)``, replicate padded."""
    N, C, H, W = x.shape
    xp = F.pad(x.detach().float(), (r, r, r, r), mode="replicate")
    return xp.permute(0, 2, 3, 1).contiguous().numpy().reshape(N, H + 2 * r, (W + 2 * r) * C)


class _SketchBasis(NamedTuple):
    """``D`` orthonormal patch filters, each a channel direction times a spatial DCT patch."""

    chans: torch.Tensor  # (m, C): orthonormal channel directions
    spatial: torch.Tensor  # (D, p, p): the spatial patch of each filter
    which: torch.Tensor  # (D,): the channel direction of each filter


def _sketch_basis(p: int, C: int, key: torch.Tensor, dims: int) -> _SketchBasis:
    """``dims`` orthonormal patch filters that capture most of the key's variance.

    Candidates are the tensor products of orthonormal channel directions (the principal
    directions of the key's channels) and the lowest 2-D DCT-II patches (frequencies 0..2 on each
    axis); the ``dims`` whose responses vary most over (a subsample of) the key are kept.

    Orthonormal projections can only shrink a vector, so the squared distance between two
    patches' sketches is a lower bound of their l2 patch cost: a candidate whose bound already
    reaches the worst kept cost is dropped after ``dims`` operations instead of ``C * p * p``.
    """
    x = torch.arange(p, dtype=torch.float64)
    freqs = range(min(p, 3))
    dct = [torch.cos(torch.pi * f * (2 * x + 1) / (2 * p)) * ((1.0 if f == 0 else 2.0) / p) ** 0.5 for f in freqs]
    spatial = torch.stack([a.outer(b) for a in dct for b in dct]).float()  # (s, p, p)
    # Statistics only choose among orthonormal filters: non-finite values may not break them.
    k = torch.nan_to_num(key.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    f = k.transpose(0, 1).reshape(C, -1).double()
    f = f - f.mean(1, keepdim=True)
    try:
        chans = torch.linalg.eigh(f @ f.T).eigenvectors.T  # (C, C), rows orthonormal
    except RuntimeError:  # pragma: no cover - eigh failing to converge
        chans = torch.eye(C, dtype=torch.float64)
    chans = chans[-min(C, _SKETCH_CHANNELS):].float()  # (m, C)
    m, s = chans.shape[0], spatial.shape[0]
    stride = max(1, int((key.shape[-2] * key.shape[-1] / 4096) ** 0.5))  # about 4096 patches
    y = _project(k, chans, p // 2)  # (N, m, Hk + 2r, Wk + 2r)
    resp = F.conv2d(y.flatten(0, 1)[:, None], spatial[:, None], stride=stride)  # (N * m, s, h, w)
    var = resp.reshape(-1, m * s, resp.shape[-2] * resp.shape[-1]).transpose(0, 1).flatten(1).var(1, correction=0)
    keep = var.argsort(descending=True)[:dims]
    return _SketchBasis(chans, spatial[keep % s], keep // s)


def _project(x: torch.Tensor, chans: torch.Tensor, r: int) -> torch.Tensor:
    """Channels of ``x (N, C, H, W)`` onto the directions ``chans (m, C)``, replicate padded by r."""
    y = torch.einsum("mc,nchw->nmhw", chans, x.detach().float())
    return F.pad(y, (r, r, r, r), mode="replicate")


def _sketch(x: torch.Tensor, r: int, basis: _SketchBasis) -> np.ndarray:
    """Sketch ``(N, H, W, D)`` of every patch of ``x (N, C, H, W)``: one depthwise filter each."""
    y = _project(x, basis.chans, r)[:, basis.which]  # (N, D, H + 2r, W + 2r)
    z = F.conv2d(y, basis.spatial[:, None], groups=basis.spatial.shape[0])
    return z.permute(0, 2, 3, 1).contiguous().numpy()


def patchmatch(query, key, mask, num_neighbors: int, patch_size: int, num_iters: int, similarity: str, init_idx, seed: int):
    """Same contract as :func:`psal.backends.reference.patchmatch`, on CPU tensors."""
    N, C, H, W = query.shape
    Hk, Wk = key.shape[-2:]
    K, p, r = num_neighbors, patch_size, patch_size // 2
    qp = _padded_rows(query, r)
    kp = _padded_rows(key, r)
    dot = similarity == "dot"
    if dot:  # no bound for a dot-product cost
        sq = sk = np.zeros((1, 1, 1, 0), dtype=np.float32)
        screen = 0
    else:
        dims = _SKETCH_DIMS_SMALL if Hk * Wk <= _SKETCH_LARGE_KEYS else _SKETCH_DIMS_LARGE
        basis = _sketch_basis(p, C, key, dims)
        screen = min(_SCREEN_PER_MATCH * K, _SCREEN_MAX)
        sq = _sketch(query, r, basis)
        sk = _sketch(key, r, basis)
    if mask is None:
        mask_np = np.ones((1, 1), dtype=np.bool_)
        allowed = np.zeros((1, 1), dtype=np.int64)
        n_allowed = np.full(N, Hk * Wk, dtype=np.int64)
    else:
        order, count = allowed_table(mask, N, Hk * Wk)
        mask_np = mask.contiguous().numpy()
        allowed = order.contiguous().numpy()
        n_allowed = count.numpy().astype(np.int64)
    if init_idx is None:
        init_np = np.zeros((1, 1, 1, 1), dtype=np.int64)
    else:
        init_np = init_idx.reshape(N, -1, H, W).permute(0, 2, 3, 1).contiguous().numpy()
    out_idx = np.empty((N, H, W, K), dtype=np.int64)
    out_cost = np.empty((N, H, W, K), dtype=np.float32)
    has_mask = mask is not None
    _init(qp, kp, sq, sk, mask_np, has_mask, allowed, n_allowed, init_np, init_idx is not None, out_idx, out_cost, Wk, p, C, dot, _stream(seed, -1), screen)
    for it in range(num_iters):
        _iterate(qp, kp, sq, sk, mask_np, has_mask, out_idx, out_cost, Hk, Wk, p, C, dot, _stream(seed, it), it, _BAND)
    idx = torch.from_numpy(out_idx).permute(0, 3, 1, 2).contiguous()
    cost = torch.from_numpy(out_cost).permute(0, 3, 1, 2).contiguous()
    return idx, cost
