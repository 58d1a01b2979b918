"""Patch-based inpainting with PSAL as the engine (Wexler et al. 2007; Newson et al. 2014).

The hole is filled coarse to fine, on a pyramid whose coarsest level is a few patches wide. The
coarsest hole starts from a smooth fill; at every scale two steps then alternate until the hole
stops changing:

1. search: :func:`psal.patchmatch` of the image against itself, with ``key_mask`` allowing only
   positions whose whole patch is known, warm-started from the previous field;
2. reconstruction: :func:`psal.attend` with ``aggregation="patch"``: each hole pixel takes the
   weighted votes of all the patches that cover it.

Between scales the field is carried up and votes once with the finer level's own pixels (a sharp
start, where upsampling the coarse image would give a blurred one). The last step copies, for
every hole pixel, the centre of its best match, with no averaging, so no blur. Only hole pixels
are ever written: the known pixels of the result are the input's, bit for bit.

Choices, each measured on bundled images with generated holes (PSNR in the hole and the
hole's gradient energy against the ground truth's):

- patches are compared on the colours, their gradients (as PatchMatch's inpainting does) and
  Newson's texture features (local mean of the absolute gradients), so that a flat patch is not a
  cheap match for a textured one;
- 5 x 5 patches: against 7 x 7, on the held-out cases of ``python -m psal.bench apps --held-out``
  (33 crops of 11 photographs at their own resolution, three hole families) hole PSNR 22.04 ->
  22.27 dB, patch-SWD 1.98 -> 1.86, each family better, and 26% less time; on whole pictures
  shrunk to 256 x 256 (``--tasks inpaint-resized``), where structures are smaller than in
  photographs, 17.96 dB with 7 x 7 patches against 17.72 with 5 x 5;
- ``k = 1`` match per patch: more matches average different places and blur the fill;
- weights nearly uniform among good matches (temperature ten times the 75th percentile of the
  patch costs, Newson's statistic), times Wexler's confidence ``exp(-3 d)``, ``d`` the mean depth
  of a patch's pixels into the hole, so that patches anchored on the known border lead (the
  factor 3 against 1: hole PSNR 17.94 against 17.87 dB over 8 images, and the least sharp fill
  0.73 of the truth's gradient against 0.66).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from .. import _checks as checks
from .._dispatch import BACKENDS
from ..functional import attend, patch_costs, patchmatch
from ..types import KNNField

__all__ = ["inpaint"]

_FN = "psal.apps.inpaint"

# Weights of the features that patches are compared on, relative to the colours in [0, 1].
_GRADIENT_WEIGHT = 1.0
_TEXTURE_WEIGHT = 3.0
_TEXTURE_WINDOW = 5
# Temperature: this multiple of this percentile of the best patch costs over the hole.
_TEMPERATURE_PERCENTILE = 0.75
_TEMPERATURE_SCALE = 10.0
# Wexler's confidence: a patch's votes are weighted by exp(-_CONFIDENCE * mean depth in the hole).
_CONFIDENCE = 3.0
# Sparse queries when the pixels whose patch meets the hole are at most this share of the picture
# (measured on the 256x256 suite, where they are 20-35%: 18.4 s sparse against 26.8 s dense).
_SPARSE_BELOW = 0.5


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# ----------------------------------------------------------------------------------------------
# Masks, features and pyramids. Images are (1, C, H, W), holes (1, 1, H, W) bool.


def _dilate(hole: torch.Tensor, radius: int) -> torch.Tensor:
    """Hole pixels grown by ``radius`` (Chebyshev). Off-map pixels count as known, which is what
    replicate padding gives: a border pixel's copies are known exactly when it is."""
    if radius == 0:
        return hole
    return F.max_pool2d(hole.float(), 2 * radius + 1, stride=1, padding=radius) > 0


