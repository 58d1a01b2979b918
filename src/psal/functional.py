"""The public functions: validate once, fold heads into the batch, dispatch to a backend.

Every function takes maps ``(B, C, H, W)`` and, the same way, videos or volumes
``(B, C, T, H, W)``: ``patch_size`` is then an odd int (a cube) or a ``(pt, ph, pw)`` triple,
``key_mask`` ``(B, Tk, Hk, Wk)``, fields ``(B, heads, k, T, H, W)`` with flat key indices
``t * Hk * Wk + row * Wk + col``, and query and key volumes may differ in length and size. A map
is a volume of one frame (the same results). Outside a volume, voxels are read with replicate
padding in time as in space.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from . import _checks as checks
from . import _ops
from ._dispatch import BACKENDS
from .backends import dense, layout
from .backends.torch import search as oracle
from .types import KNNField

FULL_ATTENTION_METHODS = ("auto", "sdpa", "chunked")


def _spatial(shapes: checks.MapShapes, positions: torch.Tensor | None) -> tuple:
    """The spatial part of a field's shape: ``(H, W)`` (``(T, H, W)`` for volumes), or ``(M,)``
    for sparse query positions."""
    return shapes.spatial if positions is None else (positions.numel(),)


def _op_patch(patch) -> list[int]:
    """The ops' patch argument: ``[p]`` for a map's square patch, ``[pt, ph, pw]`` for a volume's."""
    return [patch] if isinstance(patch, int) else list(patch)


def _empty_field(shapes: checks.MapShapes, k: int, device: torch.device, positions: torch.Tensor | None = None) -> KNNField:
    size = (shapes.batch, shapes.num_heads, k, *_spatial(shapes, positions))
    return KNNField(
        torch.empty(size, dtype=torch.int64, device=device),
        torch.empty(size, dtype=torch.float32, device=device),
    )


def _unfold_field(idx: torch.Tensor, cost: torch.Tensor, shapes: checks.MapShapes, positions: torch.Tensor | None = None) -> KNNField:
    size = (shapes.batch, shapes.num_heads, idx.shape[1], *_spatial(shapes, positions))
    return KNNField(idx.reshape(size), cost.reshape(size))


def _folded(
    query: torch.Tensor, key: torch.Tensor, key_mask: torch.Tensor | None, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Detached query, key and mask with the heads moved into the batch (see ``layout.fold_heads``)."""
    return (
        layout.fold_heads(query.detach(), num_heads),
        layout.fold_heads(key.detach(), num_heads),
        layout.fold_mask(key_mask, num_heads),
    )


def _draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A 62-bit seed from the caller's generator (or torch's default one): one small draw, kept
    as a tensor so that a compiled graph carries it without a sync."""
    if generator is None:
        return torch.randint(0, 1 << 62, (1,))
    return torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device)


