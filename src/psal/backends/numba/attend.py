"""Compiled CPU attention over a k-NN field (numba): forward and backward, parallel over every core.

Same contract as :mod:`psal.backends.torch.attend` (notation, folded layouts, the returned
statistic, border rules); read its docstring first. In short: ``s_j(x) = -cost_j(x) / T``, a vote
of query patch ``x`` with offset ``(a, b)`` in ``[0, p)^2`` lands on ``z = x + (a, b) - r`` and
carries the value at padded key position ``y_j(x) + (a, b)``; votes landing outside the query map
are dropped; key and value are read with replicate padding.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous (as in the search); the field comes as the
rows and columns of the matches and the scores as ``(N, H, W, K)``. The patch of query pixel ``x``
starts at padded ``x``, the patch of key position ``y`` at padded ``y``. The kernels write the
output and the gradients channel-first, ``(N, C, H, W)``, so that none needs a transposed copy.

Volumes ``(N, C, T, H, W)`` (``"center"`` aggregation, dense queries) run on the same kernels: a
volume is padded in time as well and its padded frames are stacked, ``(N, (T + 2rt) * (H + 2r),
(W + 2r) * C)``, a map being one frame with ``pt = 1``. Stacked row ``i`` (frame ``i // H``) has
its patch corner at padded row ``(i // H) * (H + 2r) + i % H``; a space-time cost is the sum of
its ``pt`` frames' map costs, ``H + 2r`` rows apart; the gathers of the backward fold the padding
along frames as they do along rows and columns. The value is read in place, unpadded (no copy
when it is ``channels_last_3d``); a match's flat index ``t * Hk * Wk + row * Wk + col`` gives its
value row ``t * Hk + row`` and its key corner ``t * (Hk + 2r) + row``.

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

Sparse queries (``positions``, the pure-PyTorch backend's contract): the forward only, pass 1 over
the listed pixels and pass 2 gathering each listed pixel's votes from the listed patches that cover
it (the patches of one row that cover a pixel are one run of the ascending list, found by a binary
search), so nothing is sized by the unlisted pixels but the padded copies of the maps. Their
backward is the pure-PyTorch one (the dispatcher's ``SPARSE_BACKWARD``).

NaN inputs propagate through the arithmetic to NaN outputs; indices never depend on values.
Compiled once per dtype (float32, float64), cached on disk (numba ``cache=True``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import channel_last, channel_last_rows, channel_last_volume, compute_dtype, same_map, vote_counts
from .kernels import (
    CENTER,
    PATCH,
    PATCH_MEAN,
    backward_key_value,
    backward_query,
    backward_scores,
    forward_scores,
    forward_votes,
    invert_field,
    sparse_forward_scores,
    sparse_forward_votes,
)

_AGGREGATIONS = {"center": CENTER, "patch": PATCH, "patch_mean": PATCH_MEAN}


def _field(indices: torch.Tensor, Hk: int, Wk: int, pk: int):
    """The matches of a dense field ``(N, K, *S)`` as ``(N, rows, W, K)`` arrays (a volume's
    frames stacked): flat indices, the padded row of the key patch's corner on the padded key
    volume of ``pk`` rows per frame (:func:`_frames`), the unpadded row (the value's) and the
    column, so that no kernel divides. Sparse fields ``(N, K, M)``: ``(N, M, K)``."""
    idx = indices.movedim(1, -1).contiguous()
    if indices.dim() == 5:
        idx = idx.flatten(1, 2)
    rows = torch.div(idx, Wk, rounding_mode="floor")
    frames = torch.div(rows, Hk, rounding_mode="floor")
    corner = rows + frames * (pk - Hk)  # a map: the row itself
    return idx.numpy(), corner.numpy(), rows.numpy(), (idx - rows * Wk).numpy()


def _frames(query, key, p: int, pt: int):
    """The kernels' frame tuple ``(pt, H, H + 2r, Hk, Hk + 2r)``: the patch's frames, and the rows
    per frame of the query and key volumes, unpadded and padded (a map is one frame)."""
    H, Hk, r = query.shape[-2], key.shape[-2], p // 2
    return (pt, H, H + 2 * r, Hk, Hk + 2 * r)


def _to_torch(a: np.ndarray, dims) -> torch.Tensor:
    """The kernels' channel-first ``(N, C, rows, W)`` -> ``(N, C, *dims)`` (``dims`` ``(H, W)``
    or ``(T, H, W)``), no copy."""
    return torch.from_numpy(a).view(a.shape[0], a.shape[1], *dims)


def _maps(query, key, value, patch_size, dt, agg):
    """Padded channel-last copies of query and key (one when they are the same map), the value
    (padded only for the patch aggregations), the patch side and the frame tuple."""
    pt, p = (patch_size[0], patch_size[1]) if isinstance(patch_size, tuple) else (1, patch_size)
    r, rt = p // 2, pt // 2
    kp = channel_last_rows(key, dt, r, rt).numpy()
    qp = kp if same_map(query, key) else channel_last_rows(query, dt, r, rt).numpy()
    if value.dim() == 5:  # "center" only: the value read in place where it is channel-last
        vp = channel_last_volume(value, dt).numpy()
    else:
        vp = channel_last_rows(value, dt, 0 if agg == CENTER else r).numpy()
    return qp, kp, vp, p, _frames(query, key, p, pt)


def _scalar(temperature: torch.Tensor, dt: torch.dtype):
    """The temperature rounded to the compute dtype, as the pure-PyTorch backend does, as a numpy scalar."""
    t = temperature.detach().to(dt).item()
    return np.float64(t) if dt == torch.float64 else np.float32(t)


def attend_forward(query, key, value, indices, temperature, patch_size: int | tuple, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, H, W)`` and the statistic ``(N, H, W)``, both in the compute dtype
    (``(N, Cv, M)`` and ``(N, M)`` for sparse ``positions (M,)``)."""
    if positions is not None:
        return _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions)
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K = indices.shape[:2]
    dims = tuple(indices.shape[2:])
    Cv = value.shape[1]
    agg = _AGGREGATIONS[aggregation]
    qp, kp, vp, p, fr = _maps(query, key, value, patch_size, dt, agg)
    _, yr, vr, yc = _field(indices, fr[3], key.shape[-1], fr[4])
    rows, W = yr.shape[1], yr.shape[2]
    T = _scalar(temperature, dt)
    score = np.empty((N, rows, W, K), dtype=np_dt)
    stat = np.empty((N, rows, W), dtype=np_dt)
    out = np.empty((N, Cv, rows, W), dtype=np_dt)
    dot = similarity == "dot"
    forward_scores(qp, kp, vp, yr, yc, vr, T, query.shape[1], p, fr, dot, agg, score, stat, out)
    if agg != CENTER:
        forward_votes(vp, yr, yc, score, p, agg, stat, out)
    return _to_torch(out, dims), torch.from_numpy(stat).view(N, *dims)


