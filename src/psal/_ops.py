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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import choose, positions
from .backends.layout import compute_dtype


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("psal::patchmatch", mutates_args=())
def patchmatch(
    query: Tensor,
    key: Tensor,
    key_mask: Tensor | None,
    num_neighbors: int,
    patch_size: int,
    num_iters: int,
    similarity: str,
    init: Tensor | None,
    seed: Tensor,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Folded search: query ``(N, C, H, W)``, key ``(N, C, Hk, Wk)``, key_mask ``(N, Hk * Wk)``,
    init ``(N, k0, H, W)``, seed a one-element int64 tensor -> indices and costs ``(N, k, H, W)``.
    With ``query_positions (M,)`` (sparse queries), init and the result are ``(N, k, M)``."""
    N, _, H, W = query.shape
    size = _field_size(N, num_neighbors, H, W, query_positions)
    if N == 0 or size[-1] * size[-2] == 0 or (query_positions is not None and query_positions.numel() == 0):
        return query.new_empty(size, dtype=torch.int64), query.new_empty(size, dtype=torch.float32)
    L = H * W if query_positions is None else query_positions.numel()
    count = positions(num_neighbors, H, W, key.shape[-2], key.shape[-1], patch_size, L)
    impl = choose("psal.patchmatch", "search", backend, query.device, count, sparse=query_positions is not None)
    query, key, key_mask, init = _contiguous(query, key, key_mask, init)
    opts = {} if query_positions is None else {"positions": query_positions.contiguous()}
    idx, cost = impl.patchmatch(
        query, key, key_mask, num_neighbors, patch_size, num_iters, similarity, init, int(seed.reshape(-1)[0]), **opts
    )
    return idx.contiguous(), cost.contiguous()


def _field_size(N: int, k: int, H: int, W: int, query_positions) -> tuple:
    return (N, k, H, W) if query_positions is None else (N, k, query_positions.shape[0])


@patchmatch.register_fake
def _(query, key, key_mask, num_neighbors, patch_size, num_iters, similarity, init, seed, backend, query_positions=None):
    N, _, H, W = query.shape
    size = _field_size(N, num_neighbors, H, W, query_positions)
    return query.new_empty(size, dtype=torch.int64), query.new_empty(size, dtype=torch.float32)


@torch.library.custom_op("psal::attend", mutates_args=())
def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    indices: Tensor,
    temperature: Tensor,
    patch_size: int,
    aggregation: str,
    similarity: str,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Folded attention: -> ``out (N, Cv, H, W)`` in the value's dtype and the per-pixel statistic
    ``(N, H, W)`` in the compute dtype that the backward needs (see ``psal.backends.torch.attend``).
    With ``query_positions (M,)`` (sparse queries): indices ``(N, K, M)``, out ``(N, Cv, M)``,
    statistic ``(N, M)``."""
    if indices.numel() == 0:
        return _attend_empty(query, value, indices, query_positions)
    impl, opts = _attend_impl(query, key, value, indices, patch_size, backend, query_positions)
    indices = _index_dtype(impl, indices)
    out, stat = impl.attend_forward(*_contiguous(query, key, value, indices, temperature), patch_size, aggregation, similarity, **opts)
    # Outputs must be contiguous: the fake kernels promise it, and compiled code checks strides.
    return out.to(value.dtype).contiguous(), stat.to(compute_dtype(query.dtype)).contiguous()


def _index_dtype(impl, indices):
    """int32 indices for the backends that read them (``INDEX_DTYPES``), int64 for the others."""
    return indices if indices.dtype in getattr(impl, "INDEX_DTYPES", (torch.int64,)) else indices.long()


def _attend_impl(query, key, value, indices, patch_size, backend, query_positions, op="attend"):
    """The attention backend module of ``op`` (``"attend"``, ``"attend_backward"``) for a
    non-empty problem, and the keyword arguments it takes (the sparse query positions, if any)."""
    K, L = indices.shape[1], indices[0, 0].numel()
    H, W = query.shape[-2:]
    size = positions(K, H, W, key.shape[-2], key.shape[-1], patch_size, L, channels=max(query.shape[1], value.shape[1]))
    impl = choose("psal.attend", op, backend, query.device, size, sparse=query_positions is not None)
    return impl, ({} if query_positions is None else {"positions": query_positions.contiguous()})


def _attend_empty(query, value, indices, query_positions=None):
    N = indices.shape[0]
    spatial = tuple(query.shape[-2:]) if query_positions is None else (query_positions.shape[0],)
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
    patch_size: int,
    aggregation: str,
    similarity: str,
    backend: str,
    query_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``psal::attend`` for query, key, value and temperature, in their dtypes."""
    if indices.numel() == 0:
        return _backward_empty(query, key, value, temperature)
    impl, opts = _attend_impl(query, key, value, indices, patch_size, backend, query_positions, "attend_backward")
    indices = _index_dtype(impl, indices)
    gq, gk, gv, gt = impl.attend_backward(
        *_contiguous(grad, query, key, value, indices, temperature, out, stat),
        patch_size,
        aggregation,
        similarity,
        **opts,
    )
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