def patchmatch(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    num_neighbors: int = 3,
    num_iters: int = 5,
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    init: KNNField | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    positions: torch.Tensor | None = None,
) -> KNNField:
    """Approximate k nearest key patches of every query patch, by PatchMatch.

    Args:
        query: ``Tensor[B, C, H, W]``, floating point (or a video ``Tensor[B, C, T, H, W]``,
            see the module docstring).
        key: ``Tensor[B, C, Hk, Wk]`` on the query's device; its size may differ from the query's.
        patch_size: odd side ``p >= 1`` of the square patches (videos: also ``(pt, ph, pw)``);
            outside a map, pixels are read with replicate padding, so border pixels get real
            matches.
        num_neighbors: ``k >= 1``, at most the number of allowed key positions.
        num_iters: PatchMatch iterations (``0``: random initialisation only).
        key_mask: ``Tensor[B, Hk, Wk]`` of bool, True where a key position may be matched.
        similarity: ``"l2"`` (sum of squared differences) or ``"dot"`` (minus the patch inner
            product).
        num_heads: splits the channels into this many groups, each with its own field.
        init: a ``KNNField`` (any ``k``), or its indices ``Tensor[B, heads, k0, H, W]`` int64, to
            warm-start from; the result is never worse than it.
        generator: the source of randomness; the same seed gives the same field.
        backend: ``"auto"`` (numba on CPU, Triton on CUDA, else torch), ``"numba"`` (CPU,
            compiled, all cores), ``"triton"`` (CUDA) or ``"torch"`` (any device).
        positions: sparse queries: search these query pixels only, the same in every batch
            element and head, given as a bool ``Tensor[H, W]`` mask or as their flat indices
            ``row * W + col``, a strictly ascending int64 ``Tensor[M]``. Nothing is computed or
            stored for the other pixels: the field is ``Tensor[B, heads, k, M]`` and ``init`` must
            be too. A pixel propagates matches from its listed neighbours only, so a connected
            region searches as well as the dense call does. Every backend.

    Returns:
        ``KNNField(indices, costs)``, both ``Tensor[B, heads, k, H, W]`` (``[B, heads, k, M]``
        with ``positions``); indices int64 flat ``row * Wk + col``, costs float32 ascending along
        ``k``. No gradient flows through it.

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
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    k = checks.check_num_neighbors(fn, num_neighbors, key_mask, shapes)
    return _search(fn, query, key, shapes, patch_size, k, num_iters, key_mask, similarity, init, generator, backend, positions)


def _search(
    fn: str,
    query: torch.Tensor,
    key: torch.Tensor,
    shapes: checks.MapShapes,
    patch_size: int | tuple[int, int, int],
    k: int,
    num_iters: int,
    key_mask: torch.Tensor | None,
    similarity: str,
    init: KNNField | torch.Tensor | None,
    generator: torch.Generator | None,
    backend: str,
    positions: torch.Tensor | None = None,
) -> KNNField:
    """The search once query, key, mask and ``k`` are checked: checks the rest, runs the op."""
    patch_size = checks.check_patch_size(fn, patch_size, shapes.volume)
    num_iters = checks.check_int(fn, "num_iters", num_iters, 0)
    similarity = checks.check_similarity(fn, similarity)
    positions = checks.check_positions(fn, positions, shapes, query.device)
    init_idx = checks.check_init(fn, init, shapes, query.device, positions)
    generator = checks.check_generator(fn, generator)
    backend = checks.check_backend(fn, backend, BACKENDS, query.device)
    q, kk, mask = _folded(query, key, key_mask, shapes.num_heads)
    idx, cost = _ops.patchmatch(
        q,
        kk,
        mask,
        k,
        _op_patch(patch_size),
        num_iters,
        similarity,
        None if init_idx is None else init_idx.flatten(0, 1),
        _draw_seed(generator),
        backend,
        positions,
    )
    return _unfold_field(idx, cost, shapes, positions)


def exact_knn(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    num_neighbors: int = 3,
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
) -> KNNField:
    """The exact k nearest key patches by brute force, in pure PyTorch on any device.

    The oracle for :func:`patchmatch`: same arguments and result (``KNNField`` of
    ``Tensor[B, heads, k, H, W]``, int64 indices and float32 costs). Query pixels are taken in
    chunks, so memory stays ``O(chunk * Hk * Wk)``; time is ``O(H * W * Hk * Wk * C * p^2)``.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> field = psal.exact_knn(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), patch_size=5)
        >>> field.costs.shape
        torch.Size([1, 1, 3, 32, 32])
    """
    fn = "psal.exact_knn"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    patch_size = checks.check_patch_size(fn, patch_size, shapes.volume)
    similarity = checks.check_similarity(fn, similarity)
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    k = checks.check_num_neighbors(fn, num_neighbors, key_mask, shapes)
    if shapes.batch == 0 or shapes.num_queries == 0:
        return _empty_field(shapes, k, query.device)
    with torch.no_grad():
        q, kk, mask = _folded(query, key, key_mask, shapes.num_heads)
        idx, cost = oracle.exact_knn(q, kk, mask, k, patch_size, similarity)
    return _unfold_field(idx, cost, shapes)


def patch_costs(
    query: torch.Tensor,
    key: torch.Tensor,
    indices: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    similarity: str = "l2",
    num_heads: int = 1,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Costs of given matches, recomputed directly: ``Tensor[B, heads, m, H, W]`` float32.

    Args:
        indices: ``Tensor[B, heads, m, H, W]`` int64 flat key positions (``m`` any count), or
            ``Tensor[B, heads, m, M]`` for sparse query ``positions`` (see :func:`patchmatch`).

    Computed in float64 for float64 inputs, else float32. No gradient flows through it.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> q, k = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 12, 20)
        >>> field = psal.patchmatch(q, k)
        >>> torch.allclose(psal.patch_costs(q, k, field.indices), field.costs, rtol=1e-4)
        True
    """
    fn = "psal.patch_costs"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    patch_size = checks.check_patch_size(fn, patch_size, shapes.volume)
    similarity = checks.check_similarity(fn, similarity)
    positions = checks.check_positions(fn, positions, shapes, query.device)
    indices = checks.check_field_indices(fn, "indices", indices, shapes, query.device, positions=positions)
    if indices.numel() == 0:
        return torch.empty(indices.shape, dtype=torch.float32, device=query.device)
    with torch.no_grad():
        q, k, _ = _folded(query, key, None, shapes.num_heads)
        cost = oracle.patch_costs(q, k, indices.flatten(0, 1), patch_size, similarity, positions)
    return cost.reshape(indices.shape)


