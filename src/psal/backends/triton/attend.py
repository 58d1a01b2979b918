"""Triton attention over a k-NN field: forward and backward, for CUDA tensors.

Same folded contract as ``psal.backends.torch.attend`` (read its docstring for the notation): query
``(N, C, H, W)``, key ``(N, C, Hk, Wk)``, value ``(N, Cv, Hk, Wk)``, indices ``(N, K, H, W)``,
a 0-dim temperature; the heads are already in the batch. On CPU tensors the kernels run through
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the test suite checks them without a GPU.

Scheme. The heavy loops (``C * p * p * K`` per pixel) are Triton kernels; what is ``O(N * K * L)``
(softmax statistics, the temperature gradient) is left to PyTorch, which fuses it well enough.

- ``_costs``: the patch cost of every match, recomputed from the indices.
- ``_votes``: each output pixel ``z`` gathers its own votes (all offsets ``d`` and matches ``j`` of
  the query patches ``x = z - d`` that cover it), so the forward pass writes without atomics.
- ``_score_grad``: ``d loss / d score`` of every match, again by gathering.
- ``_query_grad``: the query gradient on the replicate-padded query map, gathered per padded pixel;
  PyTorch folds the padding back (``replicate_pad_adjoint``).
- Key and value gradients receive from many queries. The default path scatters with float32 (or
  float64) atomics into zero-initialised buffers (``_scatter``); under
  ``torch.use_deterministic_algorithms(True)`` it gathers instead (``_gather``): the matches are
  sorted by key position once (a stable sort, so the summation order is fixed) and every padded key
  position sums its own list.

Layouts: features are made channel-last (``(N, H, W, C)``), so that one gathered key or value
position is ``C`` contiguous values; per-match tensors are ``(N, K, H * W)``. Positions within a
map are int32 (cheaper division on GPUs; dispatch sends only problems with ``K * H * W < 2**31``
here); memory offsets are int64. Positions outside a map are clamped (replicate padding). Everything accumulates in float32 (float64 for float64
inputs); float16/bfloat16 inputs are read as they are.

Sparse queries (``positions``, the pure-PyTorch backend's contract): the forward only. ``_costs``
takes its lanes from the list, and ``_votes`` gives one lane to each listed pixel, reading the list
slot of each covering patch from a ``(p * p, M)`` table (``layout.offset_tables``; -1: not
listed, no vote); the per-pixel max of "patch" is taken over the same table in PyTorch. Their
backward is the pure-PyTorch one (the dispatcher's ``SPARSE_BACKWARD``).

Only the block sizes, the channel chunk (a power of two, with masks), the dtype and the mode are
compile-time constants; sizes, ``K`` and the patch size are run-time arguments excluded from
specialisation, so a new image size or patch size never triggers a recompile.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..device import cuda_device_of, triton_interpreted
from ..layout import channel_last, compute_dtype, offset_tables, replicate_pad_adjoint, vote_counts

_SIZES = ["C", "H", "W", "Hk", "Wk", "K", "P", "N", "M"]


@triton.jit
def _clamp(x, n):
    return tl.minimum(tl.maximum(x, 0), n - 1)


@triton.jit(do_not_specialize=_SIZES)
def _costs(
    q, k, idx, cost, listed, C, H, W, Hk, Wk, K, P, N, M,
    DOT: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """cost[n, j, x] for a block of the flat (n, j, x) lanes (``x``: the ``M`` listed pixels
    ``listed`` when ``SPARSE``, else every pixel)."""
    L = M if SPARSE else H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L  # int64: sizes arrive as int32, their product may not fit
    n = f // (K * L)
    x = (f % L).to(tl.int32)
    if SPARSE:
        x = tl.load(listed + x, mask=on, other=0).to(tl.int32)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(tl.int32)
    yi, yj = y // Wk, y % Wk
    cc = tl.arange(0, CB)
    r = P // 2
    acc = tl.zeros([BLOCK], ACC)
    for a in range(P):
        qrow = (n * H + _clamp(xi + a - r, H)) * W
        krow = (n * Hk + _clamp(yi + a - r, Hk)) * Wk
        for b in range(P):
            qpos = (qrow + _clamp(xj + b - r, W)) * C
            kpos = (krow + _clamp(yj + b - r, Wk)) * C
            for c0 in range(0, C, CB):
                ch = c0 + cc
                m = on[:, None] & (ch < C)[None, :]
                u = tl.load(q + qpos[:, None] + ch[None, :], mask=m, other=0.0).to(ACC)
                v = tl.load(k + kpos[:, None] + ch[None, :], mask=m, other=0.0).to(ACC)
                if DOT:
                    acc -= tl.sum(u * v, axis=1)
                else:
                    d = u - v
                    acc += tl.sum(d * d, axis=1)
    tl.store(cost + f, acc, mask=on)


@triton.jit(do_not_specialize=_SIZES)
def _votes(
    v, idx, logw, shift, out, den_out, listed, tab, C, H, W, Hk, Wk, K, P, N, M,
    PATCH: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """out[n, z, c] = sum over offsets d and matches j of the patch x = z - d (on the map) of
    exp(logw[n, j, x] - shift[n, z]) * v[n, y_j(x) + d, c], divided by the sum of those weights
    ("patch": shift is the per-pixel max) or by the number of patches covering z (otherwise).
    ``SPARSE``: lanes are the ``M`` listed pixels ``listed``, and only listed patches vote: the list
    slot of ``x = z - d`` is ``tab[d, lane]`` (-1: not listed), per-match tensors are ``(N, K, M)``."""
    L = M if SPARSE else H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * L
    n, lane = f // L, (f % L).to(tl.int32)
    if SPARSE:
        z = tl.load(listed + lane, mask=on, other=0).to(tl.int32)
    else:
        z = lane
    zi, zj = z // W, z % W
    ch = tl.program_id(1) * CB + tl.arange(0, CB)
    cm = ch < C
    if PATCH:
        zs = tl.load(shift + n * L + lane, mask=on, other=0.0)
    else:
        zs = tl.zeros([BLOCK], ACC)
    acc = tl.zeros([BLOCK, CB], ACC)
    den = tl.zeros([BLOCK], ACC)
    count = tl.zeros([BLOCK], ACC)
    r = P // 2
    for a in range(P):
        xi = zi - (a - r)
        for b in range(P):
            xj = zj - (b - r)
            if SPARSE:
                slot = tl.load(tab + (a * P + b) * M + lane, mask=on, other=-1)
                real = on & (slot >= 0)
                x = tl.where(real, slot, 0).to(tl.int32)
            else:
                real = on & (xi >= 0) & (xi < H) & (xj >= 0) & (xj < W)
                x = tl.where(real, xi * W + xj, 0)
            count += tl.where(real, 1.0, 0.0)
            for j in range(K):
                row = (n * K + j) * L + x
                y = tl.load(idx + row, mask=real, other=0).to(tl.int32)
                w = tl.exp(tl.load(logw + row, mask=real, other=float("-inf")) - zs)
                w = tl.where(real, w, 0.0)
                kpos = ((n * Hk + _clamp(y // Wk + a - r, Hk)) * Wk + _clamp(y % Wk + b - r, Wk)) * C
                val = tl.load(v + kpos[:, None] + ch[None, :], mask=real[:, None] & cm[None, :], other=0.0)
                acc += w[:, None] * val.to(ACC)
                den += w
    if not PATCH:
        # the number of (listed) query patches covering z, each contributing weights that sum to one
        den = count
    den = tl.where(on, den, 1.0)
    tl.store(out + (n * L + lane)[:, None] * C + ch[None, :], acc / den[:, None], mask=on[:, None] & cm[None, :])
    if PATCH:
        tl.store(den_out + n * L + lane, den, mask=on & (tl.program_id(1) == 0))


@triton.jit(do_not_specialize=_SIZES)
def _score_grad(
    g, v, idx, logw, shift, g0, out, C, H, W, Hk, Wk, K, P, N,
    WEIGHTED: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """out[n, j, x] = sum over offsets d with z = x + d on the map of
    <g[n, z], v[n, y_j(x) + d]> (unweighted), or of exp(logw[n, j, x] - shift[n, z]) *
    (<g[n, z], v[n, y_j(x) + d]> - g0[n, z]) (weighted, the "patch" aggregation)."""
    L = H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L
    n, x = f // (K * L), (f % L).to(tl.int32)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(tl.int32)
    yi, yj = y // Wk, y % Wk
    if WEIGHTED:
        lw = tl.load(logw + f, mask=on, other=0.0)
    cc = tl.arange(0, CB)
    r = P // 2
    acc = tl.zeros([BLOCK], ACC)
    for a in range(P):
        zi = xi + a - r
        krow = (n * Hk + _clamp(yi + a - r, Hk)) * Wk
        for b in range(P):
            zj = xj + b - r
            real = on & (zi >= 0) & (zi < H) & (zj >= 0) & (zj < W)
            z = tl.where(real, zi * W + zj, 0)
            kpos = (krow + _clamp(yj + b - r, Wk)) * C
            dot = tl.zeros([BLOCK], ACC)
            for c0 in range(0, C, CB):
                ch = c0 + cc
                m = real[:, None] & (ch < C)[None, :]
                gz = tl.load(g + (n * L + z)[:, None] * C + ch[None, :], mask=m, other=0.0).to(ACC)
                val = tl.load(v + kpos[:, None] + ch[None, :], mask=m, other=0.0).to(ACC)
                dot += tl.sum(gz * val, axis=1)
            if WEIGHTED:
                zs = tl.load(shift + n * L + z, mask=real, other=0.0)
                go = tl.load(g0 + n * L + z, mask=real, other=0.0)
                acc += tl.where(real, tl.exp(lw - zs) * (dot - go), 0.0)
            else:
                acc += dot
    tl.store(out + f, acc, mask=on)


@triton.jit(do_not_specialize=_SIZES)
def _query_grad(
    q, k, idx, gcost, out, C, H, W, Hk, Wk, K, P, N,
    DOT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The gradient of sum(gcost * cost) for the replicate-padded query map: out[n, u, c] for the
    padded pixel u gathers, over offsets and matches of the patches x = u - d that read it,
    2 gcost (q - k) ("l2") or -gcost k ("dot")."""
    r = P // 2
    Hp, Wp = H + 2 * r, W + 2 * r
    L = H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * Hp * Wp
    n, u = f // (Hp * Wp), (f % (Hp * Wp)).to(tl.int32)
    ui, uj = u // Wp, u % Wp
    ch = tl.program_id(1) * CB + tl.arange(0, CB)
    cm = ch < C
    acc = tl.zeros([BLOCK, CB], ACC)
    sg = tl.zeros([BLOCK], ACC)
    for a in range(P):
        xi = ui - a
        for b in range(P):
            xj = uj - b
            real = on & (xi >= 0) & (xi < H) & (xj >= 0) & (xj < W)
            x = tl.where(real, xi * W + xj, 0)
            for j in range(K):
                row = (n * K + j) * L + x
                y = tl.load(idx + row, mask=real, other=0).to(tl.int32)
                gc = tl.load(gcost + row, mask=real, other=0.0)
                kpos = ((n * Hk + _clamp(y // Wk + a - r, Hk)) * Wk + _clamp(y % Wk + b - r, Wk)) * C
                kv = tl.load(k + kpos[:, None] + ch[None, :], mask=real[:, None] & cm[None, :], other=0.0).to(ACC)
                if DOT:
                    acc -= gc[:, None] * kv
                else:
                    acc -= 2 * gc[:, None] * kv
                    sg += gc
    if not DOT:
        qpos = ((n * H + _clamp(ui - r, H)) * W + _clamp(uj - r, W)) * C
        qv = tl.load(q + qpos[:, None] + ch[None, :], mask=on[:, None] & cm[None, :], other=0.0).to(ACC)
        acc += 2 * sg[:, None] * qv
    tl.store(out + f[:, None] * C + ch[None, :], acc, mask=on[:, None] & cm[None, :])


@triton.jit
def _contribution(
    src, kf, logw, shift, coef, n, j, x, xi, xj, kpos, ok, a, b, r, ch, cm, C, H, W, K, L,
    MODE: tl.constexpr, SHIFT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """What the match j of query pixels x gives, through the offset (a - r, b - r), to the key-side
    gradient at the flat key position kpos (a block of lanes, ``ok`` masks them).

    MODE 0 (value): exp(logw[j, x] - shift[z]) * src[z], z = x + d, nothing when z is off the map.
    MODE 1 (key, "l2"): -2 coef[j, x] (src[clamped z] - kf[kpos]), src the query.
    MODE 2 (key, "dot"): -coef[j, x] * src[clamped z].
    """
    row = (n * K + j) * L + x
    if MODE == 0:
        zi = xi + a - r
        zj = xj + b - r
        ok = ok & (zi >= 0) & (zi < H) & (zj >= 0) & (zj < W)
        z = tl.where(ok, zi * W + zj, 0)
        w = tl.load(logw + row, mask=ok, other=0.0)
        if SHIFT:
            w -= tl.load(shift + n * L + z, mask=ok, other=0.0)
        w = tl.where(ok, tl.exp(w), 0.0)
    else:
        z = _clamp(xi + a - r, H) * W + _clamp(xj + b - r, W)
        w = tl.load(coef + row, mask=ok, other=0.0)
    m = ok[:, None] & cm[None, :]
    s = tl.load(src + (n * L + z)[:, None] * C + ch[None, :], mask=m, other=0.0).to(ACC)
    if MODE == 0:
        return w[:, None] * s
    elif MODE == 1:
        kv = tl.load(kf + kpos[:, None] * C + ch[None, :], mask=m, other=0.0).to(ACC)
        return -2 * w[:, None] * (s - kv)
    else:
        return -w[:, None] * s


@triton.jit(do_not_specialize=_SIZES)
def _scatter(
    src, kf, idx, logw, shift, coef, dst, C, H, W, Hk, Wk, K, P, N,
    MODE: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Key-side gradient by atomics: every (x, j, d) adds its contribution at its clamped key position."""
    L = H * W
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * K * L
    n, j, x = f // (K * L), ((f // L) % K).to(tl.int32), (f % L).to(tl.int32)
    xi, xj = x // W, x % W
    y = tl.load(idx + f, mask=on, other=0).to(tl.int32)
    yi, yj = y // Wk, y % Wk
    ch = tl.program_id(1) * CB + tl.arange(0, CB)
    cm = ch < C
    r = P // 2
    for a in range(P):
        krow = (n * Hk + _clamp(yi + a - r, Hk)) * Wk
        for b in range(P):
            kpos = krow + _clamp(yj + b - r, Wk)
            val = _contribution(src, kf, logw, shift, coef, n, j, x, xi, xj, kpos, on, a, b, r, ch, cm, C, H, W, K, L, MODE, SHIFT, ACC)
            tl.atomic_add(dst + kpos[:, None] * C + ch[None, :], val, mask=on[:, None] & cm[None, :], sem="relaxed")


@triton.jit(do_not_specialize=_SIZES)
def _gather(
    src, kf, rowptr, order, logw, shift, coef, dst, C, H, W, Hk, Wk, K, P, N,
    MODE: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Key-side gradient without atomics, on the padded key map: the padded position u sums, for
    every offset d, the contributions of the matches of key position y = u - d - r, read from the
    list of such matches (``order[rowptr[y]:rowptr[y + 1]]``, sorted, so the order is fixed)."""
    r = P // 2
    Hp, Wp = Hk + 2 * r, Wk + 2 * r
    L = H * W
    Nk = Hk * Wk
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = f < N.to(tl.int64) * Hp * Wp
    n, u = f // (Hp * Wp), (f % (Hp * Wp)).to(tl.int32)
    ui, uj = u // Wp, u % Wp
    kpos = n * Nk + _clamp(ui - r, Hk) * Wk + _clamp(uj - r, Wk)
    ch = tl.program_id(1) * CB + tl.arange(0, CB)
    cm = ch < C
    acc = tl.zeros([BLOCK, CB], ACC)
    for a in range(P):
        yi = ui - a
        for b in range(P):
            yj = uj - b
            has = on & (yi >= 0) & (yi < Hk) & (yj >= 0) & (yj < Wk)
            y = n * Nk + tl.where(has, yi * Wk + yj, 0)
            start = tl.load(rowptr + y, mask=has, other=0)
            count = tl.load(rowptr + y + 1, mask=has, other=0) - start
            # Each program runs to the longest list among its own lanes, not the map's longest.
            longest = tl.max(count, axis=0)
            for t in range(0, longest):
                ok = has & (t < count)
                e = tl.load(order + start + t, mask=ok, other=0).to(tl.int32)
                j = e // L
                x = e % L
                acc += _contribution(
                    src, kf, logw, shift, coef, n, j, x, x // W, x % W, kpos, ok, a, b, r, ch, cm, C, H, W, K, L, MODE, SHIFT, ACC
                )
    tl.store(dst + f[:, None] * C + ch[None, :], acc, mask=on[:, None] & cm[None, :])


# ----------------------------------------------------------------------------------------------
# Launch helpers.


def _acc(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _tiles(lanes: int, channels: int) -> dict:
    """``BLOCK`` lanes x ``CB`` channels per program, and the warps to run them.

    GPU: about two tile elements per thread. ptxas (sm_90a, Triton 3.6) needs roughly 28 registers
    per tile element per thread in these kernels: a 64 x 64 tile on 4 warps used all 255 and
    spilled kilobytes, 16 x 64 on 16 warps uses 64-83 and spills at most 20 bytes (compiled here,
    not yet timed on a device). Interpreter: programs run one after another and every op costs
    Python overhead whatever its size, so one large block does all the work.
    """
    cb = triton.next_power_of_2(max(channels, 1))
    if triton_interpreted():
        return dict(BLOCK=min(triton.next_power_of_2(max(lanes, 1)), 8192), CB=min(cb, 256))
    cb = min(cb, 64)
    block = max(16, min(128, 1024 // cb))
    return dict(BLOCK=block, CB=cb, num_warps=max(1, min(16, block * cb // 64)))


def _first(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Channel-last ``(N, H * W * C)``-shaped storage -> ``(N, C, H, W)``."""
    N = x.shape[0]
    return x.view(N, H, W, -1).permute(0, 3, 1, 2)


class _Call:
    """Shapes, layouts and the costs of one forward or backward call."""

    def __init__(self, query, key, value, indices, temperature, patch_size, similarity, positions=None):
        self.dt = compute_dtype(query.dtype)
        self.acc = _acc(self.dt)
        self.N, self.K = indices.shape[:2]
        self.H, self.W = query.shape[-2:]
        self.positions = positions
        self.L = self.H * self.W if positions is None else positions.numel()
        self.qpos = indices if positions is None else positions.contiguous()  # (a dummy pointer when dense)
        self.C, self.Cv = query.shape[1], value.shape[1]
        self.Hk, self.Wk = key.shape[-2:]
        self.p, self.r = patch_size, patch_size // 2
        self.dot = similarity == "dot"
        self.q, self.k, self.v = channel_last(query), channel_last(key), channel_last(value)
        self.idx = indices.reshape(self.N, self.K, self.L).contiguous()
        self.T = temperature.to(self.dt)
        self.lanes = self.N * self.K * self.L  # one lane per match
        self.cost = torch.empty(self.N, self.K, self.L, device=query.device, dtype=self.dt)
        t = _tiles(self.lanes, self.C)
        _costs[(triton.cdiv(self.lanes, t["BLOCK"]),)](
            self.q, self.k, self.idx, self.cost, self.qpos, *self.sizes_m(self.C), DOT=self.dot, SPARSE=positions is not None,
            ACC=self.acc, **t,
        )  # fmt: skip
        self.s = -self.cost / self.T

    def sizes(self, C, p=None):
        return (C, self.H, self.W, self.Hk, self.Wk, self.K, self.p if p is None else p, self.N)

    def sizes_m(self, C, p=None):
        """:meth:`sizes` and the number of listed pixels ``M`` (the sparse-aware kernels')."""
        return (*self.sizes(C, p), self.L)

    def listed_tables(self, p: int) -> torch.Tensor:
        """``(p * p, M)``: for offset ``(a, b)`` (row ``a * p + b``), the list slot of the patch
        ``x = z - (a - r, b - r)`` of each listed pixel ``z``, -1 where it is not listed."""
        r = p // 2
        moves = [(r - a, r - b) for a in range(p) for b in range(p)]
        return offset_tables(self.positions, self.H, self.W, moves).contiguous()

    def votes(self, logw, shift, p: int, patch: bool, tab=None):
        """``_votes`` -> out ``(N, Cv, H, W)`` (``(N, Cv, M)`` with the sparse ``tab`` of
        :meth:`listed_tables`) and, for "patch", the weight sums ``(N, L)``."""
        N, L, Cv = self.N, self.L, self.Cv
        out = torch.empty(N, L, Cv, device=logw.device, dtype=self.dt)
        den = torch.empty(N, L, device=logw.device, dtype=self.dt) if patch else out
        t = _tiles(N * L, Cv)
        _votes[(triton.cdiv(N * L, t["BLOCK"]), triton.cdiv(Cv, t["CB"]))](
            # one lane per output pixel
            self.v, self.idx, logw, logw if shift is None else shift, out, den, self.qpos, self.qpos if tab is None else tab,
            *self.sizes_m(Cv, p), PATCH=patch, SPARSE=tab is not None, ACC=self.acc, **t,
        )  # fmt: skip
        if tab is not None:
            return out.transpose(1, 2), den
        return _first(out, self.H, self.W), den

    def score_grad(self, g, p: int, logw=None, shift=None, g0=None):
        out = torch.empty_like(self.cost)
        weighted = logw is not None
        dummy = self.cost
        t = _tiles(self.lanes, self.Cv)
        _score_grad[(triton.cdiv(self.lanes, t["BLOCK"]),)](
            g, self.v, self.idx, dummy if logw is None else logw, dummy if shift is None else shift,
            dummy if g0 is None else g0, out, *self.sizes(self.Cv, p),
            WEIGHTED=weighted, ACC=self.acc, **t,
        )  # fmt: skip
        return out

    @functools.cached_property
    def matches_by_key(self):
        """``(rowptr, order)``, the deterministic path's inverse field, computed once per call.

        The matches of each map sorted by key position (stable: ties keep their (j, x) order),
        and where each key position's list starts; the value and key gradients share them.
        """
        N, Hk, Wk, K, L = self.N, self.Hk, self.Wk, self.K, self.L
        keys = (self.idx + torch.arange(N, device=self.idx.device).view(N, 1, 1) * (Hk * Wk)).reshape(-1)
        sorted_keys, order = torch.sort(keys, stable=True)
        bounds = torch.arange(N * Hk * Wk + 1, device=keys.device, dtype=sorted_keys.dtype)
        return torch.searchsorted(sorted_keys, bounds), order % (K * L)

    def key_side(self, src, p: int, mode: int, logw=None, shift=None, coef=None):
        """Gradient for the key map (mode 1, 2) or the value map (mode 0), ``(N, C, Hk, Wk)``."""
        N, Hk, Wk = self.N, self.Hk, self.Wk
        C = src.shape[-1]
        dummy = self.cost
        args = (dummy if logw is None else logw, dummy if shift is None else shift, dummy if coef is None else coef)
        flags = dict(MODE=mode, SHIFT=shift is not None, ACC=self.acc)
        if not torch.are_deterministic_algorithms_enabled():
            dst = torch.zeros(N, Hk * Wk, C, device=src.device, dtype=self.dt)
            t = _tiles(self.lanes, C)
            _scatter[(triton.cdiv(self.lanes, t["BLOCK"]), triton.cdiv(C, t["CB"]))](
                src, self.k, self.idx, *args, dst, *self.sizes(C, p), **flags, **t
            )
            return _first(dst, Hk, Wk)
        rowptr, order = self.matches_by_key
        r = p // 2
        Hp, Wp = Hk + 2 * r, Wk + 2 * r
        dst = torch.empty(N, Hp * Wp, C, device=src.device, dtype=self.dt)
        t = _tiles(N * Hp * Wp, C)
        _gather[(triton.cdiv(N * Hp * Wp, t["BLOCK"]), triton.cdiv(C, t["CB"]))](
            src, self.k, rowptr, order, *args, dst, *self.sizes(C, p), **flags, **t
        )
        return replicate_pad_adjoint(_first(dst, Hp, Wp), r)


# ----------------------------------------------------------------------------------------------
# The backend contract.


def attend_forward(query, key, value, indices, temperature, patch_size: int, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, H, W)`` and the statistic ``(N, H, W)``, both in the compute dtype (``(N,
    Cv, M)`` and ``(N, M)`` for sparse ``positions (M,)``: the pure-PyTorch backend's sparse
    contract; their backward is the pure-PyTorch one, ``psal._dispatch.SPARSE_BACKWARD``)."""
    with cuda_device_of(query):
        if positions is not None:
            return _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions)
        return _attend_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity)


def _sparse_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity, positions):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity, positions)
    p = 1 if aggregation == "center" else f.p
    tab = f.listed_tables(p)  # (p * p, M)
    if aggregation == "patch":
        best = f.s.amax(1)  # (N, M)
        m = torch.full_like(best, float("-inf"))
        for row in tab:  # the max over the listed patches covering each listed pixel
            m = torch.maximum(m, torch.where(row >= 0, best[:, row.clamp(min=0)], float("-inf")))
        out, den = f.votes(f.s, m.contiguous(), p, patch=True, tab=tab)
        return out, m + torch.log(den)
    lse = torch.logsumexp(f.s, 1)  # (N, M)
    out, _ = f.votes((f.s - lse[:, None]).contiguous(), None, p, patch=False, tab=tab)
    return out, lse


def _attend_forward(query, key, value, indices, temperature, patch_size, aggregation, similarity):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity)
    N, K, H, W = f.N, f.K, f.H, f.W
    if aggregation == "patch":
        s4 = f.s.view(N, K, H, W)
        m = F.max_pool2d(s4.amax(1, keepdim=True), f.p, 1, f.r)[:, 0].reshape(N, f.L)
        out, den = f.votes(f.s, m.contiguous(), f.p, patch=True)
        return out, (m + torch.log(den)).view(N, H, W)
    lse = torch.logsumexp(f.s, 1)  # (N, L)
    p = 1 if aggregation == "center" else f.p
    out, _ = f.votes((f.s - lse[:, None]).contiguous(), None, p, patch=False)
    return out, lse.view(N, H, W)


def attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size: int, aggregation: str, similarity: str):
    """Gradients ``(query, key, value, temperature)``, in the compute dtype."""
    with cuda_device_of(query):
        return _attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity)


def _attend_backward(grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation, similarity):
    f = _Call(query, key, value, indices, temperature, patch_size, similarity)
    N, H, W, L = f.N, f.H, f.W, f.L
    dt = f.dt
    stat = stat.to(dt).reshape(N, L)
    if aggregation == "patch":
        g = channel_last(grad)
        g0 = (grad.to(dt) * out.to(dt)).sum(1).reshape(N, L).contiguous()
        s, log_den = f.s.contiguous(), stat.contiguous()
        gs = f.score_grad(g, f.p, logw=s, shift=log_den, g0=g0)
        gv = f.key_side(g, f.p, 0, logw=s, shift=log_den)
    else:
        p = 1 if aggregation == "center" else f.p
        g = grad.to(dt)
        if aggregation == "patch_mean":
            g = g / vote_counts(H, W, p, g.device, dt)
        g = channel_last(g)
        logw = (f.s - stat[:, None]).contiguous()
        w = torch.exp(logw)
        dots = f.score_grad(g, p)
        gs = w * (dots - (w * dots).sum(1, keepdim=True))
        gv = f.key_side(g, p, 0, logw=logw)
    # s = -cost / T: d s / d cost = -1 / T and d s / d T = cost / T^2.
    gT = (gs * f.cost).sum() / f.T.square()
    gcost = (-gs / f.T).contiguous()
    r = f.r
    Hp, Wp = H + 2 * r, W + 2 * r
    gq = torch.empty(N, Hp * Wp, f.C, device=gcost.device, dtype=dt)
    t = _tiles(N * Hp * Wp, f.C)
    _query_grad[(triton.cdiv(N * Hp * Wp, t["BLOCK"]), triton.cdiv(f.C, t["CB"]))](
        f.q, f.k, f.idx, gcost, gq, *f.sizes(f.C), DOT=f.dot, ACC=f.acc, **t
    )
    gq = replicate_pad_adjoint(_first(gq, Hp, Wp), r)
    gk = f.key_side(f.q, f.p, 2 if f.dot else 1, coef=gcost)
    return gq, gk, gv, gT
