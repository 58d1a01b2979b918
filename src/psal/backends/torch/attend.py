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

from ..layout import as_volume, compute_dtype, offset_tables, replicate_pad, replicate_pad_adjoint, vote_counts
from .search import ClampedReads, PatchCosts


class _Field:
    """Shared set-up of forward and backward: costs, scores and gather positions of one call,
    on maps or volumes alike (a map is a volume of one frame)."""

    def __init__(self, query, key, value, indices, temperature, patch_size, similarity, positions=None, clamped=False):
        dt = compute_dtype(query.dtype)
        self.dt = dt
        # clamped (the forward over sparse queries): maps read in place, no padded copies
        self.costs = PatchCosts(query, key, patch_size, similarity, positions, clamped=clamped)
        g = self.costs.g
        self.g = g
        self.patch, self.radii = g.patch, g.radii
        self.N, self.K = indices.shape[:2]
        self.dims = g.dims
        self.spatial = tuple(query.shape[2:])
        self.positions = positions
        self.L = g.T * g.H * g.W if positions is None else positions.numel()
        self.T = temperature.to(dt)
        self.idx = indices.reshape(self.N, self.K, self.L)
        self.cost = self.costs(self.idx)  # (N, K, L)
        self.s = -self.cost / self.T
        self.value = as_volume(value).to(dt)
        self.Cv = value.shape[1]

    def padded_value(self):
        """Replicate-padded value ``(N, Cv, padded key)`` and the padded patch corners ``(N, K, L)``."""
        vp = replicate_pad(self.value, self.radii)
        return vp.flatten(2), self.g.key_corner(self.idx)

    def value_reads(self):
        """The value as read by the votes: ``(N, Cv, key)`` flat and a function of the patch
        offset giving the flat positions ``(N, K, L)`` of every match's value at that offset
        (clamped coordinates on the value itself when the costs are read clamped, else the
        replicate-padded copy of :meth:`padded_value`)."""
        if self.costs.clamped:
            return self.value.flatten(2), ClampedReads(self.idx, self.g.kdims, self.patch).at
        vpf, corner = self.padded_value()
        return vpf, lambda a, b, c: corner + self.g.key_step(a, b, c)

    def gather(self, flat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``flat (N, C, M)`` read at ``pos (N, L)`` -> ``(N, C, L)``."""
        N, C = flat.shape[:2]
        return flat.gather(2, pos[:, None, :].expand(N, C, pos.shape[-1]))

    def listed(self, move):
        """Sparse queries: for each listed pixel, the list slot of the pixel at ``+move`` (a
        ``(dt, dy, dx)``; clamped to 0 where there is none) and whether there is one, ``(L,)``
        each. The tables of every move within the patch radius are built at the first call, in
        one search."""
        if not hasattr(self, "_tables"):
            rt, rh, rw = self.radii
            moves = [(a, b, c) for a in range(-rt, rt + 1) for b in range(-rh, rh + 1) for c in range(-rw, rw + 1)]
            # int32: half the memory of the tables, which are the largest thing sparse votes keep
            self._tables = dict(zip(moves, offset_tables(self.positions, self.dims, moves, torch.int32)))
        at = self._tables[tuple(move)]
        return at.clamp(min=0).long(), at >= 0


def _index_add(acc: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> None:
    """``acc (N, M, C)`` += ``src (N, C, L)`` at rows ``pos (N, L)``, deterministically."""
    N, M, C = acc.shape
    rows = (pos + torch.arange(N, device=pos.device)[:, None] * M).reshape(-1)
    acc.view(N * M, C).index_add_(0, rows, src.transpose(1, 2).reshape(-1, C))


def _shift(x: torch.Tensor, start, dims) -> torch.Tensor:
    """The window of the last three dimensions of ``x`` at ``start``, of size ``dims``."""
    (a, b, c), (T, H, W) = start, dims
    return x[..., a : a + T, b : b + H, c : c + W]


def _pad(x: torch.Tensor, radii, value=0.0) -> torch.Tensor:
    """Constant padding of the last three dimensions by ``radii = (rt, rh, rw)``."""
    rt, rh, rw = radii
    return F.pad(x, (rw, rw, rh, rh, rt, rt), value=value)


def _mirror(f: _Field, off):
    """Padded start of the patch ``x = z - d`` that votes on ``z`` with offset ``d = off - r``."""
    return tuple(p - 1 - o for p, o in zip(f.patch, off))


def attend_forward(query, key, value, indices, temperature, patch_size, aggregation: str, similarity: str, positions=None):
    """``out (N, Cv, *S)`` and the statistic ``(N, *S)``, both in the compute dtype, ``S`` the
    query's spatial shape (``(N, Cv, M)`` and ``(N, M)`` for sparse ``positions``)."""
    f = _Field(query, key, value, indices, temperature, patch_size, similarity, positions, clamped=positions is not None)
    N, K, L, Cv, dims, radii = f.N, f.K, f.L, f.Cv, f.dims, f.radii
    if aggregation == "center":
        lse = torch.logsumexp(f.s, 1)  # (N, L)
        w = torch.exp(f.s - lse[:, None])
        vflat = f.value.flatten(2)
        out = f.value.new_zeros(N, Cv, L)
        for j in range(K):
            out += w[:, None, j] * f.gather(vflat, f.idx[:, j])
        if positions is not None:
            return out, lse
        return out.view(N, Cv, *f.spatial), lse.view(N, *f.spatial)
    if positions is not None:
        return _listed_forward(f, aggregation)

    vpf, corner = f.padded_value()
    cornerp = _pad(corner.view(N, K, *dims), radii)  # any valid position where no query patch is
    out = f.value.new_zeros(N, Cv, *dims)
    if aggregation == "patch":
        sp = _pad(f.s.view(N, K, *dims), radii, value=float("-inf"))
        m = F.max_pool3d(f.s.view(N, K, *dims).amax(1, keepdim=True), f.patch, 1, radii)[:, 0]  # (N, T, H, W)
        den = f.value.new_zeros(N, *dims)
        weights = None
    else:  # patch_mean
        lse = torch.logsumexp(f.s, 1)
        wp = _pad(torch.exp(f.s - lse[:, None]).view(N, K, *dims), radii)
    inside = _pad(out.new_ones(1, 1, *dims, dtype=torch.bool), radii)  # padded map of real pixels
    for off in f.g.offsets():
        # Votes landing on z come from x = z - d, d = off - r: padded x = z + patch - 1 - off.
        at = _mirror(f, off)
        ca = _shift(cornerp, at, dims).reshape(N, K, L) + f.g.key_step(*off)
        # Where x is off the map there is no vote: skip it, rather than add 0 * (a value).
        real = _shift(inside, at, dims).reshape(1, 1, L)
        if aggregation == "patch":
            weights = torch.exp(_shift(sp, at, dims) - m[:, None])
            den += weights.sum(1)
        else:
            weights = _shift(wp, at, dims)
        for j in range(K):
            vote = torch.where(real, f.gather(vpf, ca[:, j]), 0)
            out += weights[:, None, j] * vote.view(N, Cv, *dims)
    if aggregation == "patch":
        out, stat = out / den[:, None], m + torch.log(den)
    else:
        out, stat = out / vote_counts(dims, f.patch, out.device, out.dtype), lse.view(N, *dims)
    return out.view(N, Cv, *f.spatial), stat.view(N, *f.spatial)


def attend_backward(
    grad, query, key, value, indices, temperature, out, stat, patch_size, aggregation: str, similarity: str, positions=None
):
    """Gradients ``(query, key, value, temperature)``, in the compute dtype and the inputs' shapes."""
    f = _Field(query, key, value, indices, temperature, patch_size, similarity, positions)
    N, K, L, Cv, dims, radii = f.N, f.K, f.L, f.Cv, f.dims, f.radii
    dt = f.dt
    g = grad.to(dt)
    gs = torch.zeros_like(f.s)  # d loss / d s, (N, K, L)

    if positions is not None and aggregation != "center":
        gs, gv = _listed_backward(f, g, out.to(dt), stat.to(dt), aggregation)
    elif aggregation == "center":
        w = torch.exp(f.s - stat.to(dt).reshape(N, 1, L))
        vflat = f.value.flatten(2)
        gflat = g.reshape(N, Cv, L)
        gv = f.value.new_zeros(N, vflat.shape[-1], Cv)
        for j in range(K):
            gs[:, j] = (gflat * f.gather(vflat, f.idx[:, j])).sum(1)
            _index_add(gv, f.idx[:, j], w[:, None, j] * gflat)
        gs = w * (gs - (w * gs).sum(1, keepdim=True))
        gv = gv.transpose(1, 2).reshape(N, Cv, *f.g.kdims)
    else:
        vpf, corner = f.padded_value()
        gvp = f.value.new_zeros(N, vpf.shape[-1], Cv)
        g = g.reshape(N, Cv, *dims)
        if aggregation == "patch":
            # gs_j(x) = sum_d e_j(x) / D(z) <g(z), v(y_j + d) - out(z)>, z = x + d.
            gp = _pad(g, radii)
            gop = _pad((g * out.to(dt).reshape(N, Cv, *dims)).sum(1), radii)
            logDp = _pad(stat.to(dt).reshape(N, *dims), radii, value=float("inf"))
        else:
            # patch_mean: out(z) = sum_d sum_j w_j(x) v(y_j + d) / n(z).
            w = torch.exp(f.s - stat.to(dt).reshape(N, 1, L))
            gp = _pad(g / vote_counts(dims, f.patch, g.device, dt), radii)
        inside = _pad(g.new_ones(1, 1, *dims, dtype=torch.bool), radii)
        for off in f.g.offsets():
            gz = _shift(gp, off, dims).reshape(N, Cv, L)  # g at z = x + d, zero outside
            real = _shift(inside, off, dims).reshape(1, 1, L)  # is there a pixel z?
            if aggregation == "patch":
                goz = _shift(gop, off, dims).reshape(N, 1, L)
                coef = torch.exp(f.s - _shift(logDp, off, dims).reshape(N, 1, L))  # e_j(x) / D(z)
            for j in range(K):
                pos = corner[:, j] + f.g.key_step(*off)
                dotv = (gz * torch.where(real, f.gather(vpf, pos), 0)).sum(1)
                if aggregation == "patch":
                    gs[:, j] += coef[:, j] * (dotv - goz[:, 0])
                    _index_add(gvp, pos, coef[:, None, j] * gz)
                else:
                    gs[:, j] += dotv
                    _index_add(gvp, pos, w[:, None, j] * gz)
        if aggregation == "patch_mean":
            gs = w * (gs - (w * gs).sum(1, keepdim=True))
        gv = replicate_pad_adjoint(gvp.transpose(1, 2).reshape(N, Cv, *f.g.kpad), radii)

    # s = -cost / T: d s / d cost = -1 / T and d s / d T = cost / T^2.
    gT = (gs * f.cost).sum() / f.T.square()
    gcost = -gs / f.T
    gq, gk = _cost_backward(f, gcost)
    return gq.view(query.shape), gk.view(key.shape), gv.view(value.shape), gT


def _cost_backward(f: _Field, gcost: torch.Tensor):
    """Gradients of ``sum(gcost * cost)`` with respect to query and key, offset by offset."""
    pc = f.costs
    N, K, L, dims = f.N, f.K, f.L, f.dims
    C = pc.qp.shape[1]
    corner = f.g.key_corner(f.idx)  # (N, K, L) in the padded key
    gqp = torch.zeros_like(pc.qp)
    gkp = pc.qp.new_zeros(N, pc.kflat.shape[-1], C)
    if f.positions is not None:
        gq_flat = pc.qp.new_zeros(N, gqp[0, 0].numel(), C)
    for off in f.g.offsets():
        qwin = pc.query(*off).reshape(N, C, L)
        gq_acc = torch.zeros_like(qwin)
        step = f.g.key_step(*off)
        for j in range(K):
            pos = corner[:, j] + step
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
            _shift(gqp, off, dims).add_(gq_acc.view(N, C, *dims))
        else:
            qcorner = typing.cast(torch.Tensor, pc.qcorner)  # sparse: set by PatchCosts
            _index_add(gq_flat, (qcorner + f.g.query_step(*off)).expand(N, L), gq_acc)
    if f.positions is not None:
        gqp = gq_flat.transpose(1, 2).reshape(gqp.shape)
    gk = gkp.transpose(1, 2).reshape(N, C, *f.g.kpad)
    return replicate_pad_adjoint(gqp, f.radii), replicate_pad_adjoint(gk, f.radii)


# ----------------------------------------------------------------------------------------------
# Sparse queries: "patch" and "patch_mean" over listed patches only.


def _listed_votes(f: _Field):
    """For each patch offset ``off`` (vote offset ``d = off - r``): the list slot of the patch
    ``x = z - d`` that votes on each listed pixel ``z`` with that offset, whether it is listed,
    and the padded-value step of the vote."""
    for off in f.g.offsets():
        src, real = f.listed(tuple(r - o for r, o in zip(f.radii, off)))
        yield src, real, off


def _listed_forward(f: _Field, aggregation: str):
    N, K, L, Cv = f.N, f.K, f.L, f.Cv
    vflat, reads = f.value_reads()
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
    for src, real, off in _listed_votes(f):
        if aggregation == "patch":
            weights = torch.where(real, torch.exp(f.s[:, :, src] - m[:, None]), 0)
            den += weights.sum(1)
        else:
            weights = torch.where(real, w[:, :, src], 0)
            count += real
        at = reads(*off)
        for j in range(K):
            vote = torch.where(real, f.gather(vflat, at[:, j, src]), 0)
            out += weights[:, None, j] * vote
    if aggregation == "patch":
        return out / den[:, None], m + torch.log(den)
    return out / count, lse


def _listed_backward(f: _Field, g: torch.Tensor, out: torch.Tensor, stat: torch.Tensor, aggregation: str):
    """``(gs, gv)`` of the sparse "patch"/"patch_mean" aggregation; ``g``, ``out`` ``(N, Cv, L)``."""
    N, K, L, Cv = f.N, f.K, f.L, f.Cv
    vpf, corner = f.padded_value()
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
    for off in f.g.offsets():
        # Patch x votes on z = x + d, d = off - r, when z is listed.
        dst, real = f.listed(tuple(o - r for r, o in zip(f.radii, off)))
        gz = torch.where(real, g[:, :, dst], 0)  # (N, Cv, L)
        if aggregation == "patch":
            coef = torch.where(real, torch.exp(f.s - stat[:, None, dst]), 0)  # e_j(x) / D(z)
            goz = go[:, None, dst]
        step = f.g.key_step(*off)
        for j in range(K):
            pos = corner[:, j] + step
            dotv = (gz * f.gather(vpf, pos)).sum(1)
            if aggregation == "patch":
                gs[:, j] += coef[:, j] * (dotv - goz[:, 0])
                _index_add(gvp, pos, coef[:, None, j] * gz)
            else:
                gs[:, j] += torch.where(real, dotv, 0)
                _index_add(gvp, pos, w[:, None, j] * gz)
    if aggregation == "patch_mean":
        gs = w * (gs - (w * gs).sum(1, keepdim=True))
    gv = replicate_pad_adjoint(gvp.transpose(1, 2).reshape(N, Cv, *f.g.kpad), f.radii)
    return gs, gv
