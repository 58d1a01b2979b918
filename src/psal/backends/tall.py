"""Volumes on map kernels: Triton's space-time search and "center" attention, whose kernels are
written for maps, through the tall maps of :mod:`.layout`.

A space-time patch ``(pt, p, p)`` of a volume is the ``p x p`` patch of its tall map (each pixel
carrying its ``pt`` frames as channels, the frames stacked one under the other with ``r = p // 2``
replicated rows between them; ``layout.tall_stacked``), term for term, so a map kernel computes
the volume's costs exactly. (numba's search does not come here: its kernels read space-time
patches in place from the volume's frames, ``psal.backends.numba.search``, and its attention
reads padded volumes, ``psal.backends.numba.attend``.) Key positions on
padding rows are masked out and query positions on them are not listed (sparse queries over the frame rows). Propagation along time, which a map
kernel does not do, is offered between iterations: each pixel gets the matches of the pixel
one frame before (moved one key frame on) and one frame after (moved one key frame back) as warm
start candidates of the next iteration, one frame per iteration.

The attention reads the value at the match's centre only, so the value is the tall map of its
frames alone; queries on padding rows take their row's matches, get no gradient, and are dropped;
gradients go back through the adjoints of the gathers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import layout
from .layout import same_map


def _square(patch, what: str) -> tuple[int, int, int]:
    pt, p, pw = patch
    if p != pw:
        raise ValueError(f"space-time {what} on map kernels needs square frames of patches (ph == pw), got patch {tuple(patch)}")
    return pt, p, p // 2


def frames_of(listed: torch.Tensor, dims, key_frame: int):
    """Of the listed query positions ``(M,)`` of a ``(T, H, W)`` volume: the list index of each
    pixel's place one frame before and one after (-1: not listed, or off the volume), where each
    frame's pixels start in the list ``(T + 1,)``, and a key frame's step on the tall key map."""
    T, H, W = dims
    frame, M = H * W, listed.numel()
    tables = []
    for dt in (-1, 1):
        want = listed + dt * frame
        at = torch.searchsorted(listed, want).clamp_(max=M - 1)
        ok = (listed[at] == want) & (want >= 0) & (want < T * frame)
        tables.append(torch.where(ok, at, -1))
    frame_start = torch.searchsorted(listed, torch.arange(T + 1, device=listed.device) * frame)
    return tables[0], tables[1], frame_start, key_frame


def _time_candidates(idx: torch.Tensor, before: torch.Tensor, after: torch.Tensor, key_frame: int, key_total: int) -> torch.Tensor:
    """``idx (N, K, M)`` -> ``(N, 2K, M)``: the matches of each pixel's neighbours in time, moved
    one key frame toward it; the pixel's own best match where there is none."""
    parts = []
    for table, move in ((before, key_frame), (after, -key_frame)):
        moved = idx[:, :, table.clamp(min=0)] + move
        ok = (table >= 0) & (moved >= 0) & (moved < key_total)
        parts.append(torch.where(ok, moved, idx[:, :1]))
    return torch.cat(parts, 1)