def full_patch_mask(hole: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``Tensor[1, H, W]`` bool: the positions whose whole ``patch_size`` patch is known."""
    return ~_dilate(hole, patch_size // 2)[:, 0]


def _hole_depth(hole: torch.Tensor, dtype) -> torch.Tensor:
    """Chebyshev distance of each hole pixel to the known region (off-map pixels are not known),
    0 on known pixels: ``Tensor[1, 1, H, W]``. Exact, in ``O(H W log(H + W))``: the distance down
    each column to its nearest known pixel ``g``, then per pixel the smallest ``k`` whose row
    window ``[j - k, j + k]`` holds a ``g <= k``, found by a binary search over ``k`` on a sparse
    table of window minima."""
    known = ~hole[0, 0]
    H, W = known.shape
    device = known.device
    big = H + W  # more than any distance
    rows = torch.arange(H, device=device)[:, None].expand(H, W)
    above = torch.where(known, rows, -big).cummax(0).values
    below = torch.where(known, rows, 2 * big).flip(0).cummin(0).values.flip(0)
    g = torch.minimum(rows - above, below - rows).clamp(max=big)
    tables = [g]  # tables[l][i, j]: the minimum of g[i, j : j + 2^l] (clipped to the row)
    while (1 << len(tables)) <= W:
        step = 1 << (len(tables) - 1)
        prev = tables[-1]
        tables.append(torch.minimum(prev, F.pad(prev[:, step:], (0, step), value=big)))
    table = torch.stack(tables).flatten()
    cols = torch.arange(W, device=device)[None, :].expand(H, W)
    base = rows * W

    def window_min(k):
        lo, hi = (cols - k).clamp(min=0), (cols + k).clamp(max=W - 1)
        level = torch.frexp((hi - lo + 1).double()).exponent.long() - 1  # floor(log2(length)), exact
        at = level * (H * W) + base
        return torch.minimum(table[at + lo], table[at + hi - (1 << level) + 1])

    lo, hi = torch.zeros_like(g), torch.full_like(g, big)
    for _ in range(int(big).bit_length() + 1):  # the smallest k with window_min(k) <= k
        mid = (lo + hi) // 2
        ok = window_min(mid) <= mid
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid + 1)
    return lo.to(dtype)[None, None]


def _masked_downsample(image: torch.Tensor, hole: torch.Tensor, size):
    """Area downsampling that reads known pixels only. A coarse pixel is known as soon as one
    fine pixel under it is (PatchMatch's inpainting does the same), so the hole shrinks quickly
    down the pyramid and the coarsest one is small."""
    known = (~hole).to(image.dtype)
    weight = F.interpolate(known, size=size, mode="area")
    total = F.interpolate(image * known, size=size, mode="area")
    coarse_hole = weight <= 0
    return torch.where(coarse_hole, torch.zeros_like(total), total / weight.clamp_min(1e-12)), coarse_hole


def _smooth_fill(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Fill the hole by push-pull: average the known pixels down a pyramid until none is missing,
    then bring the averages back up, each level filling only its own hole."""
    levels = [(image, hole)]
    while bool(levels[-1][1].any()):
        img, h = levels[-1]
        size = (max(1, (img.shape[-2] + 1) // 2), max(1, (img.shape[-1] + 1) // 2))
        levels.append(_masked_downsample(img, h, size))
    filled = levels[-1][0]
    for img, h in reversed(levels[:-1]):
        up = F.interpolate(filled, size=img.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(h, up, img)
    return filled


def _texture_features(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Newson's texture features, ``Tensor[1, 2, H, W]``: ``|dI/dx|`` and ``|dI/dy|`` of the
    luminance averaged over a small box, from known pixels only (a normalised convolution), so
    the known region's features never read the hole."""
    lum = image.mean(1, keepdim=True)
    known = (~hole).to(image.dtype)
    gx = (lum[..., :, 1:] - lum[..., :, :-1]).abs()
    gy = (lum[..., 1:, :] - lum[..., :-1, :]).abs()
    wx = known[..., :, 1:] * known[..., :, :-1]
    wy = known[..., 1:, :] * known[..., :-1, :]
    num = torch.cat([F.pad(gx * wx, (0, 1)), F.pad(gy * wy, (0, 0, 0, 1))], 1)
    den = torch.cat([F.pad(wx, (0, 1)), F.pad(wy, (0, 0, 0, 1))], 1)
    pad = _TEXTURE_WINDOW // 2
    num = F.avg_pool2d(F.pad(num, (pad,) * 4, mode="replicate"), _TEXTURE_WINDOW, stride=1)
    den = F.avg_pool2d(F.pad(den, (pad,) * 4, mode="replicate"), _TEXTURE_WINDOW, stride=1)
    return num / den.clamp_min(1e-6)


def _features(state: torch.Tensor, channels: int) -> torch.Tensor:
    """What patches are compared on: the state (colours and texture features) and the colours'
    central differences, recomputed so that they always describe the current fill."""
    x = state[:, :channels]
    gx = F.pad(x[..., :, 2:] - x[..., :, :-2], (1, 1, 0, 0), mode="replicate")
    gy = F.pad(x[..., 2:, :] - x[..., :-2, :], (0, 0, 1, 1), mode="replicate")
    return torch.cat([state, (0.5 * _GRADIENT_WEIGHT) * gx, (0.5 * _GRADIENT_WEIGHT) * gy], 1)


# A feature reads pixels at most this far away (central differences, replicated at the border).
_FEATURE_REACH = 2


def _box(hole: torch.Tensor, grow: int) -> tuple[slice, slice]:
    """Rows and columns of the bounding box of the hole ``(1, 1, H, W)`` grown by ``grow``, clipped."""
    H, W = hole.shape[-2:]
    rows = hole[0, 0].any(1).nonzero()
    cols = hole[0, 0].any(0).nonzero()
    r0, r1 = max(int(rows[0]) - grow, 0), min(int(rows[-1]) + 1 + grow, H)
    c0, c1 = max(int(cols[0]) - grow, 0), min(int(cols[-1]) + 1 + grow, W)
    return slice(r0, r1), slice(c0, c1)


def _grow(box: tuple[slice, slice], by: int, H: int, W: int) -> tuple[slice, slice]:
    rows, cols = box
    return slice(max(rows.start - by, 0), min(rows.stop + by, H)), slice(max(cols.start - by, 0), min(cols.stop + by, W))


def _feature_map(state: torch.Tensor, channels: int) -> torch.Tensor:
    """One level's map of what patches are compared on: :func:`_features` and one more channel,
    zero, that :func:`_vote` fills with Wexler's confidence inside the hole for its reconstruction."""
    feat = _features(state, channels)
    return torch.cat([feat, feat.new_zeros(1, 1, *feat.shape[-2:])], 1)


def _refresh(feat: torch.Tensor, state: torch.Tensor, channels: int, box: tuple[slice, slice]) -> None:
    """Recompute the features of ``feat`` over ``box`` (which holds every pixel whose features
    can have changed: the hole grown by :data:`_FEATURE_REACH`), in place, from ``state``. Computed
    on the box grown by one pixel, whose edges are the only ones that replicate padding gets wrong
    (the map's own edges excepted, where it is right): the same values as on the whole map."""
    H, W = state.shape[-2:]
    rows, cols = _grow(box, 1, H, W)
    part = _features(state[..., rows, cols], channels)
    inner = (slice(box[0].start - rows.start, box[0].stop - rows.start), slice(box[1].start - cols.start, box[1].stop - cols.start))
    feat[:, :-1, box[0], box[1]] = part[..., inner[0], inner[1]]


def _upsample_indices(indices: torch.Tensor, coarse: tuple, coarse_where, fine: tuple, fine_where):
    """Coarse matches carried to the fine grid: fine pixel ``x`` in coarse cell ``c`` whose match
    is ``m`` takes ``x + (m - c) * scale``, clamped to the map (Newson's field upsampling).

    Sparse fields: coarse matches ``(1, heads, k, Mc)`` of the listed coarse pixels
    ``coarse_where``, for the listed fine pixels ``fine_where`` (``None``: every pixel, fields
    ``(1, heads, k, h, w)``). Returns the fine matches and which fine pixels found their coarse
    cell listed (the others hold an arbitrary position, to be replaced)."""
    hc, wc = coarse
    hf, wf = fine
    device = indices.device
    if coarse_where is None:
        coarse_where, indices = torch.arange(hc * wc, device=device), indices.flatten(3)
    dense = fine_where is None
    if dense:
        fine_where = torch.arange(hf * wf, device=device)
    i, j = fine_where // wf, fine_where % wf
    ci = torch.div(i * hc, hf, rounding_mode="floor").clamp_(max=hc - 1)
    cj = torch.div(j * wc, wf, rounding_mode="floor").clamp_(max=wc - 1)
    cell = ci * wc + cj
    slot = torch.searchsorted(coarse_where, cell).clamp_(max=coarse_where.numel() - 1)
    found = coarse_where[slot] == cell
    up = indices[..., slot]  # (1, heads, k, Mf)
    row = i + torch.div((up // wc - ci) * hf, hc, rounding_mode="floor")
    col = j + torch.div((up % wc - cj) * wf, wc, rounding_mode="floor")
    out = row.clamp_(0, hf - 1) * wf + col.clamp_(0, wf - 1)
    if dense:
        return out.view(*out.shape[:3], hf, wf), found.view(hf, wf)
    return out, found


def _vote(state, feat, indices, costs, hole, near, where, depth, patch_size, backend, aggregation="patch", scale=_TEMPERATURE_SCALE):
    """One reconstruction of the hole of ``state`` from the matches ``indices`` (their ``costs``
    set the temperature): rewrites the hole pixels of ``state`` in place, and returns their change
    ``(1, channels, holes)``, for the stopping test.

    ``feat``: the level's feature map (:func:`_feature_map`), query and key at once; ``near``: the
    query pixels whose patch meets the hole, the only ones whose votes reach it; ``where``: their
    flat indices when the search was sparse (indices and costs are then theirs only, and so is the
    vote), else ``None``; ``depth``: :func:`_hole_depth` over a box ``(rows, cols)`` that holds the
    hole.
    """
    best = costs.amin(2)[:, 0]
    best = (best if where is not None else torch.where(near, best, torch.nan)).flatten()
    temp = torch.nanquantile(best.double(), _TEMPERATURE_PERCENTILE).to(state.dtype)
    temp = (temp * scale).clamp_min(1e-6 * patch_size * patch_size)
    # Wexler's confidence through the last channel of the features, zero but in the hole, so zero
    # in every allowed key patch: it adds T * c * depth / p^2, summed over the patch, to each of the
    # patch's costs, so its weights take exp(-c * its mean depth) while the ranking of its matches
    # does not change.
    depth, (rows, cols) = depth
    feat[:, -1:, rows, cols] = (temp * _CONFIDENCE * depth / (patch_size * patch_size)).sqrt()
    out = attend(feat, feat, state, indices, patch_size=patch_size, temperature=temp, aggregation=aggregation,
                 backend=backend, positions=where)  # fmt: skip
    feat[:, -1:, rows, cols] = 0
    if where is None:
        inside = hole.flatten().nonzero().squeeze(1)
        return _write_hole(state, out.flatten(2)[:, :, inside], inside)
    fill = hole.flatten()[where]
    return _write_hole(state, out[:, :, fill], where[fill])


def _write_hole(state: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Write the votes ``after (1, channels, n)`` into ``state`` at the flat positions ``target
    (n,)`` in place; returns their change, for the stopping test (pictures and videos alike)."""
    flat = state.view(*state.shape[:2], -1)
    delta = after - flat[:, :, target]
    flat[:, :, target] = after
    return delta


# ----------------------------------------------------------------------------------------------
# Validation.


def _check_inputs(image, mask, patch_size, num_neighbors):
    """Every argument check in one place; returns the hole ``(1, 1, H, W)``, ``p`` and ``k``."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{_FN}: image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"{_FN}: image must have shape (1, C, H, W), got {_shape(image)}")
    if not image.dtype.is_floating_point:
        raise TypeError(f"{_FN}: image must be floating point in [0, 1], got {image.dtype} with shape {_shape(image)}")
    _, C, H, W = image.shape
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"{_FN}: image must have at least one channel and one pixel, got shape {_shape(image)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_FN}: mask must be a bool torch.Tensor (True = hole), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{_FN}: mask must have dtype torch.bool (True = hole to fill), got {mask.dtype} with shape {_shape(mask)}")
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (H, W) or mask.numel() != H * W:
        raise ValueError(
            f"{_FN}: mask must have shape (1, 1, H, W), (1, H, W) or (H, W) with (H, W) = ({H}, {W}) "
            f"of image {_shape(image)}, got {_shape(mask)}"
        )
    if mask.device != image.device:
        raise ValueError(f"{_FN}: mask must be on the image's device {image.device}, got {mask.device}")
    patch_size = checks.check_patch_size(_FN, patch_size)
    k = checks.check_int(_FN, "num_neighbors", num_neighbors, 1)
    hole = mask.reshape(1, 1, H, W)
    holes = int(hole.sum())
    if holes == 0:
        raise ValueError(f"{_FN}: mask {_shape(mask)} is empty: no pixel is True (True marks the hole to fill)")
    if holes == H * W:
        raise ValueError(f"{_FN}: mask {_shape(mask)} covers the whole image: no known pixel to copy from")
    sources = int(full_patch_mask(hole, patch_size).sum())
    if sources < k:
        raise ValueError(
            f"{_FN}: mask {_shape(mask)} leaves {sources} fully known {patch_size}x{patch_size} patches in "
            f"image {_shape(image)}, fewer than num_neighbors={k}; use a smaller hole or patch_size"
        )
    return hole, patch_size, k


def _check_options(fn, num_iters, search_iters, scales, tolerance, generator, progress, backend, device):
    """The options the picture and the video inpainters share, checked as ``fn``; returns
    ``(num_iters, search_iters, scales, generator, backend)``."""
    num_iters = checks.check_int(fn, "num_iters", num_iters, 1)
    search_iters = checks.check_int(fn, "search_iters", search_iters, 0)
    if scales is not None:
        scales = checks.check_int(fn, "scales", scales, 1)
    if not checks.is_real_number(tolerance) or not tolerance >= 0:
        raise ValueError(f"{fn}: tolerance must be a number >= 0, got {tolerance!r}")
    generator = checks.check_generator(fn, generator)
    backend = checks.check_backend(fn, backend, BACKENDS, device)
    if progress is not None and not callable(progress):
        raise TypeError(f"{fn}: progress must be callable as progress(done, total) or None, got {type(progress).__name__}")
    return num_iters, search_iters, scales, generator, backend


# ----------------------------------------------------------------------------------------------
# The method.


def inpaint(
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int = 5,
    num_neighbors: int = 1,
    num_iters: int = 10,
    search_iters: int = 3,
    scales: int | None = None,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fill the hole of an image with patches of its known part, with PSAL as the engine.

    Coarse to fine; at each scale, PatchMatch (masked self-attention: keys only where their whole
    patch is known) alternates with ``"patch"`` aggregation over the hole until the hole stops
    changing. The module docstring gives the method and its choices. The device and dtype follow
    the image (float16/bfloat16 are computed in float32).

    Args:
        image: ``Tensor[1, C, H, W]`` floating point in ``[0, 1]`` (RGB, gray or any ``C``).
        mask: ``Tensor[1, 1, H, W]``, ``Tensor[1, H, W]`` or ``Tensor[H, W]`` bool, True on the
            hole to fill.
        patch_size: odd side of the square patches.
        num_neighbors: matches per patch (``k``); 1 gives the sharpest fill.
        num_iters: at most this many search + reconstruction rounds per scale.
        search_iters: PatchMatch iterations per round (each round warm-starts from the last).
        scales: pyramid levels; ``None``: halve until the next level would be narrower than two
            patches (fewer when the hole vanishes, or too few known patches remain).
        tolerance: a scale ends when the mean change of its hole pixels falls below this.
        generator: source of randomness; the same seed gives the same result.
        progress: called as ``progress(done, total)`` after each round; a scale that converges
            early skips its remaining rounds.
        backend: PSAL backend of the search and the aggregation (``"auto"``, ``"numba"``,
            ``"triton"`` or ``"torch"``).

    Returns:
        ``Tensor[1, C, H, W]`` on the image's device, in its dtype: the known pixels bitwise
        unchanged, the hole filled.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed: wrong
            dims or dtypes, a mask of another size or device, an empty mask, a mask that covers
            everything or leaves fewer than ``num_neighbors`` fully known patches.

    Example:
        >>> image = psal.images.load_bundled("brick", 128)
        >>> mask = torch.zeros(1, 1, 128, 128, dtype=torch.bool)
        >>> mask[..., 40:80, 50:90] = True
        >>> out = inpaint(image, mask, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.equal(out[..., :40, :], image[..., :40, :]))
        True
    """
    hole, patch_size, k = _check_inputs(image, mask, patch_size, num_neighbors)
    num_iters, search_iters, scales, generator, backend = _check_options(
        _FN, num_iters, search_iters, scales, tolerance, generator, progress, backend, image.device
    )

    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    C = image.shape[1]
    img = image.detach().to(dtype)
    # The state that is filled: colours and Newson's texture features (reconstructed with them).
    state = torch.cat([img, _TEXTURE_WEIGHT * _texture_features(img, hole)], 1)

    levels = [(state, hole)]
    while scales is None or len(levels) < scales:
        top, top_hole = levels[-1]
        size = ((top.shape[-2] + 1) // 2, (top.shape[-1] + 1) // 2)
        if scales is None and min(size) < 2 * patch_size:
            break
        if min(size) < 1 or size == tuple(top.shape[-2:]):
            break
        down, down_hole = _masked_downsample(top, top_hole, size)
        if not bool(down_hole.any()) or int(full_patch_mask(down_hole, patch_size).sum()) < max(k, 16):
            break
        levels.append((down, down_hole))

    total = num_iters * len(levels) + 1
    done = 0
    cur: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    where: torch.Tensor | None = None
    # Sparse queries unless the hole's neighbourhood is most of the picture: only the pixels whose
    # patch meets the hole are then searched and voted (the same votes reach the hole).
    sparse = float(_dilate(hole, patch_size // 2).float().mean()) <= _SPARSE_BELOW
    for level in range(len(levels) - 1, -1, -1):
        known, lhole = levels[level]
        key_mask = full_patch_mask(lhole, patch_size)
        near = _dilate(lhole, patch_size // 2)[:, 0]  # query positions whose patch meets the hole
        coarse_where = where
        where = near.flatten().nonzero().squeeze(1) if sparse else None
        box = _box(lhole, _FEATURE_REACH)
        hole_box = _box(lhole, 1)
        depth = (_hole_depth(lhole[..., hole_box[0], hole_box[1]], dtype), hole_box)
        search: dict[str, Any] = dict(
            patch_size=patch_size, num_neighbors=k, key_mask=key_mask, generator=generator, backend=backend, positions=where
        )

        if cur is None:
            cur = _smooth_fill(known, lhole)
            feat = _feature_map(cur, C)
        else:
            coarse = tuple(cur.shape[-2:])
            up = F.interpolate(cur, size=known.shape[-2:], mode="bilinear", align_corners=False)
            cur = torch.where(lhole, up, known)
            # The coarse matches vote with this level's own pixels: a sharp start. A match that
            # lands on a patch this level does not allow, or whose coarse cell was not searched,
            # is replaced by a random allowed one.
            feat = _feature_map(cur, C)
            # every level after the coarsest starts from the previous one's field
            indices, found = _upsample_indices(cast(torch.Tensor, indices), coarse, coarse_where, tuple(cur.shape[-2:]), where)
            allowed = key_mask.flatten(1)[0][indices] & found
            if not bool(allowed.all()):
                fresh = patchmatch(feat, feat, num_iters=0, **search)
                indices = torch.where(allowed, indices, fresh.indices)
            costs = patch_costs(feat, feat, indices, patch_size=patch_size, positions=where)
            _vote(cur, feat, indices, costs, lhole, near, where, depth, patch_size, backend)
        warm: KNNField | torch.Tensor | None = indices  # the coarser scale's matches (bare indices), or None
        for _ in range(num_iters):
            _refresh(feat, cur, C, box)
            field = patchmatch(feat, feat, num_iters=search_iters, init=warm, **search)
            warm = field
            delta = _vote(cur, feat, field.indices, field.costs, lhole, near, where, depth, patch_size, backend)
            change = float(delta[:, :C].abs().sum() / max(delta.shape[-1] * C, 1))
            done += 1
            if progress is not None:
                progress(done, total)
            if change < tolerance:
                break
        indices = field.indices
        done = num_iters * (len(levels) - level)

    # The final reconstruction: each hole pixel takes the centre of its best match, not the mean
    # of all votes, which would blur what the matches agree on only up to a pixel.
    cur = cast(torch.Tensor, cur)  # the coarsest level set it
    _refresh(feat, cur, C, box)
    field = patchmatch(feat, feat, num_iters=search_iters, init=field, **search)
    _vote(cur, feat, field.indices, field.costs, hole, near, where, depth, patch_size, backend, "center", 0.1)
    if progress is not None:
        progress(total, total)
    return torch.where(hole, cur[:, :C].to(image.dtype), image)