def _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions):
    """The forward over the listed query pixels ``positions (M,)``: pass 1 over the list, pass 2
    gathers each listed pixel's votes from the listed patches that cover it (the pure-PyTorch
    backend's sparse contract). Padded copies of the maps, as in the dense forward; everything
    else is sized by ``M``."""
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K, M = indices.shape
    H, W = query.shape[-2:]
    Wk = key.shape[-1]
    Cv = value.shape[1]
    p, r = patch_size, patch_size // 2
    agg = _AGGREGATIONS[aggregation]
    kp = channel_last_rows(key, dt, r).numpy()
    qp = kp if same_map(query, key) else channel_last_rows(query, dt, r).numpy()
    vp = channel_last_rows(value, dt, 0 if agg == CENTER else r).numpy()
    _, yr, _, yc = _field(indices, key.shape[-2], Wk, key.shape[-2] + 2 * r)
    qpos = positions.contiguous().numpy()
    T = _scalar(temperature, dt)
    score = np.empty((N, M, K), dtype=np_dt)
    stat = np.empty((N, M), dtype=np_dt)
    out = np.empty((N, M, Cv), dtype=np_dt)
    dot = similarity == "dot"
    sparse_forward_scores(qp, kp, vp, qpos, yr, yc, T, query.shape[1], W, p, dot, agg, score, stat, out)
    if agg != CENTER:
        row_start = torch.searchsorted(positions, torch.arange(H + 1) * W).numpy()
        sparse_forward_votes(vp, qpos, row_start, yr, yc, score, H, W, p, agg, stat, out)
    return torch.from_numpy(out).transpose(1, 2).contiguous(), torch.from_numpy(stat)


def attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size: int | tuple, aggregation: str, similarity: str):
    """Gradients ``(query, key, value, temperature)``, in the compute dtype; deterministic.
    (Sparse queries have no numba backward yet: the dispatcher sends them to the pure-PyTorch
    one, ``psal._dispatch.SPARSE_BACKWARD``.)"""
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K = indices.shape[:2]
    dims = tuple(indices.shape[2:])
    C, Cv = query.shape[1], value.shape[1]
    key_dims = tuple(key.shape[2:])
    agg = _AGGREGATIONS[aggregation]
    dot = similarity == "dot"
    qp, kp, vp, p, fr = _maps(query, key, value, patch_size, dt, agg)
    idx, yr, vr, yc = _field(indices, fr[3], key.shape[-1], fr[4])
    rows, W = yr.shape[1], yr.shape[2]
    T = _scalar(temperature, dt)
    g = grad.detach().to(dt)
    if agg == PATCH:
        go = (g * out.detach().to(dt)).sum(1).contiguous().numpy()
    else:
        go = np.zeros((1, 1, 1), dtype=np_dt)
        if agg == PATCH_MEAN:
            g = g / vote_counts(dims, (p, p), g.device, dt)
    g = channel_last(g, dt).reshape(N, rows, W, Cv).numpy()
    stat_np = stat.detach().to(dt).reshape(N, rows, W).contiguous().numpy()

    sw = np.empty((N, rows, W, K), dtype=np_dt)
    gcost = np.empty((N, rows, W, K), dtype=np_dt)
    part = np.empty(N * rows, dtype=np.float64)
    backward_scores(qp, kp, vp, yr, yc, vr, T, C, p, fr, dot, agg, g, go, stat_np, sw, gcost, part)

    M = key[0, 0].numel()
    LK = rows * W * K
    off = np.empty((N, M + 1), dtype=np.int64)
    ent = np.empty((N, LK, 4), dtype=np.int64)
    invert_field(idx.reshape(N, LK), W, K, M, fr[1], fr[2], off, ent)
    key_rows = M // key.shape[-1]
    gk = np.empty((N, C, key_rows, key.shape[-1]), dtype=np_dt)
    gv = np.empty((N, Cv, key_rows, key.shape[-1]), dtype=np_dt)
    backward_key_value(qp, kp, g, sw.reshape(N, LK), stat_np, gcost.reshape(N, LK), off, ent, p, fr, dot, agg, gk, gv)
    gq = np.empty((N, C, rows, W), dtype=np_dt)
    backward_query(qp, kp, yr, yc, gcost, p, fr, dot, gq)

    # s = -cost / T, so d s / d T = cost / T^2; the row partials are summed in a fixed order.
    T64 = float(T)
    gT = torch.tensor(float(part.sum()) / (T64 * T64), dtype=torch.float64).to(dt)
    return _to_torch(gq, dims), _to_torch(gk, key_dims), _to_torch(gv, key_dims), gT
