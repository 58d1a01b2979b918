"""The operators, registered with ``torch.library`` so that ``torch.compile`` sees them whole.

Three custom ops on folded tensors (heads in the batch), each with a fake kernel for tracing:

- ``psal::patchmatch``: the k-NN search; no gradient (its outputs are integer indices and
  detached costs).
- ``psal::attend``: attention over a field; autograd is registered and calls
- ``psal::attend_backward``: the gradients, recomputed from the saved indices.

Each op picks its backend inside (``"auto"``: numba on CPU, Triton on CUDA, else pure PyTorch), so that a
compiled graph holds one opaque call per op and no Python dispatch. Inputs are trusted:
``psal.functional`` validates them. float16/bfloat16 are computed in float32 and returned in the
input dtype.

Maps and volumes: tensors are maps ``(N, C, H, W)`` with ``patch_size = [p]`` or space-time
volumes ``(N, C, T, H, W)`` with ``patch_size = [pt, ph, pw]``; fields follow the query's
spatial shape. A volume that is a map in disguise (one query and one key frame, ``pt = 1``,
``ph = pw``) runs as that map, on every backend; the others run where a backend has volume
kernels (``_dispatch.VOLUME_OPS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import choose, positions
from .backends.layout import compute_dtype


def _contiguous(*tensors):
    """The tensors as the backends take them: contiguous, except volumes laid out channel-last
    (``torch.channels_last_3d``, or a slice of channels of such a volume), which are passed as
    they are: numba's space-time search reads a ``channels_last_3d`` float32 volume in place, with
    no copy, and the pure-PyTorch votes read either through strided views; the other backends
    copy them into their own layouts."""
    return [None if t is None else t if _channel_last_volume(t) else t.contiguous() for t in tensors]


def _channel_last_volume(t: Tensor) -> bool:
    """A 5-D tensor whose channels are its innermost dimension and whose frames, rows and
    columns are dense around them: ``(N, C, T, H, W)`` with strides ``(.., 1, H*W*P, W*P, P)``
    for some pixel stride ``P >= C`` (``P = C``: ``channels_last_3d``)."""
    if t.dim() != 5 or t.is_contiguous() or t.stride(1) != 1:
        return False
    C, (_, _, T, H, W), (_, _, sT, sH, sW) = t.shape[1], t.shape, t.stride()
    return sW >= C and (H == 1 or sH == W * sW) and (T == 1 or sT == H * W * sW)


def _as_map(query, key, patch_size):
    """Whether a call is a map's: 4-D, or 5-D with one frame on both sides, ``pt = 1`` and a
    square patch (which is exactly that map's problem, flat positions included)."""
    if query.dim() == 4:
        return True
    pt, ph, pw = patch_size
    return query.shape[2] == 1 and key.shape[2] == 1 and pt == 1 and ph == pw


def _backend_patch(query, key, patch_size):
    """The backends' patch argument: an int for a map, a ``(pt, ph, pw)`` tuple for a volume."""
    return patch_size[-1] if _as_map(query, key, patch_size) else tuple(patch_size)


def _map(t):
    """A tensor of a map-in-disguise call with its frame axis (2) dropped."""
    return None if t is None or t.dim() != 5 else t[:, :, 0]


def _problem_size(query, key, patch_size, num_neighbors, searched=None, channels=1):
    """:func:`_dispatch.positions` of a map or a volume (frames count as rows)."""
    pt, ph, pw = patch_size if len(patch_size) == 3 else (1, patch_size[0], patch_size[0])
    H = query.shape[-2] * (query.shape[2] if query.dim() == 5 else 1)
    Hk = key.shape[-2] * (key.shape[2] if key.dim() == 5 else 1)
    rows = ph + 2 * (pt // 2)  # frames padded too: a bound, not exact
    return positions(num_neighbors, H, query.shape[-1], Hk, key.shape[-1], max(rows, pw), searched, channels=channels)


@torch.library.custom_op("psal::patchmatch", mutates_args=())
def patchmatch(
    query: Tensor,
    key: Tensor,
    key_mask: Tensor | None,
    num_neighbors: int,
    patch_size: list[int],
    num_iters: int,
    similarity: str,
    init: Tensor | None,
    seed: Tensor,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Folded search: query ``(N, C, *S)``, key ``(N, C, *Sk)`` (maps or volumes), key_mask
    ``(N, Nk)``, init ``(N, k0, *S)``, seed a one-element int64 tensor -> indices and costs
    ``(N, k, *S)``. With ``query_positions (M,)`` (sparse queries), init and the result are
    ``(N, k, M)``."""
    size = _field_size(query, num_neighbors, query_positions)
    if 0 in size:
        return query.new_empty(size, dtype=torch.int64), query.new_empty(size, dtype=torch.float32)
    L = query[0, 0].numel() if query_positions is None else query_positions.numel()
    volume = not _as_map(query, key, patch_size)
    count = _problem_size(query, key, patch_size, num_neighbors, L)
    shape = tuple(patch_size) if volume else False
    impl = choose("psal.patchmatch", "search", backend, query.device, count, sparse=query_positions is not None, volume=shape)
    patch = _backend_patch(query, key, patch_size)
    if not volume and query.dim() == 5:
        query, key = _map(query), _map(key)
        init = init if init is None or query_positions is not None else _map(init)
    query, key, key_mask, init = _contiguous(query, key, key_mask, init)
    opts = {} if query_positions is None else {"positions": query_positions.contiguous()}
    idx, cost = impl.patchmatch(query, key, key_mask, num_neighbors, patch, num_iters, similarity, init, int(seed.reshape(-1)[0]), **opts)
    return idx.reshape(size).contiguous(), cost.reshape(size).contiguous()


def _field_size(query, k: int, query_positions) -> tuple:
    return (query.shape[0], k, *query.shape[2:]) if query_positions is None else (query.shape[0], k, query_positions.shape[0])


@patchmatch.register_fake
def _(query, key, key_mask, num_neighbors, patch_size, num_iters, similarity, init, seed, backend, query_positions=None):
    size = _field_size(query, num_neighbors, query_positions)
    return query.new_empty(size, dtype=torch.int64), query.new_empty(size, dtype=torch.float32)


@torch.library.custom_op("psal::attend", mutates_args=())
def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    indices: Tensor,
    temperature: Tensor,
    patch_size: list[int],
    aggregation: str,
    similarity: str,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Folded attention: -> ``out (N, Cv, *S)`` in the value's dtype and the per-pixel statistic
    ``(N, *S)`` in the compute dtype that the backward needs (see ``psal.backends.torch.attend``).
    With ``query_positions (M,)`` (sparse queries): indices ``(N, K, M)``, out ``(N, Cv, M)``,
    statistic ``(N, M)``."""
    if indices.numel() == 0:
        return _attend_empty(query, value, indices, query_positions)
    impl, opts = _attend_impl(query, key, value, indices, patch_size, backend, query_positions, aggregation)
    indices = _index_dtype(impl, indices)
    args, patch = _attend_args(query, key, value, indices, patch_size, query_positions)
    out, stat = impl.attend_forward(*_contiguous(*args, temperature), patch, aggregation, similarity, **opts)
    # Outputs must be contiguous: the fake kernels promise it, and compiled code checks strides.
    want, want_stat = _attend_empty(query, value, indices, query_positions)
    return out.to(value.dtype).reshape(want.shape).contiguous(), stat.to(compute_dtype(query.dtype)).reshape(want_stat.shape).contiguous()


def _attend_args(query, key, value, indices, patch_size, query_positions):
    """``(query, key, value, indices)`` as the backend takes them (a map-in-disguise volume as its
    map) and the backend's patch argument."""
    patch = _backend_patch(query, key, patch_size)
    if query.dim() == 5 and _as_map(query, key, patch_size):
        query, key, value = _map(query), _map(key), _map(value)
        indices = indices if query_positions is not None else _map(indices)
    return (query, key, value, indices), patch


def _index_dtype(impl, indices):
    """int32 indices for the backends that read them (``INDEX_DTYPES``), int64 for the others."""
    return indices if indices.dtype in getattr(impl, "INDEX_DTYPES", (torch.int64,)) else indices.long()


def _attend_impl(query, key, value, indices, patch_size, backend, query_positions, aggregation, op="attend"):
    """The attention backend module of ``op`` (``"attend"``, ``"attend_backward"``) for a
    non-empty problem, and the keyword arguments it takes (the sparse query positions, if any)."""
    K, L = indices.shape[1], indices[0, 0].numel()
    size = _problem_size(query, key, patch_size, K, L, channels=max(query.shape[1], value.shape[1]))
    volume = tuple(patch_size) if not _as_map(query, key, patch_size) else False
    impl = choose(
        "psal.attend", op, backend, query.device, size, sparse=query_positions is not None, volume=volume, aggregation=aggregation
    )
    return impl, ({} if query_positions is None else {"positions": query_positions.contiguous()})


def _attend_empty(query, value, indices, query_positions=None):
    N = indices.shape[0]
    spatial = tuple(query.shape[2:]) if query_positions is None else (query_positions.shape[0],)
    out = value.new_zeros(N, value.shape[1], *spatial)
    return out, value.new_zeros(N, *spatial, dtype=compute_dtype(query.dtype))


@attend.register_fake
def _(query, key, value, indices, temperature, patch_size, aggregation, similarity, backend, query_positions=None):
    return _attend_empty(query, value, indices, query_positions)


@torch.library.custom_op("psal::attend_backward", mutates_args=())
def attend_backward(
    grad: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    indices: Tensor,
    temperature: Tensor,
    out: Tensor,
    stat: Tensor,
    patch_size: list[int],
    aggregation: str,
    similarity: str,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``psal::attend`` for query, key, value and temperature, in their dtypes."""
    if indices.numel() == 0:
        return _backward_empty(query, key, value, temperature)
    impl, opts = _attend_impl(query, key, value, indices, patch_size, backend, query_positions, aggregation, "attend_backward")
    indices = _index_dtype(impl, indices)
    (q, k, v, idx), patch = _attend_args(query, key, value, indices, patch_size, query_positions)
    if q.dim() < query.dim() and query_positions is None:  # a map-in-disguise volume: its map's
        grad, out, stat = _map(grad), _map(out), stat[:, 0]
    gq, gk, gv, gt = impl.attend_backward(
        *_contiguous(grad, q, k, v, idx, temperature, out, stat),
        patch,
        aggregation,
        similarity,
        **opts,
    )
    gq, gk, gv = gq.reshape(query.shape), gk.reshape(key.shape), gv.reshape(value.shape)
    return (
        gq.to(query.dtype).contiguous(),
        gk.to(key.dtype).contiguous(),
        gv.to(value.dtype).contiguous(),
        gt.reshape(()).to(temperature.dtype),
    )


def _backward_empty(query, key, value, temperature):
    return (
        torch.zeros_like(query),
        torch.zeros_like(key),
        torch.zeros_like(value),
        torch.zeros_like(temperature),
    )


@attend_backward.register_fake
def _(grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity, backend, query_positions=None):
    return _backward_empty(query, key, value, temperature)


def _attend_setup_context(ctx, inputs, output):
    query, key, value, indices, temperature, patch_size, aggregation, similarity, backend, query_positions = inputs
    out, stat = output
    ctx.save_for_backward(query, key, value, indices, temperature, out, stat, query_positions)
    ctx.options = (patch_size, aggregation, similarity, backend)
    ctx.mark_non_differentiable(stat)


def _attend_backward(ctx, grad_out, grad_stat):
    query, key, value, indices, temperature, out, stat, query_positions = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gq, gk, gv, gt = attend_backward(grad_out, query, key, value, indices, temperature, out, stat, *ctx.options, query_positions)
    return gq, gk, gv, None, gt, None, None, None, None, None


attend.register_autograd(_attend_backward, setup_context=_attend_setup_context)
