"""Video inpainting with space-time PSAL (after Newson, Almansa, Fradet, Gousseau and Pérez 2014).

The picture inpainter (:mod:`psal.apps.inpaint`) carried to space-time patches: the video
``(1, C, T, H, W)`` is filled coarse to fine on a pyramid in space (time keeps every frame), and
at every scale two steps alternate until the hole stops changing:

1. search: :func:`psal.patchmatch` of the video against itself with ``(pt, ph, pw)`` space-time
   patches, the keys only where the whole space-time patch is known (a moving occluder uncovers
   the background in other frames, which the search reaches: it covers the whole volume and
   propagates along time), the queries only around the hole (sparse positions);
2. reconstruction: :func:`psal.attend` with ``aggregation="patch"``: each hole pixel takes the
   weighted votes of every space-time patch that covers it, so neighbouring frames agree and the
   fill does not flicker.

Patches are compared on the colours, their spatial gradients and Newson's texture features
(per frame); the votes are weighted by Wexler's confidence from the space-time distance into the
hole. The last step copies the centre of each hole pixel's best match, no averaging. Known pixels
of the result are the input's, bit for bit.

Memory: a video longer than ``window`` frames is filled one window at a time; each window starts
with the last ``overlap`` frames of the previous one, already filled and then treated as known,
so the fill runs on across windows. What a window holds is its frames' features at each scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from .. import _checks as checks
from ..functional import attend, patch_costs, patchmatch
from ..types import KNNField
from .inpaint import (
    _CONFIDENCE,
    _GRADIENT_WEIGHT,
    _TEMPERATURE_PERCENTILE,
    _TEMPERATURE_SCALE,
    _TEXTURE_WEIGHT,
    _check_options,
    _masked_downsample,
    _smooth_fill,
    _texture_features,
    _write_hole,
)

__all__ = ["inpaint_video"]

_FN = "psal.apps.inpaint_video"


# ----------------------------------------------------------------------------------------------
# Volumes: videos (1, C, T, H, W), holes (1, 1, T, H, W) bool. The per-frame helpers of the picture
# inpainter run on the frames as a batch (T, C, H, W).


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)


def _volume(f: torch.Tensor) -> torch.Tensor:
    return f.transpose(0, 1)[None].contiguous()


def _dilate(hole: torch.Tensor, radii) -> torch.Tensor:
    """Hole voxels grown by ``radii`` (frames, rows, columns; Chebyshev). Off-volume voxels count
    as known, as replicate padding makes them."""
    if not any(radii):
        return hole
    kernel = tuple(2 * r + 1 for r in radii)
    return F.max_pool3d(hole.float(), kernel, stride=1, padding=tuple(radii)) > 0


def full_patch_mask(hole: torch.Tensor, patch) -> torch.Tensor:
    """``Tensor[1, T, H, W]`` bool: the positions whose whole space-time ``patch`` is known."""
    return ~_dilate(hole, [p // 2 for p in patch])[:, 0]


def _hole_depth(hole: torch.Tensor, dtype) -> torch.Tensor:
    """Chebyshev distance in space-time of each hole voxel to the known region, 0 on known voxels:
    ``Tensor[1, 1, T, H, W]``, by growing the known region one voxel per step."""
    known = ~hole
    depth = torch.zeros(hole.shape, dtype=dtype, device=hole.device)
    step = 0
    while not bool(known.all()):
        step += 1
        grown = F.max_pool3d(known.float(), 3, stride=1, padding=1) > 0
        if bool((grown == known).all()):  # nothing known anywhere: depth stays 0
            break
        depth = torch.where(grown & ~known, torch.full_like(depth, step), depth)
        known = grown
    return depth


def _downsample(video: torch.Tensor, hole: torch.Tensor, size):
    """Every frame shrunk to ``size`` (rows, columns) from its known pixels only."""
    down, down_hole = _masked_downsample(_frames(video), _frames(hole), size)
    return _volume(down), _volume(down_hole)


def _feature_map(state: torch.Tensor, channels: int, hole: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """What space-time patches are compared on: the state (colours and texture features) and the
    colours' spatial differences, per frame, and one zero channel for Wexler's confidence. The
    state is the map's first channels: the caller keeps ``feat[:, :S]`` as its state, so that a
    window holds one copy of it (:func:`_refresh` recomputes the differences in place). With
    ``hole`` and ``up``, the state is ``up`` on the hole and ``state`` elsewhere, written in place.
    In ``torch.channels_last_3d`` memory, which numba's space-time search reads in place, with no
    copy: the searches take the whole map, whose confidence channel is 0 while they run."""
    S = state.shape[1]
    feat = torch.empty((1, S + 2 * channels + 1, *state.shape[2:]), dtype=state.dtype, device=state.device,
                       memory_format=torch.channels_last_3d)  # fmt: skip
    if hole is None or up is None:
        feat[:, :S] = state
    else:
        torch.where(hole, up, state, out=feat[:, :S])
    feat[:, -1] = 0
    _refresh(feat, S, channels)
    return feat


def _refresh(feat: torch.Tensor, states: int, channels: int) -> None:
    """The colours' differences of :func:`_feature_map` recomputed in place from the state in
    ``feat[:, :states]`` (whose first ``channels`` are the colours), after the votes changed it."""
    x = feat[:, :channels]
    for at, axis in ((states, -1), (states + channels, -2)):
        g = feat[:, at : at + channels]
        n = x.shape[axis]
        if n < 3:  # no central difference fits: none (as a flat picture's)
            g.zero_()
            continue
        # the central difference, replicated at the two ends (as _features' padding does)
        inner = g.narrow(axis, 1, n - 2)
        torch.sub(x.narrow(axis, 2, n - 2), x.narrow(axis, 0, n - 2), out=inner)
        inner.mul_(0.5 * _GRADIENT_WEIGHT)
        g.narrow(axis, 0, 1).copy_(g.narrow(axis, 1, 1))
        g.narrow(axis, n - 1, 1).copy_(g.narrow(axis, n - 2, 1))


def _upsample_indices(indices: torch.Tensor, coarse, coarse_where, fine, fine_where):
    """Coarse matches carried to the finer grid (frames unchanged): fine pixel ``x`` in coarse
    cell ``c`` whose match is ``m`` takes ``x + (m - c) * scale`` in rows and columns, the frame
    of ``m``, clamped to the volume. Fields sparse over ``coarse_where`` / ``fine_where`` (flat
    ``t * H * W + row * W + col``). Returns the fine matches and which fine pixels found their
    coarse cell listed."""
    T, hc, wc = coarse
    _, hf, wf = fine
    t, rest = fine_where // (hf * wf), fine_where % (hf * wf)
    i, j = rest // wf, rest % wf
    ci = torch.div(i * hc, hf, rounding_mode="floor").clamp_(max=hc - 1)
    cj = torch.div(j * wc, wf, rounding_mode="floor").clamp_(max=wc - 1)
    cell = (t * hc + ci) * wc + cj
    slot = torch.searchsorted(coarse_where, cell).clamp_(max=coarse_where.numel() - 1)
    found = coarse_where[slot] == cell
    up = indices[..., slot]
    mt, mrest = up // (hc * wc), up % (hc * wc)
    row = i + torch.div((mrest // wc - ci) * hf, hc, rounding_mode="floor")
    col = j + torch.div((mrest % wc - cj) * wf, wc, rounding_mode="floor")
    return (mt * hf + row.clamp_(0, hf - 1)) * wf + col.clamp_(0, wf - 1), found


def _vote(state, feat, indices, costs, hole, where, depth, patch, backend, aggregation="patch", scale=_TEMPERATURE_SCALE):
    """One reconstruction of the hole voxels of ``state`` (in place) from the matches of the listed
    query positions ``where``; returns the change of the hole voxels ``(1, channels, holes)``."""
    volume = patch[0] * patch[1] * patch[2]
    best = costs.amin(2)[:, 0].flatten()
    temp = torch.quantile(best.double(), _TEMPERATURE_PERCENTILE).to(state.dtype)
    temp = (temp * scale).clamp_min(1e-6 * volume)
    feat[:, -1:] = (temp * _CONFIDENCE * depth / volume).sqrt()
    out = attend(feat, feat, state, indices, patch_size=tuple(patch), temperature=temp, aggregation=aggregation,
                 backend=backend, positions=where)  # fmt: skip
    feat[:, -1:] = 0
    fill = hole.flatten()[where]
    return _write_hole(state, out[:, :, fill], where[fill])


# ----------------------------------------------------------------------------------------------
# Validation.


def _check_inputs(video, mask, patch_size, num_neighbors, window, overlap, out=None):
    """Every argument check in one place; returns the hole ``(1, 1, T, H, W)``, the patch, ``k``,
    the window and the overlap."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{_FN}: video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() != 5 or video.shape[0] != 1:
        raise ValueError(f"{_FN}: video must have shape (1, C, T, H, W), got {checks._shape(video)}")
    if not video.dtype.is_floating_point:
        raise TypeError(f"{_FN}: video must be floating point in [0, 1], got {video.dtype} with shape {checks._shape(video)}")
    _, C, T, H, W = video.shape
    if min(C, T, H, W) < 1:
        raise ValueError(f"{_FN}: video must have at least one channel, frame and pixel, got shape {checks._shape(video)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_FN}: mask must be a bool torch.Tensor (True = hole), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{_FN}: mask must have dtype torch.bool (True = hole to fill), got {mask.dtype} with shape {checks._shape(mask)}")
    if mask.dim() not in (3, 5) or tuple(mask.shape[-3:]) != (T, H, W) or mask.numel() != T * H * W:
        raise ValueError(
            f"{_FN}: mask must have shape (T, H, W) or (1, 1, T, H, W) with (T, H, W) = ({T}, {H}, {W}) "
            f"of video {checks._shape(video)}, got {checks._shape(mask)}"
        )
    if mask.device != video.device:
        raise ValueError(f"{_FN}: mask must be on the video's device {video.device}, got {mask.device}")
    if out is not None and (
        not isinstance(out, torch.Tensor) or out.shape != video.shape or out.dtype != video.dtype or out.device != video.device
    ):
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"{checks._shape(out)} {out.dtype} on {out.device}"
        raise ValueError(
            f"{_FN}: out must be a tensor of the video's shape {checks._shape(video)}, dtype {video.dtype} and device {video.device}, got {what}"
        )
    patch = checks.check_patch_size(_FN, patch_size, volume=True)
    k = checks.check_int(_FN, "num_neighbors", num_neighbors, 1)
    window = checks.check_int(_FN, "window", window, 1)
    overlap = checks.check_int(_FN, "overlap", overlap, 0)
    if overlap >= window:
        raise ValueError(f"{_FN}: overlap must be smaller than window, got overlap={overlap}, window={window}")
    hole = mask.reshape(1, 1, T, H, W)
    holes = int(hole.sum())
    if holes == 0:
        raise ValueError(f"{_FN}: mask {checks._shape(mask)} is empty: no pixel is True (True marks the hole to fill)")
    if holes == T * H * W:
        raise ValueError(f"{_FN}: mask {checks._shape(mask)} covers the whole video: no known pixel to copy from")
    sources = int(full_patch_mask(hole, patch).sum())
    if sources < k:
        raise ValueError(
            f"{_FN}: mask {checks._shape(mask)} leaves {sources} fully known {'x'.join(map(str, patch))} patches in "
            f"video {checks._shape(video)}, fewer than num_neighbors={k}; use a smaller hole or patch_size"
        )
    return hole, patch, k, window, overlap


