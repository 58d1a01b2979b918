"""Pure-PyTorch attention over a k-NN field: forward and an explicit backward, on any device.

Works on folded maps (heads in the batch, see ``psal.backends.torch.search``): query ``(N, C, H, W)``, key
``(N, C, Hk, Wk)``, value ``(N, Cv, Hk, Wk)``, indices ``(N, K, H, W)`` int64 and a 0-dim
temperature tensor. Inputs are trusted: ``psal.functional`` has validated them.

Notation (``PSAL.md``): ``s_j(x) = -cost_j(x) / T``; ``e = exp(s)``; ``w = softmax_j(s)``. A vote
of query patch ``x`` with offset ``d`` lands on pixel ``z = x + d`` and carries the value at
``y_j(x) + d`` (replicate padded). Votes that would land outside the query map are dropped.

Forward returns the output and one statistic per query pixel, from which the backward rebuilds
every weight without storing any: ``logsumexp_j s_j(x)`` for ``"center"`` and ``"patch_mean"``,
``log D(z)`` (the log of the vote normaliser) for ``"patch"``. The backward recomputes the costs
from the indices one offset at a time, so memory stays at a few ``(N, C, H * W)`` slices: the
``p * p * K`` copies of the features that autograd through an unfold would keep never exist.
Many query pixels write into one key position; ``index_add_`` accumulates them, which is
deterministic on CPU and under ``torch.use_deterministic_algorithms(True)`` on CUDA.

Sparse queries (``positions``, ``(M,)`` ascending flat query pixels): indices are ``(N, K, M)``,
the output ``(N, Cv, M)`` and the statistic ``(N, M)``. Only listed patches exist: a listed pixel
takes the votes of the listed patches that cover it (the others cast none), so where every
covering patch is listed the result is the dense one. Offsets are followed through neighbour
tables (``layout.neighbour_table``) instead of shifted views.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from ..layout import compute_dtype, offset_tables, replicate_pad_adjoint, vote_counts
from .search import PatchCosts


class _Field:
    """Shared set-up of forward and backward: costs, scores and gather positions of one call."""

    def __init__(self, query, key, value, indices, temperature, patch_size, similarity, positions=None):
        dt = compute_dtype(query.dtype)
        self.dt = dt
        self.p, self.r = patch_size, patch_size // 2
        self.N, self.K = indices.shape[:2]
        self.H, self.W = query.shape[-2:]
        self.positions = positions
        self.L = self.H * self.W if positions is None else positions.numel()
        self.Hk, self.Wk = key.shape[-2:]
        self.T = temperature.to(dt)
        self.idx = indices.reshape(self.N, self.K, self.L)
        self.costs = PatchCosts(query, key, patch_size, similarity, positions)
        self.cost = self.costs(self.idx)  # (N, K, L)
        self.s = -self.cost / self.T
        self.value = value.to(dt)
        self.Cv = value.shape[1]

    def padded_value(self):
        """Replicate-padded value ``(N, Cv, (Hk + 2r) * (Wk + 2r))`` and the padded patch corners."""
        r = self.r
        vp = F.pad(self.value, (r, r, r, r), mode="replicate") if r else self.value
        Wkp = vp.shape[-1]
        corner = (self.idx // self.Wk) * Wkp + self.idx % self.Wk  # (N, K, L)
        return vp.flatten(2), Wkp, corner

    def gather(self, flat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``flat (N, C, M)`` read at ``pos (N, L)`` -> ``(N, C, L)``."""
        N, C = flat.shape[:2]
        return flat.gather(2, pos[:, None, :].expand(N, C, pos.shape[-1]))

    def listed(self, dy: int, dx: int):
        """Sparse queries: for each listed pixel, the list slot of the pixel at ``(+dy, +dx)``
        (clamped to 0 where there is none) and whether there is one, ``(L,)`` each. The tables
        of every offset within the patch radius are built at the first call, in one search."""
        if not hasattr(self, "_tables"):
            r = self.r
            moves = [(a, b) for a in range(-r, r + 1) for b in range(-r, r + 1)]
            self._tables = dict(zip(moves, offset_tables(self.positions, self.H, self.W, moves)))
        at = self._tables[dy, dx]
        return at.clamp(min=0), at >= 0


