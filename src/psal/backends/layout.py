"""Layout helpers that every backend shares: heads folded into the batch, patches as columns,
channel-last copies, replicate padding and its adjoint, the allowed-key table, vote counts, and
the neighbour tables and patch pixels of sparse query positions.

Pure PyTorch, no kernels and no dispatch: the backends (``torch``, ``numba``, ``triton``, ``dense``)
import from here, never from each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * heads, C // heads, H, W)``; head ``h`` owns a contiguous channel block."""
    B, C, H, W = x.shape
    return x.reshape(B * num_heads, C // num_heads, H, W)


def fold_mask(key_mask, num_heads: int):
    """``(B, Hk, Wk)`` bool -> ``(B * heads, Hk * Wk)``, or ``None``."""
    if key_mask is None:
        return None
    return key_mask.flatten(1).repeat_interleave(num_heads, dim=0)


def unfold_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> every patch as a column, ``(N, C * p * p, H * W)``, replicate padded."""
    r = patch_size // 2
    return F.unfold(F.pad(x.to(compute_dtype(x.dtype)), (r, r, r, r), mode="replicate"), patch_size)


def channel_last(x: torch.Tensor, dtype: torch.dtype | None = None, pad: int = 0) -> torch.Tensor:
    """``(N, C, H, W)`` -> contiguous ``(N, H + 2 pad, W + 2 pad, C)`` in ``dtype`` (default: its
    own), replicate padded by ``pad``: one pixel's ``C`` values, and a patch row's, are contiguous."""
    x = x.detach() if dtype is None else x.detach().to(dtype)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return x.permute(0, 2, 3, 1).contiguous()


def channel_last_rows(x: torch.Tensor, dtype: torch.dtype, pad: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H + 2 pad, (W + 2 pad) * C)``: :func:`channel_last`, one flat row
    per image row, so that the ``p * C`` values of a patch row are one contiguous run."""
    N, C, H, W = x.shape
    return channel_last(x, dtype, pad).reshape(N, H + 2 * pad, (W + 2 * pad) * C)


def replicate_pad_adjoint(g: torch.Tensor, r: int) -> torch.Tensor:
    """The adjoint of ``F.pad(x, (r, r, r, r), mode="replicate")``: fold the border rows back in."""
    if r == 0:
        return g
    H, W = g.shape[-2] - 2 * r, g.shape[-1] - 2 * r
    rows = g[..., r : r + H, :].clone()
    rows[..., 0, :] += g[..., :r, :].sum(-2)
    rows[..., H - 1, :] += g[..., r + H :, :].sum(-2)
    out = rows[..., r : r + W].clone()
    out[..., 0] += rows[..., :r].sum(-1)
    out[..., W - 1] += rows[..., r + W :].sum(-1)
    return out


def same_map(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are one map: the same memory, shape, strides and dtype (a
    self-search's query and key), so that one padded copy or sketch can serve both."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def vote_counts(H: int, W: int, patch_size: int, device, dtype) -> torch.Tensor:
    """``(H, W)``: how many query patches cover each pixel (``p * p`` away from the borders)."""
    r = patch_size // 2

    def along(n):
        i = torch.arange(n, device=device)
        return (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(dtype)

    return along(H)[:, None] * along(W)[None, :]


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


def neighbour_table(positions: torch.Tensor, H: int, W: int, dy: int, dx: int) -> torch.Tensor:
    """For ascending flat positions ``(M,)`` of an ``H x W`` map (sparse queries): the list index
    of each one's neighbour at ``(+dy, +dx)``, or -1 where that pixel is off the map or not listed."""
    return offset_tables(positions, H, W, [(dy, dx)])[0]


def offset_tables(positions: torch.Tensor, H: int, W: int, offsets) -> torch.Tensor:
    """:func:`neighbour_table` for many offsets ``[(dy, dx), ...]`` at once: ``(len(offsets), M)``,
    one search for all of them."""
    d = torch.tensor(offsets, dtype=positions.dtype, device=positions.device).view(-1, 2, 1)
    i, j = positions // W, positions % W
    ti, tj = i[None] + d[:, 0], j[None] + d[:, 1]
    inside = (ti >= 0) & (ti < H) & (tj >= 0) & (tj < W)
    want = ti * W + tj
    at = torch.searchsorted(positions, want.flatten()).view(want.shape).clamp_(max=max(positions.numel() - 1, 0))
    found = inside & (positions[at] == want)
    return torch.where(found, at, torch.full_like(at, -1))


def patch_offsets(positions: torch.Tensor, H: int, W: int, patch_size: int) -> torch.Tensor:
    """``(M, p * p)``: the flat pixels of the patch around each of the flat ``positions (M,)``, in
    row-major patch order, with replicate padding (coordinates clamped to the map)."""
    r = patch_size // 2
    d = torch.arange(-r, r + 1, device=positions.device)
    i = (positions // W)[:, None, None] + d[None, :, None]
    j = (positions % W)[:, None, None] + d[None, None, :]
    return (i.clamp(0, H - 1) * W + j.clamp(0, W - 1)).flatten(1)