# ----------------------------------------------------------------------------------------------
# Attention.


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "center",
    similarity: str = "l2",
    num_heads: int = 1,
    backend: str = "auto",
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over given matches: the differentiable half of PSAL.

    Weights are ``softmax_j(-cost_j(x) / temperature)`` over the ``k`` matches of each query
    pixel, with the patch costs recomputed from ``indices``. Aggregations (``PSAL.md``):
    ``"center"`` averages the matched value pixels; ``"patch"`` lets every query patch vote for
    each pixel it covers with the value at the same offset in its match, one softmax over all
    ``p * p * k`` votes of a pixel; ``"patch_mean"`` normalises each patch's weights on their own
    and averages its votes. Votes that would land outside the map are dropped.

    Gradients reach query, key and value and a tensor temperature; the indices are not
    differentiable. The backward recomputes costs from ``indices`` and never holds ``p * p * k``
    copies of the features; it is deterministic on CPU.

    Args:
        query: ``Tensor[B, C, H, W]``.
        key: ``Tensor[B, C, Hk, Wk]``, same dtype and device.
        value: ``Tensor[B, Cv, Hk, Wk]``, same dtype and device; ``Cv`` divisible by ``num_heads``.
        indices: ``Tensor[B, heads, k, H, W]`` int64 (or int32: half the memory a backward keeps)
            flat key positions, e.g. a field's indices.
        patch_size: odd ``p >= 1``.
        temperature: a number ``> 0``, or a one-element floating tensor (may require grad; its
            value is not checked, which would cost a device sync).
        aggregation: ``"center"``, ``"patch"`` or ``"patch_mean"``.
        similarity: ``"l2"`` or ``"dot"``.
        num_heads: channel groups of query/key and of value, one field per head; the heads'
            outputs are concatenated along channels.
        backend: ``"auto"`` (numba on CPU, Triton on CUDA, else torch), ``"numba"`` (CPU),
            ``"triton"`` (CUDA) or ``"torch"`` (any device).
        positions: sparse queries (see :func:`patchmatch`): attend for the listed query pixels
            only, with ``indices`` ``Tensor[B, heads, k, M]`` (a sparse search's field). Only
            listed patches vote: with ``"patch"``/``"patch_mean"`` a listed pixel takes the votes
            of the listed patches that cover it, so where all of them are listed the result is
            the dense call's. Every backend; the backward of numba's and Triton's is the
            pure-PyTorch one.

    Returns:
        ``Tensor[B, Cv, H, W]`` in the input dtype (float16/bfloat16 are computed in float32);
        ``Tensor[B, Cv, M]`` with ``positions``.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> q, k, v = torch.rand(1, 8, 32, 32), torch.rand(1, 8, 24, 24), torch.rand(1, 3, 24, 24)
        >>> field = psal.patchmatch(q, k, num_neighbors=4)
        >>> psal.attend(q, k, v, field.indices, aggregation="patch").shape
        torch.Size([1, 3, 32, 32])
    """
    fn = "psal.attend"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    positions = checks.check_positions(fn, positions, shapes, query.device)
    indices = checks.check_field_indices(
        fn, "indices", indices, shapes, query.device, positions=positions, dtypes=(torch.int64, torch.int32)
    )
    return _attend(fn, query, key, value, indices, shapes, patch_size, temperature, aggregation, similarity, backend, positions)


def _attend(
    fn: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    shapes: checks.MapShapes,
    patch_size: int | tuple[int, int, int],
    temperature: float | torch.Tensor,
    aggregation: str,
    similarity: str,
    backend: str,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attend`` once query, key and indices are checked."""
    checks.check_value(fn, value, shapes, query)
    checks.check_same_dtype(fn, query=query, key=key, value=value)
    patch_size = checks.check_patch_size(fn, patch_size, shapes.volume)
    aggregation = checks.check_aggregation(fn, aggregation)
    similarity = checks.check_similarity(fn, similarity)
    temperature = checks.check_temperature(fn, temperature, query)
    backend = checks.check_backend(fn, backend, BACKENDS, query.device)
    h = shapes.num_heads
    out, _ = _ops.attend(
        layout.fold_heads(query, h),
        layout.fold_heads(key, h),
        layout.fold_heads(value, h),
        indices.flatten(0, 1),
        temperature,
        _op_patch(patch_size),
        aggregation,
        similarity,
        backend,
        positions,
    )
    return out.reshape(shapes.batch, value.shape[1], *_spatial(shapes, positions))


@overload
def ps_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    num_neighbors: int = 3,
    num_iters: int = 5,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "center",
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    init: KNNField | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_field: Literal[False] = False,
    backend: str = "auto",
) -> torch.Tensor: ...


