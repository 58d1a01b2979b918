"""Triton PatchMatch, the ``tiles`` kernels: the first GPU design, kept as a variant (the launcher in
:mod:`.search` picks between it and :mod:`.search_lanes`; both return the same field).

Same folded contract as :func:`psal.backends.torch.search.patchmatch`: query ``(N, C, H, W)``, key
``(N, C, Hk, Wk)``, an optional allowed-key mask ``(N, Hk * Wk)``, warm-start candidates
``(N, K0, H, W)``; the heads are already in the batch.

Scheme: Jacobi updates. Every launch reads the whole field from one buffer and writes the next
field into another (ping-pong), so no program reads what another writes: the result does not
depend on the launch order, and no atomics are used, so a search is bitwise reproducible. Nor does
it depend on how pixels are grouped into programs, except that on a GPU the tile shape sets the
summation order inside ``tl.sum`` (the last bits of a cost); the block sizes are fixed constants.

- ``_init_kernel``: ``K`` distinct random allowed positions per query pixel (ranks drawn without
  replacement among the allowed positions, mapped through ``layout.allowed_table``), then the
  warm-start candidates, offered like any other.
- ``_iterate_kernel``: one jump-flood step (8, 4, 2, 1 in each iteration; a step that reaches
  past the query map is skipped): the neighbour ``x + e`` at that distance in each of the four
  directions matched ``y``, which suggests ``y - e`` for ``x``; all ``K`` matches of every
  neighbour are offered (``4K`` candidates); in the launch of an iteration's last step, then the
  random search: one uniform candidate in each window of radius ``max(Hk, Wk) / 2^i`` (down to 1),
  clamped to the key map, around each of the ``K`` matches the list holds after propagation.

Each program holds the k-best lists of ``BLOCK`` query pixels (one lane each; a block may span
several maps) as ``(BLOCK, KB)`` register tiles of indices and costs, ``KB`` the power of two at or
above ``K``, the extra columns empty, kept sorted. A candidate enters if it is allowed, not in the
list yet, and better than the worst kept one; it is inserted by shifting the tail one column
(``tl.gather``). Empty slots (index -1, cost +inf) rank after every real one, +inf costs included.
A patch is read as one run of ``p * p * C`` values per lane, ``CB`` at a time; an l2 cost stops
once no lane of the block can still beat its list's worst (partial sums only grow), a dot cost
has no such bound. NaN costs read as +inf.

Random numbers are counter based: a 32-bit integer hash of (global pixel, draw) under a
per-launch key derived from the caller's seed, so a pixel's draws depend neither on which
program runs it nor when. (Triton's Philox, ``tl.randint``, would do as well; the hash is a
fraction of its operations, which matters under the interpreter.)

Sparse queries (``positions``, ``(M,)`` ascending flat query pixels): lanes are the listed pixels,
fields ``(N, K, M)``; a lane draws its random numbers from its pixel's counters, as in a dense
search, and propagates from the neighbours that are listed (per-step tables of their list slots).

Layouts: query and key are made channel-last, ``(N, H, W, C)``, in their own dtype, so that the
``p * C`` values of one patch row are contiguous; they are summed in float32 (float64 for float64
inputs). Fields are ``(N, K, H * W)`` int64/float32, the layout of the result. Positions outside a
map are clamped (replicate padding). Offsets and positions are int64; only divisions, by map
widths, are done in int32 (a map of 2^31 pixels is out of reach anyway).

Only the block sizes, ``KB``, the patch chunk ``CB`` (and whether one chunk holds the whole
patch), the accumulation dtype and the similarity are compile-time constants; sizes, ``K``, the
patch size and the seeds are run-time arguments excluded from specialisation, so a new image size
never triggers a recompile.

Interpreter notes (triton 3.6): every op costs tens of microseconds of Python whatever the tile
size, int32 ``+ - *`` cost about six ops each (the interpreter checks them for overflow; 64-bit
ones are not checked), and every call of a ``@triton.jit`` function, ``tl.sum``/``tl.max``
included, costs about half a millisecond (it re-patches ``triton.language``). Hence int64 index
arithmetic, one big block, and per-program precomputation of what does not change per candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import cuda_device_of
from ..layout import channel_last
from .counters import launch_key, uniform
from .neighbours import jump_neighbour

# GPU: (BLOCK pixels, CB patch values per chunk, warps), for patches of at most _GPU_SMALL_PATCH
# values and for larger ones. Timed on an H200 (2026-11-27, `python -m psal.bench gpu --tune`,
# 12 shapes): 16 x 16 on 2 warps was the fastest on both problems, 512² RGB p = 7 k = 3 10 iterations
# (157 ms; 32 x 16 on 4 warps 172, 8 x 256 on 4 warps 214, 64 x 64 on 8 warps 287) and 512²
# 64 channels p = 3 k = 4 5 iterations (372 ms; 16 x 64 on 4 warps 389, 32 x 16 on 4 warps 531).
# Small blocks keep the early exits fine-grained; wide chunks did not pay. Interpreter: programs
# run one after another and every op costs Python overhead whatever its size, so one big block and
# one big patch chunk per op win; the chunk is capped so that a tile stays a few MiB.
_GPU_SMALL_PATCH = 256
_GPU_SMALL = (16, 16, 2)
_GPU_LARGE = (16, 16, 2)
_INTERP_BLOCK_MAX, _INTERP_TILE = 4096, 1 << 18

_RUNTIME = ["N", "H", "W", "Hk", "Wk", "C", "K", "P", "M", "has_mask", "key_lo", "key_hi"]


@triton.jit
def _chunk(f0, PC, PPC, C, CB: tl.constexpr):
    """Row, column and channel ``(1, CB)`` of the flat patch indices ``f0 .. f0 + CB``, and which
    are inside the patch (``PC = p * C`` values per row, ``PPC`` in all)."""
    f = (f0 + tl.arange(0, CB)).to(tl.int32)
    di = f // PC
    rem = f - di * PC
    dj = rem // C
    return di[None, :], dj[None, :], (rem - dj * C)[None, :], (f < PPC)[None, :]


@triton.jit
def _offsets(base, i0, j0, di, dj, ch, Hm, Wm, Wd, C):
    """Element offsets ``(BLOCK, CB)`` int64 of patch values in a channel-last map: ``base``
    first row of the lane's map, ``(i0, j0)`` patch corners, clamped to ``[0, Hm] x [0, Wm]``."""
    return ((base + tl.minimum(tl.maximum(i0 + di, 0), Hm)) * Wd + tl.minimum(tl.maximum(j0 + dj, 0), Wm)) * C + ch