def search(map_search: Callable, query, key, mask, num_neighbors, patch, num_iters, similarity, init_idx, seed, positions):
    """The volume search on ``map_search`` (a backend's map ``patchmatch``, same contract, sparse
    positions included), with candidates along time offered between iterations (see the module
    docstring)."""
    N, C, T, H, W = query.shape
    Tk, Hk, Wk = key.shape[2:]
    pt, p, r = _square(patch, "search")
    device = query.device
    same = same_map(query, key)
    kt = layout.tall_stacked(key, pt, r)
    qt = kt if same else layout.tall_stacked(query, pt, r)
    tall_mask = torch.zeros(N, Tk, Hk + 2 * r, Wk, dtype=torch.bool, device=device)
    tall_mask[:, :, r : r + Hk] = True if mask is None else mask.reshape(N, Tk, Hk, Wk)
    tall_mask = tall_mask.reshape(N, -1)
    listed = torch.arange(T * H * W, device=device) if positions is None else positions
    tall_positions = layout.to_tall(listed, H, W, r)
    init = None if init_idx is None else layout.to_tall(init_idx.reshape(N, init_idx.shape[1], -1), Hk, Wk, r)
    key_frame = (Hk + 2 * r) * Wk
    along = frames_of(listed, (T, H, W), key_frame) if T > 1 and Tk > 1 else None
    if along is None or num_iters == 0:
        idx, cost = map_search(qt, kt, tall_mask, num_neighbors, p, num_iters, similarity, init, seed, tall_positions)
    else:
        before, after = along[0], along[1]
        idx, cost = map_search(qt, kt, tall_mask, num_neighbors, p, 1, similarity, init, seed, tall_positions)
        for it in range(1, num_iters + 1):
            warm = torch.cat([idx, _time_candidates(idx, before, after, key_frame, Tk * key_frame)], 1)
            # the last round only offers the candidates of the last iteration (no iteration of its own)
            rounds = 1 if it < num_iters else 0
            idx, cost = map_search(qt, kt, tall_mask, num_neighbors, p, rounds, similarity, warm, seed + 7919 * it, tall_positions)
    idx = layout.from_tall(idx, Hk, Wk, r)
    if positions is None:
        idx, cost = idx.reshape(N, num_neighbors, T, H, W), cost.reshape(N, num_neighbors, T, H, W)
    return idx, cost


def _attend_maps(query, key, value, indices, patch):
    pt, p, r = _square(patch, "attention")
    if indices.dim() != 5:
        raise ValueError("space-time attention on map kernels needs dense queries (no positions)")
    Hk, Wk = key.shape[-2:]
    kt = layout.tall_stacked(key, pt, r)
    qt = kt if same_map(query, key) else layout.tall_stacked(query, pt, r)
    # contiguous: Triton's kernels read the value and the field channel-first in place
    vt = layout.tall(value, r).contiguous()
    it = layout.tall(layout.to_tall(indices.long(), Hk, Wk, r).to(indices.dtype), r).contiguous()
    return qt, kt, vt, it, p, r


def attend_forward(map_forward: Callable, query, key, value, indices, temperature, patch, aggregation, similarity):
    """``"center"`` attention of a volume on ``map_forward`` (a backend's map ``attend_forward``)."""
    if aggregation != "center":
        raise ValueError(f"space-time attention on map kernels has 'center' aggregation only, got {aggregation!r}")
    qt, kt, vt, it, p, r = _attend_maps(query, key, value, indices, patch)
    out, stat = map_forward(qt, kt, vt, it, temperature, p, aggregation, similarity)
    T = query.shape[2]
    return layout.untall(out, T, r).contiguous(), layout.untall(stat[:, None], T, r)[:, 0].contiguous()


def attend_backward(map_backward: Callable, grad, query, key, value, indices, temperature, out, stat, patch, aggregation, similarity):
    """The gradients of :func:`attend_forward` on ``map_backward``, in the map backward's dtypes."""
    qt, kt, vt, it, p, r = _attend_maps(query, key, value, indices, patch)
    pt = patch[0]
    T, Tk = query.shape[2], key.shape[2]
    g = F.pad(grad, (0, 0, r, r)).flatten(2, 3)  # zero on the padding rows: no gradient from them
    out_t = layout.tall(out, r)
    stat_t = layout.tall(stat[:, None], r)[:, 0]
    gq, gk, gv, gT = map_backward(g, qt, kt, vt, it, temperature, out_t, stat_t, p, aggregation, similarity)
    gk = layout.stack_frames_adjoint(layout.tall_adjoint(gk, Tk, r), pt)
    gq = layout.stack_frames_adjoint(layout.tall_adjoint(gq, T, r), pt)
    gv = layout.tall_adjoint(gv, Tk, r)
    return gq, gk, gv, gT