@overload
def ps_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    num_neighbors: int = 3,
    num_iters: int = 5,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "center",
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    init: KNNField | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_field: Literal[True],
    backend: str = "auto",
) -> tuple[torch.Tensor, KNNField]: ...


def ps_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    num_neighbors: int = 3,
    num_iters: int = 5,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "center",
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    init: KNNField | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_field: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, KNNField]:
    """Patch-based stochastic attention: :func:`patchmatch` (no gradient), then :func:`attend`.

    Memory and time are ``O(B * H * W * k)``, not ``O((H * W)^2)``: each query pixel attends to
    its ``k`` approximate nearest key patches, anywhere in the key map. The arguments are those
    of :func:`patchmatch` and :func:`attend`; ``backend`` applies to both.

    Returns:
        ``Tensor[B, Cv, H, W]`` in the input dtype, or ``(output, KNNField)`` with
        ``return_field=True``.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.

    Example:
        >>> x = torch.rand(2, 16, 40, 40, requires_grad=True)
        >>> out = psal.ps_attention(x, x, x, num_neighbors=4, temperature=0.5)
        >>> out.shape
        torch.Size([2, 16, 40, 40])
        >>> out.sum().backward()
    """
    fn = "psal.ps_attention"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    checks.check_value(fn, value, shapes, query)  # before the search, so a bad value fails fast
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    k = checks.check_num_neighbors(fn, num_neighbors, key_mask, shapes)
    field = _search(fn, query, key, shapes, patch_size, k, num_iters, key_mask, similarity, init, generator, backend)
    # What the backward keeps: int32 indices, half the memory (the int64 field is dropped unless returned).
    idx = field.indices.int() if shapes.num_keys < 2**31 else field.indices
    out = _attend(fn, query, key, value, idx, shapes, patch_size, temperature, aggregation, similarity, backend)
    return (out, field) if return_field else out


