"""Layout helpers that every backend shares: heads folded into the batch, patches as columns,
channel-last copies, replicate padding and its adjoint, the allowed-key table, vote counts, and
the neighbour tables and patch pixels of sparse query positions.

Pure PyTorch, no kernels and no dispatch: the backends (``torch``, ``numba``, ``triton``, ``dense``)
import from here, never from each other.

Maps and volumes: a 2-D map is ``(N, C, H, W)`` with a square patch ``p`` (an int); a space-time
volume is ``(N, C, T, H, W)`` with a patch ``(pt, ph, pw)`` (a tuple). :func:`as_volume` and
:func:`patch_dims` read both as volumes (a map is a volume of one frame, patch ``(1, p, p)``), so
that one implementation serves both; flat positions are ``t * H * W + row * W + col``, which for
one frame is the map's ``row * W + col``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_volume(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, 1, H, W)`` (a view); a volume ``(N, C, T, H, W)`` as it is."""
    return x.unsqueeze(2) if x.dim() == 4 else x


def patch_dims(patch_size) -> tuple[int, int, int]:
    """``(pt, ph, pw)``: an int ``p`` is a map's square patch ``(1, p, p)``; a triple as it is."""
    if isinstance(patch_size, int):
        return (1, patch_size, patch_size)
    pt, ph, pw = patch_size
    return (int(pt), int(ph), int(pw))


def replicate_pad(x: torch.Tensor, radii) -> torch.Tensor:
    """A volume ``(N, C, T, H, W)`` replicate padded by ``radii = (rt, rh, rw)``."""
    rt, rh, rw = radii
    if rt == 0:  # the 2-D kernel, which is what a map (one frame) needs
        N, C, T, H, W = x.shape
        y = F.pad(x.reshape(N, C * T, H, W), (rw, rw, rh, rh), mode="replicate") if rh or rw else x
        return y.reshape(N, C, T, H + 2 * rh, W + 2 * rw)
    return F.pad(x, (rw, rw, rh, rh, rt, rt), mode="replicate")


def fold_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B * heads, C // heads, *S)`` for a map or a volume; head ``h`` owns a
    contiguous channel block."""
    B, C = x.shape[:2]
    return x.reshape(B * num_heads, C // num_heads, *x.shape[2:])


def fold_mask(key_mask, num_heads: int):
    """``(B, Hk, Wk)`` or ``(B, Tk, Hk, Wk)`` bool -> ``(B * heads, Nk)``, or ``None``."""
    if key_mask is None:
        return None
    return key_mask.flatten(1).repeat_interleave(num_heads, dim=0)


def unfold_patches(x: torch.Tensor, patch_size) -> torch.Tensor:
    """Every patch as a column, replicate padded: a map ``(N, C, H, W)`` with an int ``p`` ->
    ``(N, C * p * p, H * W)``; a volume ``(N, C, T, H, W)`` with ``(pt, ph, pw)`` ->
    ``(N, C * pt * ph * pw, T * H * W)``, rows ordered channel, then patch offset (row-major)."""
    x = x.to(compute_dtype(x.dtype))
    if x.dim() == 4:
        r = patch_size // 2
        return F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), patch_size)
    pt, ph, pw = patch_dims(patch_size)
    N, C, T, H, W = x.shape
    xp = replicate_pad(x, (pt // 2, ph // 2, pw // 2))
    cols = [xp[:, :, a : a + T, b : b + H, c : c + W] for a in range(pt) for b in range(ph) for c in range(pw)]
    return torch.stack(cols, 2).reshape(N, C * pt * ph * pw, T * H * W)


def channel_last(x: torch.Tensor, dtype: torch.dtype | None = None, pad: int = 0, pad_t: int = 0) -> torch.Tensor:
    """``(N, C, H, W)`` -> contiguous ``(N, H + 2 pad, W + 2 pad, C)`` in ``dtype`` (default: its
    own), replicate padded by ``pad``: one pixel's ``C`` values, and a patch row's, are contiguous.
    A volume ``(N, C, T, H, W)`` -> ``(N, T + 2 pad_t, H + 2 pad, W + 2 pad, C)``, also padded by
    ``pad_t`` replicated frames."""
    volume = x.dim() == 5
    if not volume:
        x = x.unsqueeze(2)
    N, C, T, H, W = x.shape
    # One allocation, the border replicated in place: a padded copy and then its permuted copy
    # held twice the memory at their peak.
    out = torch.empty(N, T + 2 * pad_t, H + 2 * pad, W + 2 * pad, C, dtype=x.dtype if dtype is None else dtype, device=x.device)
    mid = out[:, pad_t : pad_t + T]
    mid[:, :, pad : pad + H, pad : pad + W] = x.detach().permute(0, 2, 3, 4, 1)
    if pad and H and W:
        mid[:, :, pad : pad + H, :pad] = mid[:, :, pad : pad + H, pad : pad + 1]
        mid[:, :, pad : pad + H, pad + W :] = mid[:, :, pad : pad + H, pad + W - 1 : pad + W]
        mid[:, :, :pad] = mid[:, :, pad : pad + 1]
        mid[:, :, pad + H :] = mid[:, :, pad + H - 1 : pad + H]
    if pad_t and T:
        out[:, :pad_t] = out[:, pad_t : pad_t + 1]
        out[:, pad_t + T :] = out[:, pad_t + T - 1 : pad_t + T]
    return out if volume else out[:, 0]


def channel_last_volume(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, C, T, H, W)`` -> ``(N, T * H, W * C)`` in ``dtype``: the frames stacked, one flat row
    per frame row, a pixel's ``C`` values and a patch row's contiguous, no padding. No copy when
    the volume is already ``torch.channels_last_3d`` memory in ``dtype``."""
    N, C, T, H, W = x.shape
    return x.detach().to(dtype).permute(0, 2, 3, 4, 1).contiguous().view(N, T * H, W * C)