def _index_add(acc: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> None:
    """``acc (N, M, C)`` += ``src (N, C, L)`` at rows ``pos (N, L)``, deterministically."""
    N, M, C = acc.shape
    rows = (pos + torch.arange(N, device=pos.device)[:, None] * M).reshape(-1)
    acc.view(N * M, C).index_add_(0, rows, src.transpose(1, 2).reshape(-1, C))


def _shift(x: torch.Tensor, a: int, b: int, H: int, W: int) -> torch.Tensor:
    return x[..., a : a + H, b : b + W]


def attend_forward(query, key, value, indices, temperature, patch_size: int, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, H, W)`` and the statistic ``(N, H, W)``, both in the compute dtype
    (``(N, Cv, M)`` and ``(N, M)`` for sparse ``positions``)."""
    f = _Field(query, key, value, indices, temperature, patch_size, similarity, positions)
    N, K, H, W, L, Cv, p, r = f.N, f.K, f.H, f.W, f.L, f.Cv, f.p, f.r
    if aggregation == "center":
        lse = torch.logsumexp(f.s, 1)  # (N, L)
        w = torch.exp(f.s - lse[:, None])
        vflat = f.value.flatten(2)
        out = f.value.new_zeros(N, Cv, L)
        for j in range(K):
            out += w[:, None, j] * f.gather(vflat, f.idx[:, j])
        if positions is not None:
            return out, lse
        return out.view(N, Cv, H, W), lse.view(N, H, W)
    if positions is not None:
        return _listed_forward(f, aggregation)

    vpf, Wkp, corner = f.padded_value()
    pad = (r, r, r, r)
    cornerp = F.pad(corner.view(N, K, H, W), pad)  # any valid position where no query patch is
    out = f.value.new_zeros(N, Cv, H, W)
    if aggregation == "patch":
        sp = F.pad(f.s.view(N, K, H, W), pad, value=float("-inf"))
        m = F.max_pool2d(f.s.view(N, K, H, W).amax(1, keepdim=True), p, 1, r)[:, 0]  # (N, H, W)
        den = f.value.new_zeros(N, H, W)
        weights = None
    else:  # patch_mean
        lse = torch.logsumexp(f.s, 1)
        wp = F.pad(torch.exp(f.s - lse[:, None]).view(N, K, H, W), pad)
    inside = F.pad(out.new_ones(1, 1, H, W, dtype=torch.bool), pad)  # padded map of real pixels
    for a in range(p):
        for b in range(p):
            # Votes landing on z come from x = z - d, d = (a - r, b - r): padded x = z + p - 1 - (a, b).
            ca = _shift(cornerp, p - 1 - a, p - 1 - b, H, W).reshape(N, K, L) + (a * Wkp + b)
            # Where x is off the map there is no vote: skip it, rather than add 0 * (a value).
            real = _shift(inside, p - 1 - a, p - 1 - b, H, W).reshape(1, 1, L)
            if aggregation == "patch":
                weights = torch.exp(_shift(sp, p - 1 - a, p - 1 - b, H, W) - m[:, None])
                den += weights.sum(1)
            else:
                weights = _shift(wp, p - 1 - a, p - 1 - b, H, W)
            for j in range(K):
                vote = torch.where(real, f.gather(vpf, ca[:, j]), 0)
                out += weights[:, None, j] * vote.view(N, Cv, H, W)
    if aggregation == "patch":
        return out / den[:, None], m + torch.log(den)
    n = vote_counts(H, W, p, out.device, out.dtype)
    return out / n, lse.view(N, H, W)


def attend_backward(
    grad, query, key, value, indices, temperature, out, stat, patch_size: int, aggregation: str, similarity: str, positions=None
):
    """Gradients ``(query, key, value, temperature)``, in the compute dtype."""
    f = _Field(query, key, value, indices, temperature, patch_size, similarity, positions)
    N, K, H, W, L, Cv, p, r = f.N, f.K, f.H, f.W, f.L, f.Cv, f.p, f.r
    dt = f.dt
    g = grad.to(dt)
    gs = torch.zeros_like(f.s)  # d loss / d s, (N, K, L)
    pad = (r, r, r, r)

    if positions is not None and aggregation != "center":
        gs, gv = _listed_backward(f, g, out.to(dt), stat.to(dt), aggregation)
    elif aggregation == "center":
        w = torch.exp(f.s - stat.to(dt).reshape(N, 1, L))
        vflat = f.value.flatten(2)
        gflat = g.reshape(N, Cv, L)
        gv = f.value.new_zeros(N, f.Hk * f.Wk, Cv)
        for j in range(K):
            gs[:, j] = (gflat * f.gather(vflat, f.idx[:, j])).sum(1)
            _index_add(gv, f.idx[:, j], w[:, None, j] * gflat)
        gs = w * (gs - (w * gs).sum(1, keepdim=True))
        gv = gv.transpose(1, 2).reshape(N, Cv, f.Hk, f.Wk)
    else:
        vpf, Wkp, corner = f.padded_value()
        gvp = f.value.new_zeros(N, vpf.shape[-1], Cv)
        if aggregation == "patch":
            # gs_j(x) = sum_d e_j(x) / D(z) <g(z), v(y_j + d) - out(z)>, z = x + d.
            gp = F.pad(g, pad)
            gop = F.pad((g * out.to(dt)).sum(1), pad)
            logDp = F.pad(stat.to(dt), pad, value=float("inf"))
        else:
            # patch_mean: out(z) = sum_d sum_j w_j(x) v(y_j + d) / n(z).
            w = torch.exp(f.s - stat.to(dt).reshape(N, 1, L))
            gp = F.pad(g / vote_counts(H, W, p, g.device, dt), pad)
        inside = F.pad(g.new_ones(1, 1, H, W, dtype=torch.bool), pad)
        for a in range(p):
            for b in range(p):
                gz = _shift(gp, a, b, H, W).reshape(N, Cv, L)  # g at z = x + d, zero outside
                real = _shift(inside, a, b, H, W).reshape(1, 1, L)  # is there a pixel z?
                if aggregation == "patch":
                    goz = _shift(gop, a, b, H, W).reshape(N, 1, L)
                    coef = torch.exp(f.s - _shift(logDp, a, b, H, W).reshape(N, 1, L))  # e_j(x) / D(z)
                for j in range(K):
                    pos = corner[:, j] + (a * Wkp + b)
                    dotv = (gz * torch.where(real, f.gather(vpf, pos), 0)).sum(1)
                    if aggregation == "patch":
                        gs[:, j] += coef[:, j] * (dotv - goz[:, 0])
                        _index_add(gvp, pos, coef[:, None, j] * gz)
                    else:
                        gs[:, j] += dotv
                        _index_add(gvp, pos, w[:, None, j] * gz)
        if aggregation == "patch_mean":
            gs = w * (gs - (w * gs).sum(1, keepdim=True))
        Hkp, Wkp_ = f.Hk + 2 * r, f.Wk + 2 * r
        gv = replicate_pad_adjoint(gvp.transpose(1, 2).reshape(N, Cv, Hkp, Wkp_), r)

    # s = -cost / T: d s / d cost = -1 / T and d s / d T = cost / T^2.
    gT = (gs * f.cost).sum() / f.T.square()
    gcost = -gs / f.T
    gq, gk = _cost_backward(f, gcost)
    return gq, gk, gv, gT


def _cost_backward(f: _Field, gcost: torch.Tensor):
    """Gradients of ``sum(gcost * cost)`` with respect to query and key, offset by offset."""
    pc = f.costs
    N, K, H, W, L, p, r = f.N, f.K, f.H, f.W, f.L, f.p, f.r
    C = pc.qp.shape[1]
    corner = (f.idx // f.Wk) * pc.Wkp + f.idx % f.Wk  # (N, K, L) in the padded key
    gqp = torch.zeros_like(pc.qp)
    gkp = pc.qp.new_zeros(N, pc.kflat.shape[-1], C)
    if f.positions is not None:
        gq_flat = pc.qp.new_zeros(N, gqp[0, 0].numel(), C)
    for a in range(p):
        for b in range(p):
            qwin = pc._query(a, b).reshape(N, C, L)
            gq_acc = torch.zeros_like(qwin)
            for j in range(K):
                pos = corner[:, j] + (a * pc.Wkp + b)
                kk = f.gather(pc.kflat, pos)
                gj = gcost[:, None, j]
                if pc.dot:
                    gq_acc -= gj * kk
                    _index_add(gkp, pos, -gj * qwin)
                else:
                    t = 2 * gj * (qwin - kk)
                    gq_acc += t
                    _index_add(gkp, pos, -t)
            if f.positions is None:
                _shift(gqp, a, b, H, W).add_(gq_acc.view(N, C, H, W))
            else:
                qcorner = typing.cast(torch.Tensor, pc.qcorner)  # sparse: set by PatchCosts
                _index_add(gq_flat, (qcorner + (a * pc.qp.shape[-1] + b)).expand(N, L), gq_acc)
    if f.positions is not None:
        gqp = gq_flat.transpose(1, 2).reshape(gqp.shape)
    Hkp = f.Hk + 2 * r
    gk = gkp.transpose(1, 2).reshape(N, C, Hkp, pc.Wkp)
    return replicate_pad_adjoint(gqp, r), replicate_pad_adjoint(gk, r)


# ----------------------------------------------------------------------------------------------
# Sparse queries: "patch" and "patch_mean" over listed patches only.


def _listed_votes(f: _Field):
    """For each patch offset ``d = (a - r, b - r)``: the list slot of the patch ``x = z - d`` that
    votes on each listed pixel ``z`` with that offset, whether it is listed, and the padded-value
    offset of the vote."""
    r, Wkp = f.r, f.Wk + 2 * f.r
    for a in range(f.p):
        for b in range(f.p):
            src, real = f.listed(r - a, r - b)
            yield src, real, a * Wkp + b


def _listed_forward(f: _Field, aggregation: str):
    N, K, L, Cv = f.N, f.K, f.L, f.Cv
    vpf, _, corner = f.padded_value()
    out = f.value.new_zeros(N, Cv, L)
    count = f.value.new_zeros(L)
    if aggregation == "patch":
        m = torch.full((N, L), float("-inf"), dtype=f.dt, device=out.device)
        for src, real, _ in _listed_votes(f):
            m = torch.maximum(m, torch.where(real, f.s[:, :, src].amax(1), float("-inf")))
        den = f.value.new_zeros(N, L)
    else:
        lse = torch.logsumexp(f.s, 1)
        w = torch.exp(f.s - lse[:, None])
    for src, real, offset in _listed_votes(f):
        if aggregation == "patch":
            weights = torch.where(real, torch.exp(f.s[:, :, src] - m[:, None]), 0)
            den += weights.sum(1)
        else:
            weights = torch.where(real, w[:, :, src], 0)
            count += real
        for j in range(K):
            vote = torch.where(real, f.gather(vpf, corner[:, j, src] + offset), 0)
            out += weights[:, None, j] * vote
    if aggregation == "patch":
        return out / den[:, None], m + torch.log(den)
    return out / count, lse


def _listed_backward(f: _Field, g: torch.Tensor, out: torch.Tensor, stat: torch.Tensor, aggregation: str):
    """``(gs, gv)`` of the sparse "patch"/"patch_mean" aggregation; ``g``, ``out`` ``(N, Cv, L)``."""
    N, K, L, Cv, r = f.N, f.K, f.L, f.Cv, f.r
    vpf, Wkp, corner = f.padded_value()
    gvp = f.value.new_zeros(N, vpf.shape[-1], Cv)
    gs = torch.zeros_like(f.s)
    if aggregation == "patch":
        go = (g * out).sum(1)  # (N, L)
    else:
        w = torch.exp(f.s - stat[:, None])
        count = f.value.new_zeros(L)
        for _, real, _ in _listed_votes(f):
            count += real
        g = g / count
    for a in range(f.p):
        for b in range(f.p):
            # Patch x votes on z = x + d, d = (a - r, b - r), when z is listed.
            dst, real = f.listed(a - r, b - r)
            gz = torch.where(real, g[:, :, dst], 0)  # (N, Cv, L)
            if aggregation == "patch":
                coef = torch.where(real, torch.exp(f.s - stat[:, None, dst]), 0)  # e_j(x) / D(z)
                goz = go[:, None, dst]
            for j in range(K):
                pos = corner[:, j] + (a * Wkp + b)
                dotv = (gz * f.gather(vpf, pos)).sum(1)
                if aggregation == "patch":
                    gs[:, j] += coef[:, j] * (dotv - goz[:, 0])
                    _index_add(gvp, pos, coef[:, None, j] * gz)
                else:
                    gs[:, j] += torch.where(real, dotv, 0)
                    _index_add(gvp, pos, w[:, None, j] * gz)
    if aggregation == "patch_mean":
        gs = w * (gs - (w * gs).sum(1, keepdim=True))
    Hkp = f.Hk + 2 * r
    gv = replicate_pad_adjoint(gvp.transpose(1, 2).reshape(N, Cv, Hkp, Wkp), r)
    return gs, gv