def full_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    patch_size: int | tuple[int, int, int] = 3,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "center",
    key_mask: torch.Tensor | None = None,
    similarity: str = "l2",
    num_heads: int = 1,
    method: str = "auto",
) -> torch.Tensor:
    """PSAL's attention over *all* allowed key patches (a dense softmax): the exact baseline.

    Same arguments and output as :func:`ps_attention` with every allowed key as a neighbour.
    Time is ``O((H * W) * (Hk * Wk) * C * p^2)``; memory stays ``O(H * W * C * p^2)``:

    - ``method="sdpa"``: ``scaled_dot_product_attention`` on patch vectors (PyTorch's flash
      kernel where it applies); not for ``aggregation="patch"``, which needs the softmax
      normaliser that SDPA does not return.
    - ``method="chunked"``: query pixels in chunks, scores recomputed in the backward.
    - ``method="auto"``: ``"sdpa"`` where it applies (not float64 on CUDA), else ``"chunked"``.

    Differentiable by autograd in all arguments but the mask. Query ``Tensor[B, C, H, W]``, key
    ``Tensor[B, C, Hk, Wk]``, value ``Tensor[B, Cv, Hk, Wk]``, all of one dtype, -> ``Tensor[B,
    Cv, H, W]`` in that dtype.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed;
            ``ValueError`` for ``method="sdpa"`` with ``aggregation="patch"`` or with float64 on CUDA.

    Example:
        >>> q, v = torch.rand(1, 4, 16, 16), torch.rand(1, 2, 16, 16)
        >>> psal.full_attention(q, q, v, aggregation="patch_mean").shape
        torch.Size([1, 2, 16, 16])
    """
    fn = "psal.full_attention"
    shapes = checks.check_query_key(fn, query, key, num_heads)
    checks.check_value(fn, value, shapes, query)
    checks.check_same_dtype(fn, query=query, key=key, value=value)
    patch_size = checks.check_patch_size(fn, patch_size, shapes.volume)
    aggregation = checks.check_aggregation(fn, aggregation)
    similarity = checks.check_similarity(fn, similarity)
    key_mask = checks.check_key_mask(fn, key_mask, shapes, query.device)
    checks.check_mask_allows_a_key(fn, key_mask, shapes)
    temperature = checks.check_temperature(fn, temperature, query)
    method = checks.check_choice(fn, "method", method, FULL_ATTENTION_METHODS)
    if method == "sdpa" and aggregation == "patch":
        raise ValueError(f"{fn}: method='sdpa' cannot compute aggregation='patch'; use 'chunked' or 'auto'")
    # PyTorch's fused attention kernels on CUDA take float16, bfloat16 and float32 only.
    sdpa_dtype_ok = query.device.type != "cuda" or query.dtype != torch.float64
    if method == "sdpa" and not sdpa_dtype_ok:
        raise ValueError(f"{fn}: method='sdpa' has no float64 kernel on CUDA; use 'chunked' or 'auto'")
    if method == "auto":
        method = "chunked" if aggregation == "patch" or not sdpa_dtype_ok else "sdpa"
    B, Cv = shapes.batch, value.shape[1]
    if B == 0 or shapes.num_queries == 0:
        # Nothing to compute, but still a result of the graph, so that a backward runs.
        empty = value.new_zeros(B, Cv, *shapes.spatial)
        return empty + 0 * (query.sum() + key.sum() + value.sum())
    h = shapes.num_heads
    out = dense.full_attention(
        layout.fold_heads(query, h),
        layout.fold_heads(key, h),
        layout.fold_heads(value, h),
        layout.fold_mask(key_mask, h),
        temperature,
        patch_size,
        aggregation,
        similarity,
        method,
    )
    return out.reshape(B, Cv, *shapes.spatial).to(value.dtype)
