"""The public functions: validate once, fold heads into the batch, dispatch to a backend."""

from __future__ import annotations

import torch

from . import _checks as checks
from ._dispatch import search_backend
from .backends import reference
from .types import KNNField


def _empty_field(shapes: checks.MapShapes, k: int, device) -> KNNField:
    size = (shapes.batch, shapes.num_heads, k, shapes.height, shapes.width)
    return KNNField(
        torch.empty(size, dtype=torch.int64, device=device),
        torch.empty(size, dtype=torch.float32, device=device),
    )


def _unfold_field(idx: torch.Tensor, cost: torch.Tensor, shapes: checks.MapShapes) -> KNNField:
    size = (shapes.batch, shapes.num_heads, idx.shape[1], shapes.height, shapes.width)
    return KNNField(idx.reshape(size), cost.reshape(size))


def _folded(query, key, key_mask, num_heads: int):
    """Detached query, key and mask with the heads moved into the batch (see ``reference.fold_heads``)."""
    return (
        reference.fold_heads(query.detach(), num_heads),
        reference.fold_heads(key.detach(), num_heads),
        reference.fold_mask(key_mask, num_heads),
    )


def _draw_seed(generator) -> int:
    """A 62-bit seed from the caller's generator (or torch's default one): one small draw."""
    if generator is None:
        return int(torch.randint(0, 1 << 62, (1,)))
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


def patchmatch(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    patch_size: int = 3,
    num_neighbors: int = 3,
    num_iters: int = 5,
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    init: KNNField | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> KNNField:
    """Approximate k nearest key patches of every query patch, by PatchMatch.

    Args:
        query: ``Tensor[B, C, H, W]``, floating point.
        key: ``Tensor[B, C, Hk, Wk]`` on the query's device; its size may differ from the query's.
        patch_size: odd side ``p >= 1`` of the square patches; outside a map, pixels are read with
            replicate padding, so border pixels get real matches.
        num_neighbors: ``k >= 1``, at most the number of allowed key positions.
        num_iters: PatchMatch iterations (``0``: random initialisation only).
        key_mask: ``Tensor[B, Hk, Wk]`` of bool, True where a key position may be matched.
        similarity: ``"l2"`` (sum of squared differences) or ``"dot"`` (minus the patch inner
            product).
        num_heads: splits the channels into this many groups, each with its own field.
        init: a ``KNNField`` (any ``k``) to warm-start from; the result is never worse than it.
        generator: the source of randomness; the same seed gives the same field.
        backend: ``"auto"``, ``"numba"`` (CPU, compiled, all cores) or ``"torch"`` (any device).

    Returns:
        ``KNNField(indices, costs)``, both ``Tensor[B, heads, k, H, W]``; indices int64 flat
        ``row * Wk + col``, costs float32 ascending along ``k``. No gradient flows through it.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> q, k = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 48, 80)
        >>> field = psal.patchmatch(q, k, patch_size=7, num_neighbors=3)
        >>> field.indices.shape
        torch.Size([2, 1, 3, 64, 64])
    """
    fn = "psal.patchmatch"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    patch_size = checks.check_patch_size(fn, patch_size)
    num_iters = checks.check_int(fn, "num_iters", num_iters, 0)
    similarity = checks.check_similarity(fn, similarity)
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    k = checks.check_num_neighbors(fn, num_neighbors, key_mask, shapes)
    init_idx = checks.check_init(fn, init, shapes, query.device)
    generator = checks.check_generator(fn, generator)
    impl = search_backend(fn, backend, query.device)
    if shapes.batch == 0 or shapes.height * shapes.width == 0:
        return _empty_field(shapes, k, query.device)
    with torch.no_grad():
        idx, cost = impl.patchmatch(
            *_folded(query, key, key_mask, shapes.num_heads),
            k,
            patch_size,
            num_iters,
            similarity,
            None if init_idx is None else init_idx.flatten(0, 1),
            _draw_seed(generator),
        )
    return _unfold_field(idx, cost, shapes)


def exact_knn(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    patch_size: int = 3,
    num_neighbors: int = 3,
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
) -> KNNField:
    """The exact k nearest key patches by brute force, in pure PyTorch on any device.

    The oracle for :func:`patchmatch`: same arguments and result. Query pixels are taken in
    chunks, so memory stays ``O(chunk * Hk * Wk)``; time is ``O(H * W * Hk * Wk * C * p^2)``.

    Example:
        >>> field = psal.exact_knn(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), patch_size=5)
        >>> field.costs.shape
        torch.Size([1, 1, 3, 32, 32])
    """
    fn = "psal.exact_knn"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    patch_size = checks.check_patch_size(fn, patch_size)
    similarity = checks.check_similarity(fn, similarity)
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    k = checks.check_num_neighbors(fn, num_neighbors, key_mask, shapes)
    if shapes.batch == 0 or shapes.height * shapes.width == 0:
        return _empty_field(shapes, k, query.device)
    with torch.no_grad():
        idx, cost = reference.exact_knn(*_folded(query, key, key_mask, shapes.num_heads), k, patch_size, similarity)
    return _unfold_field(idx, cost, shapes)


def patch_costs(
    query: torch.Tensor,
    key: torch.Tensor,
    indices: torch.Tensor,
    *,
    patch_size: int = 3,
    similarity: str = "l2",
    num_heads: int = 1,
) -> torch.Tensor:
    """Costs of given matches, recomputed directly: ``Tensor[B, heads, m, H, W]`` float32.

    Args:
        indices: ``Tensor[B, heads, m, H, W]`` int64 flat key positions (``m`` any count).

    Computed in float64 for float64 inputs, else float32. No gradient flows through it.

    Example:
        >>> q, k = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 12, 20)
        >>> field = psal.patchmatch(q, k)
        >>> torch.allclose(psal.patch_costs(q, k, field.indices), field.costs, rtol=1e-4)
        True
    """
    fn = "psal.patch_costs"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    patch_size = checks.check_patch_size(fn, patch_size)
    similarity = checks.check_similarity(fn, similarity)
    indices = checks.check_field_indices(fn, "indices", indices, shapes, query.device)
    if indices.numel() == 0:
        return torch.empty(indices.shape, dtype=torch.float32, device=query.device)
    with torch.no_grad():
        q, k, _ = _folded(query, key, None, shapes.num_heads)
        cost = reference.patch_costs(q, k, indices.flatten(0, 1), patch_size, similarity)
    return cost.reshape(indices.shape)
