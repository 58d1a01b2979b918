"""Compiled CPU PatchMatch (numba), parallel over every core.

Scheme: sequential-scan propagation with alternating directions, inside horizontal bands of
``_BAND`` rows. Each (map, band) pair is one task of a ``prange``; a band only reads pixels of its
own band, so no task reads what another writes. The band boundaries move by half a band every
other iteration so that vertical propagation crosses them. Random numbers come from a counter
hash of (seed, iteration, pixel): results depend on neither the thread count nor the schedule.

Layouts: padded maps are channel-last and flattened per row, ``(N, H + 2r, (W + 2r) * C)``, so the
``p * C`` values of one patch row are contiguous; fields are ``(N, M, K)`` over the ``M`` searched
pixels: all ``H * W`` in raster order, or the listed ``positions`` (sparse queries, whose bands
are the same row ranges; a pixel propagates from the listed neighbours only).

A sparse search over a small fraction of the key (``_IN_PLACE_FRACTION``) reads the caller's
``(N, C, H, W)`` maps in place instead, with clamped coordinates and no lower-bound sketch, so that
it allocates by the listed pixels; the kernels are the same, their cost read chosen at compile
time by the maps' layout.

Compiled once, cached on disk (numba ``cache=True``), so later processes load instead of compile.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import rng, tall
from ..layout import channel_last_rows, channel_last_volume, neighbour_table, patch_offsets, same_map
from .kernels import ALL_STAGES, search_along_time, search_init, search_iterate

_BAND = 16  # rows per parallel task; fixed, so that results do not depend on the thread count
# Lower-bound sketch: values per pixel. The key's sketch is read at random places, so it must stay
# in cache: 8 values were fastest at 256x256 keys, 4 at 512x512 (8 took 1.2x longer there).
_SKETCH_DIMS_SMALL, _SKETCH_DIMS_LARGE, _SKETCH_LARGE_KEYS = 8, 4, 1 << 17
_SKETCH_CHANNELS = 8  # principal channel directions considered
# Patches the filters are chosen on: 1024 took a 512x512 self-search's basis from 27 to 8 ms a call
# (inpainting calls it once per round) for the same mean cost ratio to exact (the search's tests).
_BASIS_SAMPLES = 1024
# Random starts screened by their sketch bound per match (at most _SCREEN_MAX per pixel): at
# 256x256, p = 7, k = 3, 48 took the mean cost ratio to exact after 5 iterations from 1.045 to 1.032
# for 8% more time; one more iteration instead bought less (1.038 for 15%).
_SCREEN_PER_MATCH, _SCREEN_MAX = 16, 64
# A sparse search listing at most 1 / _IN_PLACE_FRACTION of the key's pixels reads the caller's
# (N, C, H, W) maps in place (clamped coordinates) with no sketch: it allocates by the listed
# pixels, not by the maps (the padded copies and the key's sketch were 82% of a dense search's
# memory at 2048², 1% listed). Its costs are slower to read and unscreened, which the few
# pixels listed make up for.
_IN_PLACE_FRACTION = 32
# The least share of the key patches' variance that the sketch must keep to be used (natural
# images: 0.94-0.97 at RGB p = 7; inpainting's 12-channel features at its coarse levels: 0.18-0.24;
# 64-channel white noise: 0.02, where the bound rejected none of 41 candidates per pixel and
# iteration and cost 18% of the search's time). 0.1 leaves every inpainting call as it was.
_SKETCH_MIN_CAPTURED = 0.1


class _SketchBasis(NamedTuple):
    """``D`` orthonormal patch filters, each a channel direction times a spatial DCT patch."""

    chans: torch.Tensor  # (m, C): orthonormal channel directions
    spatial: torch.Tensor  # (D, p, p): the spatial patch of each filter
    which: torch.Tensor  # (D,): the channel direction of each filter
    captured: float  # the share of the sampled patches' variance that the D filters keep


def _sketch_basis(p: int, C: int, key: torch.Tensor, dims: int) -> _SketchBasis:
    """``dims`` orthonormal patch filters that capture most of the key's variance.

    Candidates are the tensor products of orthonormal channel directions (the principal
    directions of the key's channels) and the lowest 2-D DCT-II patches (frequencies 0..2 on each
    axis); the ``dims`` whose responses vary most over the key are kept. The statistics come from
    about ``_BASIS_SAMPLES`` patches on a regular grid of the key, gathered directly, so the cost
    does not grow with the map.

    Orthonormal projections can only shrink a vector, so the squared distance between two
    patches' sketches is a lower bound of their l2 patch cost: a candidate whose bound already
    reaches the worst kept cost is dropped after ``dims`` operations instead of ``C * p * p``.
    """
    x = torch.arange(p, dtype=torch.float64)
    freqs = range(min(p, 3))
    dct = [torch.cos(torch.pi * f * (2 * x + 1) / (2 * p)) * ((1.0 if f == 0 else 2.0) / p) ** 0.5 for f in freqs]
    spatial = torch.stack([a.outer(b) for a in dct for b in dct]).float()  # (s, p, p)
    Hk, Wk = key.shape[-2:]
    stride = max(1, int((Hk * Wk / _BASIS_SAMPLES) ** 0.5))
    grid = (torch.arange(0, Hk, stride)[:, None] * Wk + torch.arange(0, Wk, stride)[None, :]).flatten()
    # Statistics only choose among orthonormal filters: non-finite values may not break them.
    patches = key.detach().flatten(2)[:, :, patch_offsets(grid, Hk, Wk, p)].float()  # (N, C, S, p * p)
    patches = torch.nan_to_num(patches, nan=0.0, posinf=0.0, neginf=0.0)
    f = patches[..., p * p // 2].transpose(0, 1).reshape(C, -1).double()  # the patch centres
    f = f - f.mean(1, keepdim=True)
    try:
        chans = torch.linalg.eigh(f @ f.T).eigenvectors.T  # (C, C), rows orthonormal
    except RuntimeError:  # pragma: no cover - eigh failing to converge
        chans = torch.eye(C, dtype=torch.float64)
    chans = chans[-min(C, _SKETCH_CHANNELS) :].float()  # (m, C)
    m, sn = chans.shape[0], spatial.shape[0]
    y = torch.matmul(chans, patches.flatten(2)).unflatten(2, patches.shape[2:])  # (N, m, S, p * p)
    resp = torch.matmul(y, spatial.flatten(1).T)  # (N, m, S, s)
    var = resp.permute(1, 3, 0, 2).reshape(m * sn, -1).var(1, correction=0)
    keep = var.argsort(descending=True)[:dims]
    total = float(patches.transpose(0, 1).reshape(C, -1, p * p).double().var(1, correction=0).sum())
    captured = float(var[keep].sum()) / total if total > 0 else 1.0
    return _SketchBasis(chans, spatial[keep % sn], keep // sn, captured)


def _project(x: torch.Tensor, chans: torch.Tensor, r: int) -> torch.Tensor:
    """Channels of ``x (N, C, H, W)`` onto the directions ``chans (m, C)``, replicate padded by r;
    one matrix product over the map as it lies (an einsum copied it channel-last first)."""
    N, C, H, W = x.shape
    y = torch.matmul(chans, x.detach().float().reshape(N, C, H * W)).view(N, -1, H, W)
    return F.pad(y, (r, r, r, r), mode="replicate")


def _filtered(x: torch.Tensor, r: int, basis: _SketchBasis) -> torch.Tensor:
    """``(N, D, H, W)``: each filter's response at every patch of ``x (N, C, H, W)``, from the
    projection onto the filters' own channel directions only (``D`` maps, not every direction's)."""
    y = _project(x, basis.chans[basis.which], r)  # (N, D, H + 2r, W + 2r)
    N, D, H, W = x.shape[0], y.shape[1], x.shape[2], x.shape[3]
    # A sum of shifted slices, not a depthwise conv2d: the same values, and CPU conv2d's
    # unfolded workspace was 8x the output (1 GB of a 640x480 video window's search).
    out = y.new_zeros(N, D, H, W)
    p = basis.spatial.shape[-1]
    for a in range(p):
        for b in range(p):
            out.addcmul_(y[:, :, a : a + H, b : b + W], basis.spatial[:, a, b].view(1, D, 1, 1))
    return out


def _sketch(x: torch.Tensor, r: int, basis: _SketchBasis) -> np.ndarray:
    """Sketch ``(N, H, W, D)`` of every patch of ``x (N, C, H, W)``: one depthwise filter each."""
    return _filtered(x, r, basis).permute(0, 2, 3, 1).contiguous().numpy()


def _volume_sketch(x: torch.Tensor, r: int, basis: _SketchBasis, pt: int) -> np.ndarray:
    """Sketch ``(N, T * H, W, D)`` of every space-time patch ``(pt, p, p)`` of a volume
    ``x (N, C, T, H, W)``: each filter of :func:`_sketch` on every frame (replicate padded per
    frame), spread evenly over the patch's ``pt`` frames (times ``1 / sqrt(pt)``, frames clamped as
    the cost clamps them), so that the filters stay orthonormal and the distance of two sketches
    stays a lower bound of the whole space-time cost."""
    N, C, T, H, W = x.shape
    z = torch.empty(N, T, H, W, basis.which.numel())
    for t in range(T):  # a frame at a time: the padded projections of one frame, not of the volume
        z[:, t] = _filtered(x[:, :, t], r, basis).permute(0, 2, 3, 1)
    if pt > 1:  # in place, frame by frame, with the original of the frames before kept aside
        rt, before = pt // 2, [z[:, 0].clone() for _ in range(pt // 2)]  # frames t - rt .. t - 1, clamped
        for t in range(T):
            own = z[:, t].clone()
            for d in range(1, pt - rt):  # frames after t, still as they were (t itself: its original)
                z[:, t] += own if t == T - 1 else z[:, min(t + d, T - 1)]
            for prev in before:
                z[:, t] += prev
            before = before[1:] + [own] if before else before
        z.mul_(pt**-0.5)
    return z.reshape(N, T * H, W, -1).numpy()


def _sketch_at(x: torch.Tensor, p: int, basis: _SketchBasis, positions: torch.Tensor, chunk_values: int = 1 << 22) -> np.ndarray:
    """Sketch ``(N, M, D)`` of the patches of ``x (N, C, H, W)`` at the flat ``positions (M,)``
    only: their pixels gathered (replicate padding as clamped coordinates) a chunk of positions
    at a time (at most ``chunk_values`` gathered values), projected, then filtered. The same
    values as :func:`_sketch`'s up to rounding (another summation order)."""
    N, C, H, W = x.shape
    flat = x.detach().float().flatten(2)
    chans = basis.chans[basis.which]  # (D, C): each filter's channel direction
    spatial = basis.spatial.flatten(1)  # (D, p * p)
    step = max(1, chunk_values // max(N * C * p * p, 1))
    out = torch.empty(N, positions.numel(), chans.shape[0])
    for start in range(0, positions.numel(), step):
        patches = flat[:, :, patch_offsets(positions[start : start + step], H, W, p)]  # (N, C, m, p * p)
        out[:, start : start + step] = torch.einsum("dc,ncla,da->nld", chans, patches, spatial)
    return out.numpy()


def _allowed_positions(mask: torch.Tensor, K: int) -> tuple[np.ndarray, np.ndarray]:
    """The allowed key positions of each map, ascending, ``(N, at least K)`` (the kernels read
    row ``n`` below ``count[n]``, and below ``K`` when fewer are allowed, which only a call past
    the input checks can make: the padding is position 0, in range), and their counts ``(N,)``:
    the first entries of ``layout.allowed_table``'s permutation, without building the whole of it
    (three tables of the key's size at once, the peak of a video window's search)."""
    N, Nk = mask.shape
    count = mask.sum(1)
    flat = mask.reshape(-1).nonzero().squeeze(1)  # ascending: map by map, then by position
    if N == 1 and flat.numel() >= K:
        return flat[None].numpy(), count.numpy().astype(np.int64)
    out = torch.zeros(N, max(int(count.max()), K, 1), dtype=torch.int64)
    rows = flat // Nk
    start = torch.cumsum(count, 0) - count
    out[rows, torch.arange(flat.numel()) - start[rows]] = flat - rows * Nk
    return out.numpy(), count.numpy().astype(np.int64)


def patchmatch(
    query,
    key,
    mask,
    num_neighbors: int,
    patch_size: int | tuple[int, int, int],
    num_iters: int,
    similarity: str,
    init_idx,
    seed: int,
    positions=None,
    stages=ALL_STAGES,
):
    """Same contract as :func:`psal.backends.torch.search.patchmatch`, on CPU tensors. ``stages``
    (bits of ``kernels.ALL_STAGES``) leaves stages of each iteration out, for the profile only.

    Volumes (``patch_size`` a ``(pt, ph, pw)`` triple with ``ph == pw``) run on the same kernels
    as maps of their stacked frames ``(T * H, W)``, whose flat positions are the volume's: the
    kernels read a space-time patch in place from one channel-last copy of each volume (none
    when the caller's volume is already ``torch.channels_last_3d`` float32), frames, rows and
    columns clamped, and propagate along time with a frame-by-frame scan after each iteration;
    each iteration's random search also offers every kept match's place one key frame before and
    after (and a random neighbour there)."""
    volume = isinstance(patch_size, tuple)
    if isinstance(patch_size, tuple):
        pt, p, pw = patch_size
        if p != pw:
            raise ValueError(f"space-time search on map kernels needs square frames of patches (ph == pw), got patch {patch_size}")
        N, C, T, H1, W = query.shape
        Tk, Hk1, Wk = key.shape[2:]
        H, Hk = T * H1, Tk * Hk1  # rows of the maps of stacked frames
    else:
        N, C, H, W = query.shape
        Hk, Wk = key.shape[-2:]
        pt, p = 1, patch_size
    K, r = num_neighbors, p // 2
    dense = positions is None
    M = H * W if dense else positions.numel()
    # A self-search (the same memory, layout and dtype: inpainting's) shares one padded copy and
    # one sketch of the map between its query and key sides.
    same = same_map(query, key)
    in_place = not volume and not dense and M * _IN_PLACE_FRACTION <= Hk * Wk
    if volume:
        kp = channel_last_volume(key, torch.float32).numpy()
        qp = kp if same else channel_last_volume(query, torch.float32).numpy()
        key_map = key.detach().reshape(N, C, Hk, Wk)  # the sketch's statistics: patches of the stacked frames
    elif in_place:  # the caller's maps as they are (a copy only to float32 or contiguous memory)
        kp = key.detach().to(torch.float32).contiguous().numpy()
        qp = kp if same else query.detach().to(torch.float32).contiguous().numpy()
    else:
        kp = channel_last_rows(key, torch.float32, r).numpy()
        qp = kp if same else channel_last_rows(query, torch.float32, r).numpy()
    if not volume:
        key_map = key
    dot = similarity == "dot"
    dims = _SKETCH_DIMS_SMALL if Hk * Wk <= _SKETCH_LARGE_KEYS else _SKETCH_DIMS_LARGE
    basis = None if dot or in_place else _sketch_basis(p, C, key_map, dims)
    # No bound for a dot-product cost, no whole-key sketch for a few pixels, and none where the
    # sketch keeps too little of the patches' variance to reject candidates (features without
    # spatial or channel structure): its bounds would cost time and reject nothing.
    if basis is None or basis.captured < _SKETCH_MIN_CAPTURED:
        sq = np.zeros((1, 1, 0), dtype=np.float32)
        sk = np.zeros((1, 1, 1, 0), dtype=np.float32)
        screen = 0
    else:
        screen = min(_SCREEN_PER_MATCH * K, _SCREEN_MAX)
        sk = _volume_sketch(key, r, basis, pt) if volume else _sketch(key, r, basis)
        if same:
            flat = sk.reshape(N, Hk * Wk, -1)
            sq = flat if dense else np.ascontiguousarray(flat[:, positions.numpy()])
        elif volume:
            flat = _volume_sketch(query, r, basis, pt).reshape(N, H * W, -1)
            sq = flat if dense else np.ascontiguousarray(flat[:, positions.numpy()])
        else:
            sq = _sketch(query, r, basis).reshape(N, M, -1) if dense else _sketch_at(query, p, basis, positions)
    # Without a sketch to screen random starts, an in-place search offers as many at their true
    # cost, which stops early once it passes the worst kept.
    offers = min(_SCREEN_PER_MATCH * K, _SCREEN_MAX) if in_place and not dot else 0
    if mask is None:
        mask_np = np.ones((1, 1), dtype=np.bool_)
        allowed = np.zeros((1, 1), dtype=np.int64)
        n_allowed = np.full(N, Hk * Wk, dtype=np.int64)
    else:
        mask = mask.reshape(N, Hk * Wk)
        mask_np = mask.contiguous().numpy()
        allowed, n_allowed = _allowed_positions(mask, K)
    if init_idx is None:
        init_np = np.zeros((1, 1, 1), dtype=np.int64)
    else:
        init_np = init_idx.reshape(N, -1, M).transpose(1, 2).contiguous().numpy()
    if dense:
        qpos = up = down = row_start = np.zeros(1, dtype=np.int64)
    else:
        qpos = positions.contiguous().numpy()
        up = neighbour_table(positions, (H, W), (-1, 0)).numpy()
        down = neighbour_table(positions, (H, W), (1, 0)).numpy()
        row_start = torch.searchsorted(positions, torch.arange(H + 1) * W).numpy()
    along = None
    if volume and T > 1 and Tk > 1:
        listed = torch.arange(H * W) if dense else positions
        before, after, frame_start, key_frame = tall.frames_of(listed, (T, H1, W), Hk1 * Wk)
        along = (before.numpy(), after.numpy(), frame_start.numpy(), key_frame)
    # The kernels' patch: its side, or (pt, side, H, T, Hk, Tk) on the maps of stacked frames.
    pk = (pt, p, H1, T, Hk1, Tk) if volume else p
    out_idx = np.empty((N, M, K), dtype=np.int64)
    out_cost = np.empty((N, M, K), dtype=np.float32)
    has_mask = mask is not None
    search_init(qp, kp, sq, sk, mask_np, has_mask, allowed, n_allowed, init_np, init_idx is not None, out_idx, out_cost,
                qpos, dense, H * W, W, Wk, pk, C, dot, np.uint64(rng.stream(seed, -1)), screen, offers)  # fmt: skip
    for it in range(num_iters):
        search_iterate(qp, kp, sq, sk, mask_np, has_mask, out_idx, out_cost, qpos, up, down, row_start, dense,
                       H, W, Hk, Wk, pk, C, dot, np.uint64(rng.stream(seed, it)), it, _BAND, stages)  # fmt: skip
        if along is not None:
            before, after, frame_start, key_frame = along
            for table, direction in ((before, 1), (after, -1)) if it % 2 == 0 else ((after, -1), (before, 1)):
                search_along_time(qp, kp, sq, sk, mask_np, has_mask, out_idx, out_cost, qpos, dense, W, Wk, pk, C, dot,
                                  table, frame_start, key_frame, direction)  # fmt: skip
    shape = ((N, K, T, H1, W) if volume else (N, K, H, W)) if dense else (N, K, M)
    idx = torch.from_numpy(out_idx).transpose(1, 2).reshape(shape).contiguous()
    cost = torch.from_numpy(out_cost).transpose(1, 2).reshape(shape).contiguous()
    return idx, cost