def channel_last_rows(x: torch.Tensor, dtype: torch.dtype, pad: int, pad_t: int = 0) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H + 2 pad, (W + 2 pad) * C)``: :func:`channel_last`, one flat row
    per image row, so that the ``p * C`` values of a patch row are one contiguous run. A volume
    ``(N, C, T, H, W)`` -> ``(N, (T + 2 pad_t) * (H + 2 pad), (W + 2 pad) * C)``: its padded
    frames' rows stacked."""
    N, C, W = x.shape[0], x.shape[1], x.shape[-1]
    return channel_last(x, dtype, pad, pad_t).reshape(N, -1, (W + 2 * pad) * C)


def replicate_pad_adjoint(g: torch.Tensor, r) -> torch.Tensor:
    """The adjoint of replicate padding: fold the border slices back in. ``r`` an int pads the
    last two dimensions by ``r`` (a map); a tuple pads the last ``len(r)`` dimensions by its
    entries (``(rt, rh, rw)`` for a volume)."""
    radii = (r, r) if isinstance(r, int) else tuple(r)
    out = g
    for axis, rad in zip(range(-len(radii), 0), radii):
        if rad == 0:
            continue
        n = out.shape[axis] - 2 * rad
        inner = out.narrow(axis, rad, n).clone()
        inner.narrow(axis, 0, 1).add_(out.narrow(axis, 0, rad).sum(axis, keepdim=True))
        inner.narrow(axis, n - 1, 1).add_(out.narrow(axis, rad + n, rad).sum(axis, keepdim=True))
        out = inner
    return out


