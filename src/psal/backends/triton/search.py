"""Triton PatchMatch for CUDA tensors (and CPU tensors through Triton's interpreter, for tests):
the backend's entry point, the preparation every kernel family shares, and the rule that picks a
variant.

Same folded contract as :func:`psal.backends.torch.search.patchmatch`: query ``(N, C, H, W)``, key
``(N, C, Hk, Wk)``, an optional allowed-key mask ``(N, Hk * Wk)``, warm-start candidates
``(N, K0, H, W)``, sparse query ``positions`` ``(M,)``; the heads are already in the batch.

Two kernel families compute the same field: the same candidates (jump-flood propagation of all
``K`` matches at steps 8, 4, 2, 1, random search around each match), the same counter-based random
streams (:mod:`.counters`), Jacobi updates (every launch reads one buffer and writes another, so
the result depends neither on the launch order nor on how pixels are grouped into programs). They
differ in how a candidate's patch cost is computed, and so in speed:

- ``lanes`` (:mod:`.search_lanes`): one query pixel per lane, compile-time patch loops, int32
  offsets; ``pad``: replicate-padded copies of the maps and no clamps, ``clamp``: the maps read
  in place, every column clamped (no copy). ``BLOCK x warps`` pixels per program.
- ``tiles`` (:mod:`.search_tiles`): the first design, ``BLOCK`` pixels times ``CB`` patch values
  per program; int64 throughout, so it also runs the problems ``lanes`` cannot (``k`` above
  :data:`LANES_MAX_K`, ``C`` times a padded map at or above 2**31 elements).

A variant is named ``lanes-pad-32x1``, ``lanes-clamp-64x2`` (block x warps) or ``tiles-16x16x2``
(block x chunk x warps). Which one runs (:func:`variant_for`): ``PSAL_TRITON_SEARCH`` when set,
else the one :func:`set_variant` chose in this process (``python -m psal.bench gpu`` times them
all and keeps the fastest of each problem class), else :data:`TUNED`, the fastest measured on a
GPU by the last such check, for patches of at most :data:`SMALL_PATCH` values (``p * p * C``)
and for larger ones; a variant that cannot run a problem gives way to ``tiles``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton.language as tl

from .. import tall
from ..device import triton_interpreted
from ..layout import allowed_table, compute_dtype, neighbour_table
from . import search_lanes, search_tiles
from .counters import launch_key

# Jump-flood steps of one iteration's propagation, longest first (as in the pure-PyTorch backend).
JUMPS = (8, 4, 2, 1)
SMALL_PATCH = 256
LANES_MAX_K = 16
_INT32 = 2**31
# The fastest variant of each class on a GPU, as timed by `make gpu-check` on one H200 on 2026-12-04
# (docs/gpu/2026-12-04-h200-run1.md; every lanes variant within 20% of these, the tiles 4x slower
# on RGB, 2x on 64 channels).
TUNED = {"small": "lanes-pad-32x1", "large": "lanes-pad-64x1"}
# Every selectable variant; the tiles stay selectable and tested, but are no longer timed by default.
ALL_VARIANTS = (
    "lanes-pad-32x1", "lanes-pad-64x1", "lanes-pad-64x2", "lanes-pad-128x4",
    "lanes-clamp-32x1", "lanes-clamp-64x1", "lanes-clamp-64x2", "lanes-clamp-128x4",
    "tiles-16x16x2", "tiles-32x16x4", "tiles-16x64x4", "tiles-8x256x4",
)  # fmt: skip
# The variants a GPU check times (the 2026-12-04 run's four fastest and the clamped in-place reads).
VARIANTS = ("lanes-pad-32x1", "lanes-pad-64x1", "lanes-clamp-64x1", "lanes-pad-64x2")
_chosen: dict = {}


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str  # "lanes" or "tiles"
    pad: bool = True  # lanes: padded copies, or the maps in place with clamps
    block: int = 32  # pixels per program
    chunk: int = 16  # tiles: patch values per chunk
    warps: int = 1

    @property
    def name(self) -> str:
        if self.kernel == "lanes":
            return f"lanes-{'pad' if self.pad else 'clamp'}-{self.block}x{self.warps}"
        return f"tiles-{self.block}x{self.chunk}x{self.warps}"


def parse_variant(name: str) -> Variant:
    """``"lanes-pad-32x1"`` -> :class:`Variant`; ``ValueError`` naming the forms otherwise."""
    parts = str(name).split("-")
    try:
        if parts[0] == "lanes" and len(parts) == 3 and parts[1] in ("pad", "clamp"):
            block, warps = map(int, parts[2].split("x"))
            return Variant("lanes", pad=parts[1] == "pad", block=block, warps=warps)
        if parts[0] == "tiles" and len(parts) == 2:
            block, chunk, warps = map(int, parts[1].split("x"))
            return Variant("tiles", block=block, chunk=chunk, warps=warps)
    except ValueError:
        pass
    raise ValueError(f"a Triton search variant is 'lanes-pad-BxW', 'lanes-clamp-BxW' or 'tiles-BxCxW' (powers of two), got {name!r}")


def set_variant(size_class: str, name: str | None) -> None:
    """Use variant ``name`` for the problems of ``size_class`` (``"small"``, ``"large"``) in this
    process (``None``: back to :data:`TUNED`)."""
    if size_class not in TUNED:
        raise ValueError(f"size_class must be one of {sorted(TUNED)}, got {size_class!r}")
    if name is None:
        _chosen.pop(size_class, None)
    else:
        _chosen[size_class] = parse_variant(name).name


def size_class(patch_size: int, channels: int) -> str:
    return "small" if patch_size * patch_size * channels <= SMALL_PATCH else "large"


def lanes_can_run(pb) -> str | None:
    """Why the lanes kernels cannot run the prepared problem ``pb`` (``None``: they can)."""
    r = pb.P // 2
    plane = max((pb.H + 2 * r) * (pb.W + 2 * r), (pb.Hk + 2 * r) * (pb.Wk + 2 * r))
    if pb.K > LANES_MAX_K:
        return f"k = {pb.K} is above {LANES_MAX_K}"
    if pb.C * plane >= _INT32:
        return f"C * padded map = {pb.C * plane} elements reaches 2**31"
    return None


def variant_for(pb) -> Variant:
    """The variant that runs the prepared problem ``pb`` (see the module's docstring)."""
    cls = size_class(pb.P, pb.C)
    name = os.environ.get("PSAL_TRITON_SEARCH") or _chosen.get(cls) or TUNED[cls]
    v = parse_variant(name)
    if v.kernel == "lanes" and lanes_can_run(pb) is not None:
        return parse_variant("tiles-16x16x2")
    return v


@dataclasses.dataclass
class Problem:
    """A search, prepared once for whichever kernels run it: sizes, the features, the mask's
    tables, the warm start, the sparse positions and their neighbour tables."""

    query: torch.Tensor
    key: torch.Tensor
    N: int
    C: int
    H: int
    W: int
    Hk: int
    Wk: int
    K: int
    P: int
    M: int
    dot: bool
    acc: object  # tl.float32 or tl.float64
    dtype: torch.dtype  # what the features are read as when they must be copied
    device: torch.device
    interpreted: bool
    has_mask: int
    mask_u8: torch.Tensor
    table: torch.Tensor
    n_allowed: torch.Tensor
    K0: int
    init: torch.Tensor
    sparse: bool
    qpos: torch.Tensor
    seed: int
    num_iters: int
    num_radii: int
    steps: tuple
    tables: dict

    def schedule(self):
        """The iterate launches of the search: ``(step, num_radii, neighbour table, launch key)``
        for each jump step of each iteration, the random search (``num_radii > 0``) in the
        launch of the last step (or alone, when the map is too small for any step)."""
        for it in range(self.num_iters):
            key = launch_key(self.seed, it)
            steps = self.steps or (0,)
            for i, step in enumerate(steps):
                yield step, (self.num_radii if i == len(steps) - 1 else 0), (self.tables[step] if step else self.qpos), key

    def buffers(self, index_dtype: torch.dtype) -> tuple:
        """The ping-pong fields ``(N, K, M)``: indices and costs, and their spares."""
        idx = torch.empty(self.N, self.K, self.M, dtype=index_dtype, device=self.device)
        cost = torch.empty(self.N, self.K, self.M, dtype=torch.float32, device=self.device)
        return idx, cost, torch.empty_like(idx), torch.empty_like(cost)


def prepare(query, key, mask, num_neighbors, patch_size, num_iters, similarity, init_idx, seed, positions=None) -> Problem:
    N, C, H, W = query.shape
    Hk, Wk = key.shape[-2:]
    K, P, Nk = num_neighbors, patch_size, Hk * Wk
    sparse = positions is not None
    M = positions.numel() if sparse else H * W
    dev = query.device
    if mask is None:
        has_mask = 0
        mask_u8 = torch.ones(1, dtype=torch.uint8, device=dev)
        table = torch.zeros(1, dtype=torch.int32, device=dev)
        n_allowed = torch.full((N,), Nk, dtype=torch.int32, device=dev)
    else:
        has_mask = 1
        mask_u8 = mask.to(torch.uint8).contiguous()
        table, count = allowed_table(mask, N, Nk)
        table = table.to(torch.int32).contiguous()
        n_allowed = count.to(torch.int32)
    if init_idx is None:
        K0, init = 0, torch.zeros(1, dtype=torch.int64, device=dev)
    else:
        K0, init = init_idx.shape[1], init_idx.contiguous()
    qpos = positions.contiguous() if sparse else torch.zeros(1, dtype=torch.int64, device=dev)
    steps = tuple(s for s in JUMPS if s < max(H, W)) if num_iters else ()

    def neighbours(step):
        """``(4, M)`` list slots of the neighbours at ``step`` in the kernels' four directions."""
        if not sparse:
            return qpos
        moves = ((0, step), (0, -step), (step, 0), (-step, 0))
        return torch.stack([neighbour_table(positions, (H, W), (dy, dx)) for dy, dx in moves]).contiguous()

    return Problem(
        query=query, key=key, N=N, C=C, H=H, W=W, Hk=Hk, Wk=Wk, K=K, P=P, M=M,
        dot=similarity == "dot",
        acc=tl.float64 if compute_dtype(query.dtype) == torch.float64 else tl.float32,
        dtype=query.dtype if query.dtype == key.dtype else compute_dtype(query.dtype),
        device=dev, interpreted=dev.type == "cpu" or triton_interpreted(),
        has_mask=has_mask, mask_u8=mask_u8, table=table, n_allowed=n_allowed, K0=K0, init=init,
        sparse=sparse, qpos=qpos, seed=seed, num_iters=num_iters,
        num_radii=max(Hk, Wk).bit_length(),  # the radii max(Hk, Wk) >> s, s < num_radii, are >= 1
        steps=steps, tables={s: neighbours(s) for s in steps},
    )  # fmt: skip


def patchmatch(
    query,
    key,
    mask,
    num_neighbors: int,
    patch_size: int | tuple,
    num_iters: int,
    similarity: str,
    init_idx,
    seed: int,
    positions=None,
    variant=None,
    scheme=None,
):
    """Same contract as :func:`psal.backends.torch.search.patchmatch`, on CUDA tensors (or CPU
    tensors through Triton's interpreter), sparse ``positions`` included. ``variant``: a name
    (see the module's docstring) to run instead of :func:`variant_for`'s choice. ``scheme``:
    ``(prop_k, rand_k)``, the lanes kernels' cheaper candidate schemes for the GPU check (see
    :func:`.search_lanes.run`); the default, all ``k`` and ``k``, is every backend's. Volumes
    (``patch_size`` a ``(pt, ph, pw)`` triple, ``ph == pw``) run on the same kernels through
    :func:`psal.backends.tall.search`."""
    if isinstance(patch_size, tuple):
        return tall.search(functools.partial(patchmatch, variant=variant, scheme=scheme), query, key, mask, num_neighbors, patch_size,
                           num_iters, similarity, init_idx, seed, positions)  # fmt: skip
    pb = prepare(query, key, mask, num_neighbors, patch_size, num_iters, similarity, init_idx, seed, positions)
    v = parse_variant(variant) if variant is not None else variant_for(pb)
    if v.kernel == "lanes":
        why = lanes_can_run(pb)
        if why is not None:
            raise ValueError(f"Triton search variant {v.name!r} cannot run this problem: {why}")
        prop_k, rand_k = scheme or (None, None)
        idx, cost = search_lanes.run(pb, pad=v.pad, block=v.block, warps=v.warps, prop_k=prop_k, rand_k=rand_k)
        idx = idx.long()
    else:
        if scheme is not None and tuple(scheme) != (pb.K, pb.K):
            raise ValueError(f"Triton search variant {v.name!r} runs only the full scheme ({pb.K}, {pb.K}), got {scheme!r}")
        idx, cost = search_tiles.run(pb, (v.block, v.chunk, v.warps))
    N, K = pb.N, pb.K
    return (idx.view(N, K, pb.H, pb.W), cost.view(N, K, pb.H, pb.W)) if not pb.sparse else (idx, cost)
