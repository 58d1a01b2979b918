"""Compiled CPU attention over a k-NN field (numba): forward and backward, parallel over every core.

Same contract as :mod:`psal.backends.torch.attend` (notation, folded layouts, the returned
statistic, border rules); read its docstring first. In short: ``s_j(x) = -cost_j(x) / T``, a vote
of query patch ``x`` with offset ``(a, b)`` in ``[0, p)^2`` lands on ``z = x + (a, b) - r`` and
carries the value at padded key position ``y_j(x) + (a, b)``; votes landing outside the query map
are dropped; key and value are read with replicate padding.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous (as in the search); the field comes as the
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

from .. import tall
from ..layout import channel_last, channel_last_rows, compute_dtype, same_map, vote_counts
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


def _field(indices: torch.Tensor, Wk: int):
    """Rows and columns ``(N, H, W, K)`` of the matches (``(N, M, K)`` for sparse fields
    ``(N, K, M)``), so that no kernel divides by ``Wk``."""
    idx = indices.movedim(1, -1).contiguous()
    rows = torch.div(idx, Wk, rounding_mode="floor")
    return idx.numpy(), rows.numpy(), (idx - rows * Wk).numpy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """Channel-last ``(N, H, W, C)`` -> contiguous ``(N, C, H, W)``."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _scalar(temperature: torch.Tensor, dt: torch.dtype):
    """The temperature rounded to the compute dtype, as the pure-PyTorch backend does, as a numpy scalar."""
    t = temperature.detach().to(dt).item()
    return np.float64(t) if dt == torch.float64 else np.float32(t)


def attend_forward(query, key, value, indices, temperature, patch_size: int | tuple, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, H, W)`` and the statistic ``(N, H, W)``, both in the compute dtype
    (``(N, Cv, M)`` and ``(N, M)`` for sparse ``positions (M,)``)."""
    if isinstance(patch_size, tuple):  # a volume, on these map kernels
        return tall.attend_forward(attend_forward, query, key, value, indices, temperature, patch_size, aggregation, similarity)
    if positions is not None:
        return _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions)
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K, H, W = indices.shape
    Wk = key.shape[-1]
    Cv = value.shape[1]
    p, r = patch_size, patch_size // 2
    agg = _AGGREGATIONS[aggregation]
    qp = channel_last_rows(query, dt, r).numpy()
    kp = channel_last_rows(key, dt, r).numpy()
    vp = channel_last_rows(value, dt, 0 if agg == CENTER else r).numpy()
    _, yr, yc = _field(indices, Wk)
    T = _scalar(temperature, dt)
    score = np.empty((N, H, W, K), dtype=np_dt)
    stat = np.empty((N, H, W), dtype=np_dt)
    out = np.empty((N, H, W, Cv), dtype=np_dt)
    dot = similarity == "dot"
    forward_scores(qp, kp, vp, yr, yc, T, query.shape[1], p, dot, agg, score, stat, out)
    if agg != CENTER:
        forward_votes(vp, yr, yc, score, p, agg, stat, out)
    return _to_torch(out), torch.from_numpy(stat)


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
    _, yr, yc = _field(indices, Wk)
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
    if isinstance(patch_size, tuple):  # a volume, on these map kernels
        return tall.attend_backward(
            attend_backward, grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity
        )
    dt = compute_dtype(query.dtype)
    np_dt = np.float64 if dt == torch.float64 else np.float32
    N, K, H, W = indices.shape
    C, Cv = query.shape[1], value.shape[1]
    Hk, Wk = key.shape[-2:]
    p, r = patch_size, patch_size // 2
    agg = _AGGREGATIONS[aggregation]
    dot = similarity == "dot"
    qp = channel_last_rows(query, dt, r).numpy()
    kp = channel_last_rows(key, dt, r).numpy()
    vp = channel_last_rows(value, dt, 0 if agg == CENTER else r).numpy()
    idx, yr, yc = _field(indices, Wk)
    T = _scalar(temperature, dt)
    g = grad.detach().to(dt)
    if agg == PATCH:
        go = (g * out.detach().to(dt)).sum(1).contiguous().numpy()
    else:
        go = np.zeros((1, 1, 1), dtype=np_dt)
        if agg == PATCH_MEAN:
            g = g / vote_counts((H, W), (p, p), g.device, dt)
    g = channel_last(g, dt).numpy()
    stat_np = stat.detach().to(dt).contiguous().numpy()

    sw = np.empty((N, H, W, K), dtype=np_dt)
    gcost = np.empty((N, H, W, K), dtype=np_dt)
    part = np.empty(N * H, dtype=np.float64)
    backward_scores(qp, kp, vp, yr, yc, T, C, p, dot, agg, g, go, stat_np, sw, gcost, part)

    M = Hk * Wk
    off = np.empty((N, M + 1), dtype=np.int64)
    ent = np.empty((N, H * W * K, 3), dtype=np.int64)
    invert_field(idx.reshape(N, H * W * K), W, K, M, off, ent)
    gk = np.empty((N, Hk, Wk, C), dtype=np_dt)
    gv = np.empty((N, Hk, Wk, Cv), dtype=np_dt)
    LK = H * W * K
    backward_key_value(qp, kp, g, sw.reshape(N, LK), stat_np, gcost.reshape(N, LK), off, ent, p, dot, agg, gk, gv)
    gq = np.empty((N, H, W, C), dtype=np_dt)
    backward_query(qp, kp, yr, yc, gcost, p, dot, gq)

    # s = -cost / T, so d s / d T = cost / T^2; the row partials are summed in a fixed order.
    T64 = float(T)
    gT = torch.tensor(float(part.sum()) / (T64 * T64), dtype=torch.float64).to(dt)
    return _to_torch(gq), _to_torch(gk), _to_torch(gv), gT