def same_map(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are one map: the same memory, shape, strides and dtype (a
    self-search's query and key), so that one padded copy or sketch can serve both."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def vote_counts(dims, patch, device, dtype) -> torch.Tensor:
    """``dims``: how many query patches of sizes ``patch`` (one per dimension of ``dims``, e.g.
    ``(H, W)`` and ``(p, p)``, or ``(T, H, W)`` and ``(pt, ph, pw)``) cover each pixel: the
    product of the patch sizes away from the borders."""
    out = torch.ones((), device=device, dtype=dtype)
    for n, p in zip(dims, patch):
        r = p // 2
        i = torch.arange(n, device=device)
        along = (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(dtype)
        out = out[..., None] * along
    return out


def allowed_table(mask, N: int, Nk: int):
    """For a mask ``(N, Nk)``: the allowed flat positions first, ascending, and how many there are
    (``(None, None)`` without a mask). Random initialisations draw ranks among the allowed
    positions and map them through this table, in every backend alike."""
    if mask is None:
        return None, None
    # A stable partition, allowed first, in linear time: each position's rank within its class.
    count = mask.sum(1, keepdim=True)
    rank = torch.where(mask, mask.cumsum(1) - 1, count + (~mask).cumsum(1) - 1)
    pos = torch.arange(Nk, device=mask.device).expand(N, Nk)
    order = torch.empty((N, Nk), dtype=torch.int64, device=mask.device).scatter_(1, rank, pos)
    return order, count[:, 0]


def neighbour_table(positions: torch.Tensor, dims, offset) -> torch.Tensor:
    """For ascending flat positions ``(M,)`` of a map ``dims = (H, W)`` or a volume ``(T, H, W)``
    (sparse queries): the list index of each one's neighbour at ``offset`` (``(dy, dx)``, or
    ``(dt, dy, dx)``), or -1 where that pixel is outside or not listed."""
    return offset_tables(positions, dims, [offset])[0]


def offset_tables(positions: torch.Tensor, dims, offsets, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """:func:`neighbour_table` for many offsets at once: ``(len(offsets), M)`` in ``dtype``.
    One offset at a time, so that the working memory is a few ``(M,)`` vectors, not a few
    ``(len(offsets), M)`` tables (at 75 offsets and half a million listed voxels those were 1.2 GB
    of the video inpainter's votes)."""
    n = len(dims)
    M = positions.numel()
    coords = []
    stride = 1
    strides = []
    for axis in reversed(range(n)):
        coords.append((positions // stride) % dims[axis])
        strides.append(stride)
        stride *= dims[axis]
    out = torch.empty(len(offsets), M, dtype=dtype, device=positions.device)
    for row, offset in enumerate(offsets):
        inside = torch.ones(M, dtype=torch.bool, device=positions.device)
        want = positions.clone()
        for k, axis in enumerate(reversed(range(n))):
            d = int(offset[axis])
            if d:
                moved = coords[k] + d
                inside &= (moved >= 0) & (moved < dims[axis])
                want += d * strides[k]
        at = torch.searchsorted(positions, want).clamp_(max=max(M - 1, 0))
        found = inside & (positions[at] == want)
        out[row] = torch.where(found, at, -1)
    return out


def patch_offsets(positions: torch.Tensor, H: int, W: int, patch_size: int) -> torch.Tensor:
    """``(M, p * p)``: the flat pixels of the patch around each of the flat ``positions (M,)``, in
    row-major patch order, with replicate padding (coordinates clamped to the map)."""
    r = patch_size // 2
    d = torch.arange(-r, r + 1, device=positions.device)
    i = (positions // W)[:, None, None] + d[None, :, None]
    j = (positions % W)[:, None, None] + d[None, None, :]
    return (i.clamp(0, H - 1) * W + j.clamp(0, W - 1)).flatten(1)


# ----------------------------------------------------------------------------------------------
# Volumes as tall maps, for the map kernels. A space-time patch (pt, p, p) of a volume
# (C, T, H, W) is the p x p patch of the tall map (C * pt, T * (H + 2r), W), r = p // 2: each
# pixel carries its pt frames (t - pt // 2 ... t + pt // 2, clamped: replicate padding in time) as
# channels, and the frames are stacked one under the other, each padded by r replicated rows, so
# that no patch of a frame reads another frame's rows. Its l2 or dot cost is the space-time
# patch's, term for term. Each transform is a gather; its adjoint (for gradients) the matching
# index_add.


def _time_index(T: int, pt: int, device) -> torch.Tensor:
    return (torch.arange(T, device=device)[:, None] + torch.arange(pt, device=device)[None, :] - pt // 2).clamp_(0, T - 1)


def stack_frames(x: torch.Tensor, pt: int) -> torch.Tensor:
    """``(N, C, T, H, W)`` -> ``(N, C * pt, T, H, W)``: channel ``c * pt + d`` of frame ``t`` is
    channel ``c`` of frame ``clamp(t + d - pt // 2)``."""
    if pt == 1:
        return x
    T = x.shape[2]
    stacked = x[:, :, _time_index(T, pt, x.device).flatten()].unflatten(2, (T, pt))  # (N, C, T, pt, H, W)
    return stacked.transpose(2, 3).flatten(1, 2)


def stack_frames_adjoint(g: torch.Tensor, pt: int) -> torch.Tensor:
    """The adjoint of :func:`stack_frames`: ``(N, C * pt, T, H, W)`` -> ``(N, C, T, H, W)``; by
    shifted slices (an ``index_add_`` along the frames was 10x slower on CPU)."""
    if pt == 1:
        return g
    N, Cpt, T = g.shape[:3]
    parts = g.unflatten(1, (Cpt // pt, pt))  # (N, C, pt, T, H, W)
    out = parts[:, :, pt // 2].clone()
    for d in range(pt):
        shift = d - pt // 2  # frame t' of part d was read from frame clamp(t' + shift)
        if shift == 0:
            continue
        src = parts[:, :, d]
        k = max(T - abs(shift), 0)  # frames whose source is not clamped
        if shift > 0:
            out[:, :, shift : shift + k] += src[:, :, :k]
            out[:, :, T - 1] += src[:, :, k:].sum(2)
        else:
            out[:, :, :k] += src[:, :, T - k :]
            out[:, :, 0] += src[:, :, : T - k].sum(2)
    return out


def _row_index(H: int, r: int, device) -> torch.Tensor:
    return torch.arange(-r, H + r, device=device).clamp_(0, H - 1)


def tall(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(N, C, T, H, W)`` -> ``(N, C, T * (H + 2r), W)``, every frame padded by ``r`` replicated rows."""
    N, C, T, H, W = x.shape
    return x[:, :, :, _row_index(H, r, x.device)].reshape(N, C, T * (H + 2 * r), W)


def tall_adjoint(g: torch.Tensor, T: int, r: int) -> torch.Tensor:
    """The adjoint of :func:`tall`: ``(N, C, T * (H + 2r), W)`` -> ``(N, C, T, H, W)``, the
    padding rows added to the frame rows they replicate."""
    N, C, rows, W = g.shape
    H = rows // T - 2 * r
    frames = g.view(N, C, T, H + 2 * r, W)
    out = frames[:, :, :, r : r + H].clone()
    if r:
        out[:, :, :, 0] += frames[:, :, :, :r].sum(3)
        out[:, :, :, H - 1] += frames[:, :, :, r + H :].sum(3)
    return out


def untall(x: torch.Tensor, T: int, r: int) -> torch.Tensor:
    """The frames of a tall map without their padding rows: ``(N, C, T, H, W)``."""
    N, C, rows, W = x.shape
    return x.view(N, C, T, rows // T, W)[:, :, :, r : rows // T - r]


def tall_stacked(x: torch.Tensor, pt: int, r: int) -> torch.Tensor:
    """``tall(stack_frames(x, pt), r)``, contiguous, written frame by frame into one allocation
    (no intermediate copy of the stacked volume)."""
    N, C, T, H, W = x.shape
    frames = _time_index(T, pt, x.device).T.tolist()  # [d][t]: the source frame
    rows = _row_index(H, r, x.device)
    out = x.new_empty(N, C, pt, T, H + 2 * r, W)
    for d in range(pt):
        for t in range(T):
            out[:, :, d, t] = x[:, :, frames[d][t]].index_select(2, rows)
    return out.view(N, C * pt, T * (H + 2 * r), W)


def to_tall(i: torch.Tensor, H: int, W: int, r: int) -> torch.Tensor:
    """Flat volume positions ``t * H * W + row * W + col`` -> the tall map's flat positions."""
    t, rest = i // (H * W), i % (H * W)
    return (t * (H + 2 * r) + rest // W + r) * W + rest % W


def from_tall(j: torch.Tensor, H: int, W: int, r: int) -> torch.Tensor:
    """The inverse of :func:`to_tall` on the positions of frame rows."""
    rows, col = j // W, j % W
    t, row = rows // (H + 2 * r), rows % (H + 2 * r) - r
    return (t * H + row) * W + col
