"""Pure-PyTorch search: the exact oracles and a vectorised PatchMatch that runs on any device.

Everything here works on *folded* maps, with the heads moved into the batch: query
``(N, C, H, W)``, key ``(N, C, Hk, Wk)``, an optional allowed-key mask ``(N, Hk * Wk)`` and fields
``(N, k, H * W)``. Inputs are trusted: ``psal.functional`` has validated them.

Positions outside a map are read with replicate padding, as ``PSAL.md`` fixes: padding both maps
by ``r = patch_size // 2`` makes every patch an ordinary window of the padded map, so the patch of
query pixel ``(i, j)`` starts at padded ``(i, j)`` and the patch of key position ``(y, x)`` at
padded ``(y, x)``.

Sparse queries: with ``positions`` (``(M,)`` int64, ascending flat query positions ``i * W + j``),
only those query pixels are searched and fields are ``(N, k, M)``; a pixel propagates from the
neighbours that are in the list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import allowed_table, compute_dtype, neighbour_table, unfold_patches

# Stands in for +inf where a real cost must still beat a candidate that is barred from the list.
_FINITE_MAX = torch.finfo(torch.float32).max


def sanitize_costs(costs: torch.Tensor) -> torch.Tensor:
    """float32 costs with NaN read as +inf, so that ordering and comparisons stay total."""
    costs = costs.float()
    return torch.where(torch.isnan(costs), torch.full_like(costs, float("inf")), costs)


def best_k(costs: torch.Tensor, barred: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Positions along ``dim`` of the ``k`` lowest costs, ascending, never a ``barred`` one.

    Infinite costs (sanitised NaN) still rank before every barred entry, so the pick stays valid
    whenever at least ``k`` entries are not barred.
    """
    rank = torch.where(torch.isinf(costs), torch.full_like(costs, _FINITE_MAX), costs)
    return rank.masked_fill(barred, float("inf")).topk(k, dim=dim, largest=False).indices