# ----------------------------------------------------------------------------------------------
# The method.


def inpaint_video(
    video: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = (3, 5, 5),
    num_neighbors: int = 1,
    num_iters: int = 6,
    search_iters: int = 3,
    scales: int | None = None,
    tolerance: float = 1e-3,
    window: int = 24,
    overlap: int = 4,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill the hole of a video with space-time patches of its known part, PSAL as the engine.

    Coarse to fine in space; at each scale, PatchMatch over the space-time volume (keys only where
    the whole space-time patch is known, queries around the hole) alternates with ``"patch"``
    aggregation until the hole stops changing. The module docstring gives the method. The device
    and dtype follow the video (float16/bfloat16 are computed in float32).

    Args:
        video: ``Tensor[1, C, T, H, W]`` floating point in ``[0, 1]``.
        mask: ``Tensor[T, H, W]`` or ``Tensor[1, 1, T, H, W]`` bool, True on the hole to fill.
        patch_size: an odd int (a cube) or ``(pt, ph, pw)``, odd sides of the space-time patches.
        num_neighbors: matches per patch (``k``); 1 gives the sharpest fill.
        num_iters: at most this many search + reconstruction rounds per scale.
        search_iters: PatchMatch iterations per round (each round warm-starts from the last).
        scales: pyramid levels in space; ``None``: halve until the next level would be narrower
            than two patches (fewer when the hole vanishes, or too few known patches remain).
        tolerance: a scale ends when the mean change of its hole pixels falls below this.
        window: frames filled together; a longer video is filled window by window.
        overlap: frames each window shares with the previous one (filled there, known here).
        generator: source of randomness; the same seed gives the same result.
        progress: called as ``progress(done, total)`` after each round, over the whole video.
        backend: PSAL backend (``"auto"``, ``"numba"``, ``"triton"`` or ``"torch"``).
        out: a tensor of the video's shape, dtype and device to write the result into, which may
            be ``video`` itself (filled in place: no second copy of the video in memory);
            ``None``: a new tensor.

    Returns:
        ``Tensor[1, C, T, H, W]`` on the video's device, in its dtype: the known pixels bitwise
        unchanged, the hole filled.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> video = torch.rand(1, 3, 6, 32, 32)
        >>> mask = torch.zeros(6, 32, 32, dtype=torch.bool)
        >>> mask[:, 10:16, 10:16] = True
        >>> out = inpaint_video(video, mask, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.equal(out[..., :10, :], video[..., :10, :]))
        True
    """
    hole, patch, k, window, overlap = _check_inputs(video, mask, patch_size, num_neighbors, window, overlap, out)
    num_iters, search_iters, scales, generator, backend = _check_options(
        _FN, num_iters, search_iters, scales, tolerance, generator, progress, backend, video.device
    )

    T = video.shape[2]
    starts = [0]
    while starts[-1] + window < T:
        starts.append(starts[-1] + window - overlap)
    # Windows whose hole is empty (after the overlap is filled) are skipped; each holds at most
    # ``num_iters`` rounds per scale, and the count below is an upper bound.
    spans = [(s, min(s + window, T)) for s in starts]
    rounds = [num_iters * _levels_upper_bound(video.shape[-2:], patch, scales) + 1 for _ in spans]
    total, done = sum(rounds), 0
    if out is None:
        out = video.detach().clone()
    elif out is not video:
        out.copy_(video.detach())
    filled = hole.clone()
    for (s, e), n in zip(spans, rounds):
        part_hole = filled[:, :, s:e]
        if bool(part_hole.any()) and bool((~part_hole).any()):

            def tick(d, _t, base=done):
                if progress is not None:
                    progress(base + d, total)

            out[:, :, s:e] = _inpaint_window(out[:, :, s:e], part_hole, patch, k, num_iters, search_iters, scales,
                                             tolerance, generator, backend, tick, n)  # fmt: skip
            filled[:, :, s:e] = False
        done += n
        if progress is not None:
            progress(done, total)
    # Each window returned its known voxels from ``out``, a copy of the video's: no second
    # copy of the whole video to put them back.
    return out


def _levels_upper_bound(size, patch, scales) -> int:
    if scales is not None:
        return scales
    h, w = size
    n = 1
    while min((h + 1) // 2, (w + 1) // 2) >= 2 * max(patch[1:]):
        h, w, n = (h + 1) // 2, (w + 1) // 2, n + 1
    return n


def _inpaint_window(video, hole, patch, k, num_iters, search_iters, scales, tolerance, generator, backend, tick, total):
    """One window of frames ``(1, C, T, H, W)`` with its hole: the method of the module docstring."""
    dtype = torch.float64 if video.dtype == torch.float64 else torch.float32
    C = video.shape[1]
    img = video.to(dtype)
    state = torch.cat([img, _TEXTURE_WEIGHT * _volume(_texture_features(_frames(img), _frames(hole)))], 1)
    S = state.shape[1]

    levels: list[Any] = [(state, hole)]
    del state
    while scales is None or len(levels) < scales:
        top, top_hole = levels[-1]
        size = ((top.shape[-2] + 1) // 2, (top.shape[-1] + 1) // 2)
        if scales is None and min(size) < 2 * max(patch[1:]):
            break
        if size == tuple(top.shape[-2:]):
            break
        down, down_hole = _downsample(top, top_hole, size)
        if not bool(down_hole.any()) or int(full_patch_mask(down_hole, patch).sum()) < max(k, 16):
            break
        levels.append((down, down_hole))

    done = 0
    cur: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    where: torch.Tensor | None = None
    field = None
    radii = [p // 2 for p in patch]
    for level in range(len(levels) - 1, -1, -1):
        known, lhole = levels[level]
        key_mask = full_patch_mask(lhole, patch)
        near = _dilate(lhole, radii)[0, 0]  # query positions whose patch meets the hole
        coarse_where = where
        where = near.flatten().nonzero().squeeze(1)
        depth = _hole_depth(lhole, dtype)
        search: dict[str, Any] = dict(
            patch_size=tuple(patch), num_neighbors=k, key_mask=key_mask, generator=generator, backend=backend, positions=where
        )
        # The state lives in the feature map's first channels (one copy of it); this level's
        # known state is not needed once the hole is seeded.
        if cur is None:
            feat = _feature_map(_volume(_smooth_fill(_frames(known), _frames(lhole))), C)
            cur = feat[:, :S]
        else:
            coarse = tuple(cur.shape[2:])
            up = F.interpolate(_frames(cur), size=known.shape[-2:], mode="bilinear", align_corners=False)
            feat = _feature_map(known, C, lhole, up.transpose(0, 1)[None])
            cur = feat[:, :S]
            del up
            # the coarser level set both
            indices, found = _upsample_indices(
                cast(torch.Tensor, indices), coarse, cast(torch.Tensor, coarse_where), tuple(cur.shape[2:]), where
            )
            allowed = key_mask.flatten()[indices] & found
            if not bool(allowed.all()):
                fresh = patchmatch(feat, feat, num_iters=0, **search)
                indices = torch.where(allowed, indices, fresh.indices)
            costs = patch_costs(feat, feat, indices, patch_size=tuple(patch), positions=where)
            _vote(cur, feat, indices, costs, lhole, where, depth, patch, backend)
        levels[level] = None
        del known
        warm: Any = indices
        for _ in range(num_iters):
            _refresh(feat, S, C)
            field = patchmatch(feat, feat, num_iters=search_iters, init=warm, **search)
            warm = field
            delta = _vote(cur, feat, field.indices, field.costs, lhole, where, depth, patch, backend)
            change = float(delta[:, :C].abs().sum() / max(delta.shape[-1] * C, 1))
            done += 1
            tick(done, total)
            if change < tolerance:
                break
        indices = cast(KNNField, field).indices  # num_iters >= 1 set it
        done = num_iters * (len(levels) - level)

    cur = cast(torch.Tensor, cur)  # the coarsest level set it
    _refresh(feat, S, C)
    field = patchmatch(feat, feat, num_iters=search_iters, init=field, **search)
    _vote(cur, feat, field.indices, field.costs, hole, where, depth, patch, backend, "center", 0.1)
    return torch.where(hole, cur[:, :C].to(video.dtype), video)