@triton.jit
def _patch_cost(
    q_ptr, k_ptr, ctx, ki, kj, live, worst,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Patch costs between the lanes' query patches and the key patches centred on ``(ki, kj)``
    (int64), on the lanes ``live`` (0 elsewhere). ``ctx``: see ``_setup``."""
    Hm, Wm, Hkm, Wkm, W, Wk, C, R, PC, PPC, qbase, kbase, qi0, qj0, q1, di1, dj1, ch1, in1 = ctx
    ki0 = (ki - R)[:, None]
    kj0 = (kj - R)[:, None]
    acc = tl.zeros([BLOCK], ACC)
    if DOT:
        # No early exit for a dot cost: products are summed over the tile and reduced once.
        acc2 = tl.zeros([BLOCK, CB], ACC)
    go = tl.max(live.to(tl.int32), axis=0) > 0
    f0 = tl.zeros([], tl.int64)  # 64-bit: no overflow check under the interpreter
    while (f0 < PPC) & go:
        if ONE_CHUNK:
            # The whole patch in one chunk: its query offsets were computed once per program.
            di = di1
            dj = dj1
            ch = ch1
            on = live[:, None] & in1
            qo = q1
        else:
            di, dj, ch, inside = _chunk(f0, PC, PPC, C, CB)
            on = live[:, None] & inside
            qo = _offsets(qbase, qi0, qj0, di, dj, ch, Hm, Wm, W, C)
        ko = _offsets(kbase, ki0, kj0, di, dj, ch, Hkm, Wkm, Wk, C)
        a = tl.load(q_ptr + qo, mask=on, other=0.0).to(ACC)
        b = tl.load(k_ptr + ko, mask=on, other=0.0).to(ACC)
        if DOT:
            acc2 -= a * b
        else:
            d = a - b
            acc += tl.sum(d * d, axis=1)
            # Partial l2 sums only grow: a lane stops once it cannot beat its list's worst (NaN
            # partial sums stop too: the cost is NaN, read as +inf, whatever follows).
            live = live & (acc < worst)
            go = tl.max(live.to(tl.int32), axis=0) > 0
        f0 += CB
    if DOT:
        acc = tl.sum(acc2, axis=1)
    return acc


@triton.jit
def _offer(
    lidx, lcost, ki, kj, ok, lst, q_ptr, k_ptr, mask_ptr, mbase, has_mask, ctx,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """The sorted lists ``(lidx, lcost)`` after offering key position ``(ki, kj)`` (int64) to the
    lanes ``ok``, where it must lie inside the key map. Masked and duplicate candidates are
    dropped. ``lst``: column masks and shift index of the list tiles (see ``_setup``)."""
    col, inlist, last, shift, K = lst
    Wk = ctx[5]
    cand = tl.where(ok, ki * Wk + kj, -1)
    # Without a mask the load is switched off entirely.
    allowed = tl.load(mask_ptr + (mbase + cand), mask=ok & (has_mask != 0), other=1)
    ok = ok & (allowed != 0) & (tl.max((lidx == cand[:, None]).to(tl.int32), axis=1) == 0)
    # Blocks where no lane has anything new (common once the field is coherent) skip the rest.
    if tl.max(ok.to(tl.int32), axis=0) > 0:
        # Empty slots hold +inf, so a list that is not full has no bound.
        worst = tl.sum(tl.where(last, lcost, 0.0), axis=1)
        c = _patch_cost(q_ptr, k_ptr, ctx, ki, kj, ok, worst, DOT, ACC, BLOCK, CB, ONE_CHUNK).to(tl.float32)
        c = tl.where(c != c, float("inf"), c)  # NaN -> +inf
        pos = tl.sum(((lidx >= 0) & (lcost <= c[:, None])).to(tl.int32), axis=1)[:, None]
        take = ok[:, None] & (pos < K) & inlist
        nidx = tl.where(col < pos, lidx, tl.where(col == pos, cand[:, None], tl.gather(lidx, shift, axis=1)))
        ncost = tl.where(col < pos, lcost, tl.where(col == pos, c[:, None], tl.gather(lcost, shift, axis=1)))
        lidx = tl.where(take, nidx, lidx)
        lcost = tl.where(take, ncost, lcost)
    return lidx, lcost


@triton.jit
def _setup(
    src_idx, src_cost, qpos_ptr, N, H, W, Hk, Wk, C, K, P, M,
    BLOCK: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr, ONE_CHUNK: tl.constexpr, LOAD: tl.constexpr,
    SPARSE: tl.constexpr,
):  # fmt: skip
    """What a program computes once: its lanes (one searched query pixel each, of any map, so
    that small maps leave no lane idle), their list slot ``m``, global pixel ``g = n * L + pix``
    (what random counters are keyed on, so that a listed pixel draws what it draws in a dense
    search) and coordinates, the patch context ``ctx`` that ``_patch_cost`` reads, the list-tile
    helpers ``lst``, the field offsets and (``LOAD``) the lists themselves. ``M`` searched pixels
    per map: all ``L = H * W``, or (``SPARSE``) the flat positions at ``qpos_ptr``."""
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # searched slot n * M + m
    L = H * W
    lane = s < N.to(tl.int64) * M
    n = s // M
    m = s - n * M
    if SPARSE:
        pix = tl.load(qpos_ptr + m, mask=lane, other=0).to(tl.int32)
    else:
        pix = m.to(tl.int32)
    g = n * L + pix
    qi = pix // W
    qj = pix - qi * W
    qi = qi.to(tl.int64)
    qj = qj.to(tl.int64)
    R = P // 2
    qi0 = (qi - R)[:, None]
    qj0 = (qj - R)[:, None]
    qbase = (n * H)[:, None]
    kbase = (n * Hk)[:, None]
    PC = P * C
    PPC = PC * P
    if ONE_CHUNK:
        di1, dj1, ch1, in1 = _chunk(0, PC, PPC, C, CB)
        q1 = _offsets(qbase, qi0, qj0, di1, dj1, ch1, H - 1, W - 1, W, C)
    else:
        di1 = 0
        dj1 = 0
        ch1 = 0
        in1 = 0
        q1 = 0
    ctx = (H - 1, W - 1, Hk - 1, Wk - 1, W, Wk, C, R, PC, PPC, qbase, kbase, qi0, qj0, q1, di1, dj1, ch1, in1)
    col = tl.arange(0, KB)[None, :]
    # Gather index that shifts a list tile one column to the right.
    shift = tl.maximum(col - 1, 0) + tl.zeros([BLOCK, KB], tl.int32)
    lst = (col, col < K, col == K - 1, shift, K)
    fbase = n * K * M + m  # list slot 0 of each lane; slot j is j * M further
    at = fbase[:, None] + col.to(tl.int64) * M
    on = lane[:, None] & (col < K)
    if LOAD:
        lidx = tl.load(src_idx + at, mask=on, other=-1)
        lcost = tl.load(src_cost + at, mask=on, other=float("inf"))
    else:
        lidx = tl.full([BLOCK, KB], -1, tl.int64)
        lcost = tl.full([BLOCK, KB], float("inf"), tl.float32)
    return g, n, m, lane, qi, qj, ctx, lst, at, on, lidx, lcost


@triton.jit(do_not_specialize=_RUNTIME + ["K0"])
def _init_kernel(
    q_ptr, k_ptr, mask_ptr, table_ptr, nallowed_ptr, init_ptr, dst_idx, dst_cost, qpos_ptr,
    N, H, W, Hk, Wk, C, K, P, M, has_mask, key_lo, key_hi, K0,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr,
    ONE_CHUNK: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    g, n, slot, lane, _, _, ctx, lst, at, on, lidx, lcost = _setup(
        dst_idx, dst_cost, qpos_ptr, N, H, W, Hk, Wk, C, K, P, M, BLOCK, KB, CB, ONE_CHUNK, False, SPARSE
    )
    col = lst[0]
    shift = lst[3]
    Nk = Hk * Wk
    mbase = n * Nk
    nal = tl.load(nallowed_ptr + n, mask=lane, other=Nk)
    # K distinct ranks among the allowed positions, kept sorted: the m-th is drawn below the
    # count not taken yet, then stepped past every taken rank at or below it, in ascending order.
    taken = tl.full([BLOCK, KB], 2147483647, tl.int64)
    for m in range(K):
        r = uniform(key_lo, key_hi, g * K + m, nal - m)
        for s in range(m):
            r += (r >= tl.sum(tl.where(col == s, taken, 0), axis=1)).to(tl.int64)
        pos = tl.sum((taken < r[:, None]).to(tl.int32), axis=1)[:, None]
        taken = tl.where(col < pos, taken, tl.where(col == pos, r[:, None], tl.gather(taken, shift, axis=1)))
    for m in range(K):
        r = tl.sum(tl.where(col == m, taken, 0), axis=1)
        y = tl.load(table_ptr + (mbase + r), mask=lane & (has_mask != 0), other=0).to(tl.int64)
        y = tl.where(has_mask != 0, y, r)
        ki = (y.to(tl.int32) // Wk).to(tl.int64)
        # Allowed by construction: no mask lookup (has_mask = 0).
        lidx, lcost = _offer(
            lidx, lcost, ki, y - ki * Wk, lane, lst, q_ptr, k_ptr, mask_ptr, mbase, 0, ctx,
            DOT, ACC, BLOCK, CB, ONE_CHUNK,
        )  # fmt: skip
    for m in range(K0):
        y = tl.load(init_ptr + ((n * K0 + m) * M + slot), mask=lane, other=-1)
        ok = lane & (y >= 0) & (y < Nk)
        y = tl.where(ok, y, 0)
        ki = (y.to(tl.int32) // Wk).to(tl.int64)
        lidx, lcost = _offer(
            lidx, lcost, ki, y - ki * Wk, ok, lst, q_ptr, k_ptr, mask_ptr, mbase, has_mask, ctx,
            DOT, ACC, BLOCK, CB, ONE_CHUNK,
        )  # fmt: skip
    tl.store(dst_idx + at, lidx, mask=on)
    tl.store(dst_cost + at, lcost, mask=on)


@triton.jit(do_not_specialize=_RUNTIME + ["step", "num_radii"])
def _iterate_kernel(
    q_ptr, k_ptr, mask_ptr, src_idx, src_cost, dst_idx, dst_cost, qpos_ptr, nbr_ptr,
    N, H, W, Hk, Wk, C, K, P, M, has_mask, key_lo, key_hi, step, num_radii,
    DOT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr,
    ONE_CHUNK: tl.constexpr, SPARSE: tl.constexpr,
):  # fmt: skip
    """One jump-flood step at distance ``step`` (0: none), then, when ``num_radii > 0``, the
    random search around each of the ``K`` matches the list holds after it (as the lanes kernels
    do). ``SPARSE``: ``nbr_ptr`` holds, for each direction ``d`` and listed pixel, the list slot
    of its neighbour at this step (-1: not listed), ``(4, M)``."""
    g, n, slot, lane, qi, qj, ctx, lst, at, on, lidx, lcost = _setup(
        src_idx, src_cost, qpos_ptr, N, H, W, Hk, Wk, C, K, P, M, BLOCK, KB, CB, ONE_CHUNK, True, SPARSE
    )
    mbase = n * Hk * Wk
    if step > 0:
        for d in range(4):
            dy, dx, nslot, near = jump_neighbour(d, step, qi, qj, lane, slot, nbr_ptr, H, W, M, SPARSE)
            nat = n * K * M + nslot
            for m in range(K):
                y = tl.load(src_idx + (nat + m * M), mask=near, other=0)
                ki = (y.to(tl.int32) // Wk).to(tl.int64)
                kj = y - ki * Wk - dx
                ki -= dy
                ok = near & (ki >= 0) & (ki < Hk) & (kj >= 0) & (kj < Wk)
                lidx, lcost = _offer(
                    lidx, lcost, ki, kj, ok, lst, q_ptr, k_ptr, mask_ptr, mbase, has_mask, ctx,
                    DOT, ACC, BLOCK, CB, ONE_CHUNK,
                )  # fmt: skip
    col = lst[0]
    start = lidx
    Rmax = tl.maximum(Hk, Wk)
    ctr = g * (2 * K * num_radii)  # two draws (row, column) per window
    for a in range(K * (num_radii > 0)):
        # Windows around the a-th match after propagation: the list shifts as it improves.
        y = tl.sum(tl.where(col == a, start, 0), axis=1)
        br = (y.to(tl.int32) // Wk).to(tl.int64)
        bc = y - br * Wk
        for s in range(num_radii):
            R = Rmax >> s
            lo_r = tl.maximum(br - R, 0)
            lo_c = tl.maximum(bc - R, 0)
            c0 = ctr + 2 * (a * num_radii + s)
            ki = lo_r + uniform(key_lo, key_hi, c0, tl.minimum(br + R, Hk - 1) - lo_r + 1)
            kj = lo_c + uniform(key_lo, key_hi, c0 + 1, tl.minimum(bc + R, Wk - 1) - lo_c + 1)
            lidx, lcost = _offer(
                lidx, lcost, ki, kj, lane, lst, q_ptr, k_ptr, mask_ptr, mbase, has_mask, ctx,
                DOT, ACC, BLOCK, CB, ONE_CHUNK,
            )  # fmt: skip
    tl.store(dst_idx + at, lidx, mask=on)
    tl.store(dst_cost + at, lcost, mask=on)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def launch_config(N: int, C: int, H: int, W: int, patch_size: int, interpreted: bool, shape=None) -> dict:
    """Block sizes of a search: ``BLOCK`` pixels per program and ``CB`` patch values per chunk;
    ``shape``: a ``(BLOCK, CB, warps)`` to launch on a GPU instead of the tuned ones."""
    ppc = patch_size * patch_size * C
    if interpreted:
        block = min(max(_next_pow2(N * H * W), 16), _INTERP_BLOCK_MAX)
        return dict(BLOCK=block, CB=min(_next_pow2(ppc), max(_INTERP_TILE // block, 16)))
    block, cb, warps = shape or (_GPU_SMALL if ppc <= _GPU_SMALL_PATCH else _GPU_LARGE)
    return dict(BLOCK=block, CB=min(_next_pow2(ppc), cb), num_warps=warps)


def run(pb, shape=None):
    """The search of the prepared problem ``pb`` (:class:`.search.Problem`) with these kernels:
    fields ``(N, K, M)`` int64 and float32. ``shape``: see :func:`launch_config`."""
    N, C, H, W, Hk, Wk, K, P, M = pb.N, pb.C, pb.H, pb.W, pb.Hk, pb.Wk, pb.K, pb.P, pb.M
    # Features are read channel-last in their own dtype; mixed dtypes are read in the compute dtype.
    q = channel_last(pb.query, pb.dtype)
    k = channel_last(pb.key, pb.dtype)
    cfg = launch_config(N, C, 1, M, P, pb.interpreted, shape)
    cfg.update(DOT=pb.dot, ACC=pb.acc, KB=max(_next_pow2(K), 2), ONE_CHUNK=P * P * C <= cfg["CB"], SPARSE=pb.sparse)
    grid = (triton.cdiv(N * M, cfg["BLOCK"]),)
    sizes = (N, H, W, Hk, Wk, C, K, P, M, pb.has_mask)
    idx, cost, spare_idx, spare_cost = pb.buffers(torch.int64)
    with cuda_device_of(pb.query):
        _init_kernel[grid](
            q, k, pb.mask_u8, pb.table, pb.n_allowed, pb.init, idx, cost, pb.qpos, *sizes, *launch_key(pb.seed, -1), pb.K0, **cfg
        )
        for step, radii, nbr, key in pb.schedule():
            _iterate_kernel[grid](q, k, pb.mask_u8, idx, cost, spare_idx, spare_cost, pb.qpos, nbr, *sizes, *key, step, radii, **cfg)
            idx, cost, spare_idx, spare_cost = spare_idx, spare_cost, idx, cost
    return idx, cost