class PatchCosts:
    """Evaluates patch costs of arbitrary matches, ``p * p`` gathers at a time.

    Memory stays at one gathered slice ``(N, C, M, H * W)`` per offset: the ``p * p * k`` copies
    of the features that an unfold would make are never held.
    """

    def __init__(self, query: torch.Tensor, key: torch.Tensor, patch_size: int, similarity: str, positions=None):
        dt = compute_dtype(query.dtype)
        r = patch_size // 2
        pad = (r, r, r, r)
        self.p = patch_size
        self.dot = similarity == "dot"
        self.H, self.W = query.shape[-2:]
        self.Wk = key.shape[-1]
        self.qp = F.pad(query.to(dt), pad, mode="replicate")  # (N, C, H + 2r, W + 2r)
        kp = F.pad(key.to(dt), pad, mode="replicate")  # (N, C, Hk + 2r, Wk + 2r)
        self.Wkp = kp.shape[-1]
        self.kflat = kp.flatten(2)  # (N, C, (Hk + 2r) * (Wk + 2r))
        # Sparse queries: the padded-query corner of each listed pixel's patch.
        self.qcorner: torch.Tensor | None = None if positions is None else (positions // self.W) * (self.W + 2 * r) + positions % self.W

    def _query(self, di: int, dj: int) -> torch.Tensor:
        """``(N, C, L)``: the query value at patch offset ``(di, dj)`` of every searched pixel."""
        if self.qcorner is None:
            return self.qp[:, :, di : di + self.H, dj : dj + self.W].flatten(2)
        return self.qp.flatten(2)[:, :, self.qcorner + (di * self.qp.shape[-1] + dj)]

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices (N, M, L)`` flat key positions of the ``L`` searched query pixels (all
        ``H * W``, or the listed positions) -> costs ``(N, M, L)`` in the compute dtype."""
        N, M, L = indices.shape
        C = self.kflat.shape[1]
        p = self.p
        corner = (indices // self.Wk) * self.Wkp + indices % self.Wk  # patch corner in the padded key
        corner = corner.reshape(N, 1, M * L)
        out = self.qp.new_zeros(N, M, L)
        for di in range(p):
            for dj in range(p):
                q = self._query(di, dj).reshape(N, C, 1, L)
                k = self.kflat.gather(2, (corner + (di * self.Wkp + dj)).expand(N, C, M * L))
                k = k.view(N, C, M, L)
                if self.dot:
                    out -= (q * k).sum(1)
                else:
                    out += (q - k).square_().sum(1)
        return out


def patch_costs(query, key, indices, patch_size: int, similarity: str, positions=None) -> torch.Tensor:
    """Costs float32 of the matches ``indices``: ``(N, M, H, W)``, or ``(N, M, L)`` of the
    ``positions (L,)`` when given."""
    N, M = indices.shape[:2]
    costs = PatchCosts(query, key, patch_size, similarity, positions)(indices.reshape(N, M, -1))
    return costs.float().view(indices.shape)


def exact_knn(query, key, mask, num_neighbors: int, patch_size: int, similarity: str):
    """Brute-force k-NN: ``indices (N, k, H, W)`` int64 and ``costs (N, k, H, W)`` float32."""
    N, _, H, W = query.shape
    idx, cost = exact_knn_patches(unfold_patches(query, patch_size), unfold_patches(key, patch_size), mask, num_neighbors, similarity)
    return idx.view(N, num_neighbors, H, W), cost.view(N, num_neighbors, H, W)


def exact_knn_patches(qpat, kpat, mask, num_neighbors: int, similarity: str, budget: int = 1 << 24):
    """Brute-force k-NN of patch columns ``qpat (N, D, L)`` among ``kpat (N, D, Nk)``.

    Scores every key patch for a chunk of query columns at a time through one batched matmul
    (memory ``O(chunk * Nk)``, bounded by ``budget`` elements), keeps a few more candidates than
    asked, and ranks those by their costs recomputed directly, so that the rounding of the
    expanded ``|q|^2 + |k|^2 - 2<q, k>`` form cannot reorder the answer.
    Returns ``indices (N, k, L)`` int64 and ``costs (N, k, L)`` float32, ascending along k.
    """
    N, D, L = qpat.shape
    Nk, K = kpat.shape[2], num_neighbors
    kc = min(K + 8, Nk)
    barred = None if mask is None else ~mask  # (N, Nk)
    knorm = None if similarity == "dot" else kpat.square().sum(1)  # (N, Nk)
    chunk = max(1, min(budget // max(N * Nk, 1), budget // max(N * D * kc, 1)))
    out_idx = torch.empty(N, K, L, dtype=torch.int64, device=qpat.device)
    out_cost = torch.empty(N, K, L, dtype=torch.float32, device=qpat.device)
    for start in range(0, L, chunk):
        qc = qpat[:, :, start : start + chunk]  # (N, D, s)
        s = qc.shape[2]
        score = torch.bmm(qc.transpose(1, 2), kpat)  # (N, s, Nk)
        score = -score if knorm is None else knorm[:, None, :] - 2 * score
        score = torch.nan_to_num(score, nan=float("inf"))
        if barred is not None:
            score.masked_fill_(barred[:, None, :], float("inf"))
        cand = score.topk(kc, dim=2, largest=False).indices  # (N, s, kc)
        del score
        kv = kpat.gather(2, cand.reshape(N, 1, s * kc).expand(N, D, s * kc)).view(N, D, s, kc)
        q = qc.unsqueeze(3)
        cost = -(q * kv).sum(1) if knorm is None else (q - kv).square().sum(1)  # (N, s, kc)
        cost = sanitize_costs(cost)
        no = torch.zeros_like(cand, dtype=torch.bool)
        cand_barred = no if barred is None else barred.gather(1, cand.view(N, s * kc)).view(N, s, kc)
        best = best_k(cost, cand_barred, K, dim=2)  # (N, s, K)
        out_idx[:, :, start : start + s] = cand.gather(2, best).transpose(1, 2)
        out_cost[:, :, start : start + s] = cost.gather(2, best).transpose(1, 2)
    return out_idx, out_cost


# ----------------------------------------------------------------------------------------------
# Random initialisation, shared with the compiled backends through the same contract.


def sample_distinct(n_allowed, N: int, K: int, L: int, generator, device) -> torch.Tensor:
    """``(N, K, L)`` int64 ranks, distinct along ``K``, uniform in ``[0, n_allowed[n])``.

    The ``m``-th rank is drawn from the ``n - m`` values not taken yet: draw ``r < n - m`` and
    step it past every taken value ``<= r``, in ascending order.
    """
    n = torch.as_tensor(n_allowed, device=device).reshape(-1, 1).expand(N, 1)
    u = torch.rand(N, K, L, generator=generator, device=device, dtype=torch.float64)
    taken: list[torch.Tensor] = []
    for m in range(K):
        r = torch.minimum((u[:, m] * (n - m)).long(), n - m - 1)
        if taken:
            for s in torch.stack(taken, 1).sort(1).values.unbind(1):
                r = r + (r >= s).long()
        taken.append(r)
    return torch.stack(taken, 1)


# ----------------------------------------------------------------------------------------------
# Vectorised PatchMatch.

# Jump-flood offsets of one iteration's propagation rounds, longest first.
_JUMPS = (8, 4, 2, 1)


class _Search:
    """State and steps of one vectorised PatchMatch run over all ``N`` maps at once, on every
    query pixel or on the listed ``positions`` only."""

    def __init__(self, query, key, mask, K, patch_size, similarity, generator, positions=None):
        self.N, _, self.H, self.W = query.shape
        self.Hk, self.Wk = key.shape[-2:]
        self.K = K
        self.mask = mask
        self.gen = generator
        self.positions = positions
        self.tables = {}  # (dy, dx) -> neighbour_table of the listed positions
        self.L = self.H * self.W if positions is None else positions.numel()
        self.costs = PatchCosts(query, key, patch_size, similarity, positions)
        self.device = query.device

    def _bar(self, cand, valid, idx):
        """Replace invalid or masked candidates by the current best: a duplicate, so never kept."""
        if self.mask is not None:
            N, M, L = cand.shape
            valid = valid & self.mask.gather(1, cand.clamp(0, self.Hk * self.Wk - 1).view(N, M * L)).view(N, M, L)
        return torch.where(valid, cand, idx[:, :1])

    def merge(self, idx, cost, cand):
        """The ``K`` best distinct matches among the current list and ``cand (N, M, L)``."""
        ccost = sanitize_costs(self.costs(cand))
        all_i = torch.cat([idx, cand], 1)
        all_c = torch.cat([cost, ccost], 1)
        sorted_i, perm = all_i.sort(1)
        dup_sorted = torch.zeros_like(sorted_i, dtype=torch.bool)
        dup_sorted[:, 1:] = sorted_i[:, 1:] == sorted_i[:, :-1]
        dup = torch.empty_like(dup_sorted).scatter_(1, perm, dup_sorted)
        best = best_k(all_c, dup, self.K, dim=1)
        return all_i.gather(1, best), all_c.gather(1, best)

    def init(self, init_idx):
        N, K, L = self.N, self.K, self.L
        order, n_allowed = allowed_table(self.mask, N, self.Hk * self.Wk)
        ranks = sample_distinct(self.Hk * self.Wk if order is None else n_allowed, N, K, L, self.gen, self.device)
        idx = ranks if order is None else order.gather(1, ranks.view(N, K * L)).view(N, K, L)
        cost, perm = sanitize_costs(self.costs(idx)).sort(1)
        idx = idx.gather(1, perm)
        if init_idx is not None:
            cand = init_idx.reshape(N, -1, L)
            idx, cost = self.merge(idx, cost, self._bar(cand, torch.ones_like(cand, dtype=torch.bool), idx))
        return idx, cost

    def propagate(self, idx, step: int):
        """Candidates from the four neighbours at distance ``step``: all ``K`` matches of each."""
        if self.positions is not None:
            return self._propagate_listed(idx, step)
        N, K, H, W, Hk, Wk = self.N, self.K, self.H, self.W, self.Hk, self.Wk
        grid = idx.view(N, K, H, W)
        yr, yc = grid // Wk, grid % Wk
        rows, cols = [], []
        for dy, dx in ((0, step), (0, -step), (step, 0), (-step, 0)):
            if abs(dy) >= H or abs(dx) >= W:
                continue  # no neighbour at that distance
            # Pixel x takes neighbour x + e's match y as y - e.
            r = torch.full_like(yr, -1)
            c = torch.full_like(yc, -1)
            dst = (slice(None), slice(None), slice(max(-dy, 0), H - max(dy, 0)), slice(max(-dx, 0), W - max(dx, 0)))
            src = (slice(None), slice(None), slice(max(dy, 0), H - max(-dy, 0)), slice(max(dx, 0), W - max(-dx, 0)))
            r[dst] = yr[src] - dy
            c[dst] = yc[src] - dx
            rows.append(r)
            cols.append(c)
        r = torch.cat(rows, 1).view(N, -1, H * W)
        c = torch.cat(cols, 1).view(N, -1, H * W)
        valid = (r >= 0) & (r < Hk) & (c >= 0) & (c < Wk)
        return self._bar(r * Wk + c, valid, idx)

    def _propagate_listed(self, idx, step: int):
        """:meth:`propagate` on listed positions: the same candidates, in the same order, from
        the neighbours that are listed (the others offer none)."""
        Hk, Wk = self.Hk, self.Wk
        yr, yc = idx // Wk, idx % Wk
        rows, cols = [], []
        for dy, dx in ((0, step), (0, -step), (step, 0), (-step, 0)):
            if abs(dy) >= self.H or abs(dx) >= self.W:
                continue
            if (dy, dx) not in self.tables:
                self.tables[dy, dx] = neighbour_table(self.positions, self.H, self.W, dy, dx)
            at = self.tables[dy, dx]
            listed = at >= 0
            src = at.clamp(min=0)
            rows.append(torch.where(listed, yr[:, :, src] - dy, -1))
            cols.append(torch.where(listed, yc[:, :, src] - dx, -1))
        r, c = torch.cat(rows, 1), torch.cat(cols, 1)
        valid = (r >= 0) & (r < Hk) & (c >= 0) & (c < Wk)
        return self._bar(r * Wk + c, valid, idx)

    def random_search(self, idx):
        """One candidate per window of radius ``max(Hk, Wk) / 2^i`` (down to 1) around the best match."""
        N, L, Hk, Wk = self.N, self.L, self.Hk, self.Wk
        radii = []
        R = max(Hk, Wk)
        while R >= 1:
            radii.append(R)
            R //= 2
        R = torch.tensor(radii, device=self.device).view(1, -1, 1)
        best = idx[:, :1]
        br, bc = best // Wk, best % Wk
        u = torch.rand(2, N, len(radii), L, generator=self.gen, device=self.device, dtype=torch.float64)
        lo_r, hi_r = (br - R).clamp(min=0), (br + R).clamp(max=Hk - 1)
        lo_c, hi_c = (bc - R).clamp(min=0), (bc + R).clamp(max=Wk - 1)
        r = torch.minimum(lo_r + (u[0] * (hi_r - lo_r + 1)).long(), hi_r)
        c = torch.minimum(lo_c + (u[1] * (hi_c - lo_c + 1)).long(), hi_c)
        cand = r * Wk + c
        return self._bar(cand, torch.ones_like(cand, dtype=torch.bool), idx)


def patchmatch(query, key, mask, num_neighbors: int, patch_size: int, num_iters: int, similarity: str, init_idx, seed: int, positions=None):
    """Vectorised PatchMatch (jump-flood propagation of all ``k`` matches, random search).

    Returns ``indices (N, k, H, W)`` int64 and ``costs (N, k, H, W)`` float32, ascending along k;
    with ``positions (M,)``, ``(N, k, M)`` for the listed query pixels only (``init_idx`` too).
    """
    gen = torch.Generator(device=query.device)
    gen.manual_seed(seed)
    s = _Search(query, key, mask, num_neighbors, patch_size, similarity, gen, positions)
    idx, cost = s.init(init_idx)
    for _ in range(num_iters):
        for step in _JUMPS:
            if step < max(s.H, s.W):
                idx, cost = s.merge(idx, cost, s.propagate(idx, step))
        idx, cost = s.merge(idx, cost, s.random_search(idx))
    shape = (s.N, s.K, s.H, s.W) if positions is None else (s.N, s.K, s.L)
    return idx.view(shape), cost.view(shape)
