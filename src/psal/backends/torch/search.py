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

from ..layout import allowed_table, as_volume, compute_dtype, neighbour_table, patch_dims, replicate_pad, same_map, unfold_patches

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


class Geometry:
    """Sizes of one call, read as volumes (a map is a volume of one frame): query ``(T, H, W)``,
    key ``(Tk, Hk, Wk)``, patch ``(pt, ph, pw)``, its radii and the padded key's strides."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, patch_size):
        self.patch = patch_dims(patch_size)
        self.radii = tuple(p // 2 for p in self.patch)
        self.dims = tuple(query.shape[2:]) if query.dim() == 5 else (1, *query.shape[2:])
        self.kdims = tuple(key.shape[2:]) if key.dim() == 5 else (1, *key.shape[2:])
        self.T, self.H, self.W = self.dims
        self.Tk, self.Hk, self.Wk = self.kdims
        rt, rh, rw = self.radii
        self.kpad = (self.Tk + 2 * rt, self.Hk + 2 * rh, self.Wk + 2 * rw)
        self.qpad = (self.T + 2 * rt, self.H + 2 * rh, self.W + 2 * rw)

    def offsets(self):
        """Every patch offset ``(a, b, c)``, row-major (frames, rows, columns)."""
        pt, ph, pw = self.patch
        return [(a, b, c) for a in range(pt) for b in range(ph) for c in range(pw)]

    def key_corner(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat key positions -> the flat corner of their patch in the padded key."""
        return _padded_corner(idx, self.kdims, self.kpad)

    def key_step(self, a: int, b: int, c: int) -> int:
        """The flat step of patch offset ``(a, b, c)`` in the padded key."""
        return _padded_step(self.kpad, a, b, c)

    def query_corner(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat query positions -> the flat corner of their patch in the padded query."""
        return _padded_corner(positions, self.dims, self.qpad)

    def query_step(self, a: int, b: int, c: int) -> int:
        return _padded_step(self.qpad, a, b, c)


def _padded_corner(pos: torch.Tensor, dims, pad) -> torch.Tensor:
    """Flat positions of a ``dims = (T, H, W)`` volume -> the flat corner of their patch in the
    volume padded to ``pad = (T + 2rt, H + 2rh, W + 2rw)``."""
    _, H, W = dims
    _, Hp, Wp = pad
    t, rest = pos // (H * W), pos % (H * W)
    return t * (Hp * Wp) + (rest // W) * Wp + rest % W


def _padded_step(pad, a: int, b: int, c: int) -> int:
    """The flat step of patch offset ``(a, b, c)`` in a volume padded to ``pad``."""
    _, Hp, Wp = pad
    return (a * Hp + b) * Wp + c


class ClampedReads:
    """Flat positions of the patch neighbours of ``pos`` (flat positions, any shape) in an unpadded
    ``dims = (T, H, W)`` volume, replicate padding as clamped coordinates: for patch offset
    ``(a, b, c)``, ``at(a, b, c)`` is the flat position of ``(t + a - rt, y + b - rh, x + c - rw)``
    clamped to the volume. One table per axis and offset (``pt + ph + pw`` of them), summed per
    offset: a read sized by the positions, not by the map (no padded copy)."""

    def __init__(self, pos: torch.Tensor, dims, patch):
        T, H, W = dims
        t, rest = pos // (H * W), pos % (H * W)
        y, x = rest // W, rest % W
        self.parts = [
            [(coord + (o - n // 2)).clamp_(0, size - 1) * stride for o in range(n)]
            for coord, n, size, stride in ((t, patch[0], T, H * W), (y, patch[1], H, W), (x, patch[2], W, 1))
        ]

    def at(self, a: int, b: int, c: int) -> torch.Tensor:
        return self.parts[0][a] + self.parts[1][b] + self.parts[2][c]


class PatchCosts:
    """Evaluates patch costs of arbitrary matches, one patch offset at a time.

    Memory stays at one gathered slice ``(N, C, M, L)`` per offset: the ``P * k`` copies of the
    features (``P`` values per patch and channel) that an unfold would make are never held.
    ``clamped`` (sparse queries only): the maps are read in place at clamped coordinates
    (:class:`ClampedReads`) instead of from replicate-padded copies, so that the memory is sized
    by the listed pixels (the backward, which folds gradients into padded maps, keeps the copies).
    """

    def __init__(self, query: torch.Tensor, key: torch.Tensor, patch_size, similarity: str, positions=None, clamped: bool = False):
        dt = compute_dtype(query.dtype)
        self.g = Geometry(query, key, patch_size)
        self.dot = similarity == "dot"
        # A self-search's query and key (one map) share one padded copy.
        same = same_map(query, key)
        self.clamped = clamped and positions is not None
        if self.clamped:
            self.qp = as_volume(query).to(dt)  # (N, C, T, H, W), the caller's memory where it can be
            self.kflat = (self.qp if same else as_volume(key).to(dt)).flatten(2)  # (N, C, key)
            self.qread: ClampedReads | None = ClampedReads(positions, self.g.dims, self.g.patch)
            self.qcorner: torch.Tensor | None = None
            return
        self.qread = None
        self.qp = replicate_pad(as_volume(query).to(dt), self.g.radii)  # (N, C, T + 2rt, H + 2rh, W + 2rw)
        self.kflat = (self.qp if same else replicate_pad(as_volume(key).to(dt), self.g.radii)).flatten(2)  # (N, C, padded key)
        # Sparse queries: the padded-query corner of each listed pixel's patch.
        self.qcorner = None if positions is None else self.g.query_corner(positions)

    def query(self, a: int, b: int, c: int) -> torch.Tensor:
        """``(N, C, L)``: the query value at patch offset ``(a, b, c)`` of every searched pixel."""
        g = self.g
        if self.qread is not None:
            return self.qp.flatten(2)[:, :, self.qread.at(a, b, c)]
        if self.qcorner is None:
            return self.qp[:, :, a : a + g.T, b : b + g.H, c : c + g.W].flatten(2)
        return self.qp.flatten(2)[:, :, self.qcorner + g.query_step(a, b, c)]

    def key_reads(self, indices: torch.Tensor):
        """``indices (N, ...)`` flat key positions -> a function of the patch offset giving the
        flat positions to read in ``kflat``, of ``indices``' shape."""
        if self.clamped:
            reads = ClampedReads(indices, self.g.kdims, self.g.patch)
            return reads.at
        corner = self.g.key_corner(indices)
        return lambda a, b, c: corner + self.g.key_step(a, b, c)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices (N, M, L)`` flat key positions of the ``L`` searched query pixels (all of
        them, or the listed positions) -> costs ``(N, M, L)`` in the compute dtype."""
        N, M, L = indices.shape
        C = self.kflat.shape[1]
        at = self.key_reads(indices.reshape(N, 1, M * L))
        out = self.kflat.new_zeros(N, M, L)
        for a, b, c in self.g.offsets():
            q = self.query(a, b, c).reshape(N, C, 1, L)
            k = self.kflat.gather(2, at(a, b, c).expand(N, C, M * L))
            k = k.view(N, C, M, L)
            if self.dot:
                out -= (q * k).sum(1)
            else:
                out += (q - k).square_().sum(1)
        return out


def patch_costs(query, key, indices, patch_size, similarity: str, positions=None) -> torch.Tensor:
    """Costs float32 of the matches ``indices``: ``(N, M, *S)`` for the query's spatial shape
    ``S``, or ``(N, M, L)`` of the ``positions (L,)`` when given."""
    N, M = indices.shape[:2]
    costs = PatchCosts(query, key, patch_size, similarity, positions, clamped=True)(indices.reshape(N, M, -1))
    return costs.float().view(indices.shape)


def exact_knn(query, key, mask, num_neighbors: int, patch_size, similarity: str):
    """Brute-force k-NN: ``indices (N, k, *S)`` int64 and ``costs (N, k, *S)`` float32, ``S`` the
    query's spatial shape (``(H, W)`` or ``(T, H, W)``)."""
    N, S = query.shape[0], tuple(query.shape[2:])
    patch = patch_size if query.dim() == 4 else patch_dims(patch_size)
    idx, cost = exact_knn_patches(unfold_patches(query, patch), unfold_patches(key, patch), mask, num_neighbors, similarity)
    return idx.view(N, num_neighbors, *S), cost.view(N, num_neighbors, *S)


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
    """State and steps of one vectorised PatchMatch run over all ``N`` maps (or volumes) at once,
    on every query pixel or on the listed ``positions`` only."""

    def __init__(self, query, key, mask, K, patch_size, similarity, generator, positions=None):
        self.N = query.shape[0]
        self.costs = PatchCosts(query, key, patch_size, similarity, positions)
        g = self.costs.g
        self.T, self.H, self.W = g.dims
        self.Tk, self.Hk, self.Wk = g.kdims
        self.Nk = self.Tk * self.Hk * self.Wk
        self.K = K
        self.mask = mask
        self.gen = generator
        self.positions = positions
        self.tables = {}  # move -> neighbour_table of the listed positions
        self.L = self.T * self.H * self.W if positions is None else positions.numel()
        self.device = query.device

    def _bar(self, cand, valid, idx):
        """Replace invalid or masked candidates by the current best: a duplicate, so never kept."""
        if self.mask is not None:
            N, M, L = cand.shape
            valid = valid & self.mask.gather(1, cand.clamp(0, self.Nk - 1).view(N, M * L)).view(N, M, L)
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
        order, n_allowed = allowed_table(self.mask, N, self.Nk)
        ranks = sample_distinct(self.Nk if order is None else n_allowed, N, K, L, self.gen, self.device)
        idx = ranks if order is None else order.gather(1, ranks.view(N, K * L)).view(N, K, L)
        cost, perm = sanitize_costs(self.costs(idx)).sort(1)
        idx = idx.gather(1, perm)
        if init_idx is not None:
            cand = init_idx.reshape(N, -1, L)
            idx, cost = self.merge(idx, cost, self._bar(cand, torch.ones_like(cand, dtype=torch.bool), idx))
        return idx, cost

    def moves(self, step: int):
        """The neighbours at distance ``step`` along columns, rows and (in a volume) frames, in
        that order, that exist in the query."""
        out = []
        for d in ((0, 0, step), (0, 0, -step), (0, step, 0), (0, -step, 0), (step, 0, 0), (-step, 0, 0)):
            if all(abs(e) < n for e, n in zip(d, (self.T, self.H, self.W))):
                out.append(d)
        return out

    def _candidates(self, coords, moves, take):
        """``coords`` (frame, row, column of every match, ``(N, K, L)`` each); ``take(x, move)``
        reads ``x`` at each pixel's neighbour and -1 where there is none. Pixel ``x`` takes
        neighbour ``x + e``'s match ``y`` as ``y - e``."""
        parts: list[list[torch.Tensor]] = [[], [], []]
        for move in moves:
            for axis in range(3):
                parts[axis].append(take(coords[axis], move) - move[axis])
        t, r, c = (torch.cat(p, 1) for p in parts)
        taken = torch.cat([take(torch.zeros_like(coords[0]), m) for m in moves], 1) >= 0
        valid = taken & (t >= 0) & (t < self.Tk) & (r >= 0) & (r < self.Hk) & (c >= 0) & (c < self.Wk)
        return (t * self.Hk + r) * self.Wk + c, valid

    def propagate(self, idx, step: int):
        """Candidates from the neighbours at distance ``step``: all ``K`` matches of each."""
        N, K, T, H, W = self.N, self.K, self.T, self.H, self.W
        hw = self.Hk * self.Wk
        coords = (idx // hw, (idx % hw) // self.Wk, idx % self.Wk)
        moves = self.moves(step)
        if self.positions is None:

            def take(x, move):
                grid = x.view(N, K, T, H, W)
                out = torch.full_like(grid, -1)
                dst = [slice(None), slice(None)]
                src = [slice(None), slice(None)]
                for e, n in zip(move, (T, H, W)):
                    dst.append(slice(max(-e, 0), n - max(e, 0)))
                    src.append(slice(max(e, 0), n - max(-e, 0)))
                out[tuple(dst)] = grid[tuple(src)]
                return out.view(N, K, -1)

        else:

            def take(x, move):
                if move not in self.tables:
                    self.tables[move] = neighbour_table(self.positions, (T, H, W), move)
                at = self.tables[move]
                return torch.where(at >= 0, x[:, :, at.clamp(min=0)], -1)

        cand, valid = self._candidates(coords, moves, take)
        return self._bar(cand, valid, idx)

    def random_search(self, idx):
        """One candidate per window of radius ``max(Tk, Hk, Wk) / 2^i`` (down to 1) around the best
        match, over the whole key volume."""
        N, L, Tk, Hk, Wk = self.N, self.L, self.Tk, self.Hk, self.Wk
        radii = []
        R = max(Tk, Hk, Wk)
        while R >= 1:
            radii.append(R)
            R //= 2
        R = torch.tensor(radii, device=self.device).view(1, -1, 1)
        best = idx[:, :1]
        hw = Hk * Wk
        bt, br, bc = best // hw, (best % hw) // Wk, best % Wk
        # Rows and columns draw first, frames (only where the key has several) after.
        u = torch.rand(2 if Tk == 1 else 3, N, len(radii), L, generator=self.gen, device=self.device, dtype=torch.float64)

        def draw(b, n, v):
            lo, hi = (b - R).clamp(min=0), (b + R).clamp(max=n - 1)
            return torch.minimum(lo + (v * (hi - lo + 1)).long(), hi)

        r, c = draw(br, Hk, u[0]), draw(bc, Wk, u[1])
        t = bt.expand_as(r) if Tk == 1 else draw(bt, Tk, u[2])
        cand = (t * Hk + r) * Wk + c
        valid = torch.ones_like(cand, dtype=torch.bool)
        if Tk > 1:
            # Volumes: also the same spatial windows in the best match's neighbouring key frames,
            # where a video's copies of one content lie, a small motion away.
            v = torch.rand(2, 2, N, len(radii), L, generator=self.gen, device=self.device, dtype=torch.float64)
            more, ok = [cand], [valid]
            for i, e in enumerate((-1, 1)):
                tt = bt + e
                more.append((tt.clamp(0, Tk - 1) * Hk + draw(br, Hk, v[i, 0])) * Wk + draw(bc, Wk, v[i, 1]))
                ok.append(((tt >= 0) & (tt < Tk)).expand_as(cand))
            cand, valid = torch.cat(more, 1), torch.cat(ok, 1)
        return self._bar(cand, valid, idx)

    def trajectories(self, idx):
        """Volumes: for every ordered pair of a pixel's matches in different key frames, the
        next point on the line through them, ``y_b + (y_b - y_a)``: in a video, one content's
        copies lie along its motion, so two found copies point to the next one."""
        hw = self.Hk * self.Wk
        t, r, c = idx // hw, (idx % hw) // self.Wk, idx % self.Wk
        pairs = [(a, b) for a in range(self.K) for b in range(self.K) if a != b]
        A = torch.tensor([a for a, _ in pairs], device=self.device)
        B = torch.tensor([b for _, b in pairs], device=self.device)
        nt, nr, nc = (2 * x[:, B] - x[:, A] for x in (t, r, c))
        valid = (t[:, B] != t[:, A]) & (nt >= 0) & (nt < self.Tk) & (nr >= 0) & (nr < self.Hk) & (nc >= 0) & (nc < self.Wk)
        return self._bar((nt * self.Hk + nr) * self.Wk + nc, valid, idx)


def patchmatch(query, key, mask, num_neighbors: int, patch_size, num_iters: int, similarity: str, init_idx, seed: int, positions=None):
    """Vectorised PatchMatch (jump-flood propagation of all ``k`` matches along every axis, random
    search over the whole key), on maps ``(N, C, H, W)`` with an int ``patch_size`` or volumes
    ``(N, C, T, H, W)`` with ``(pt, ph, pw)``.

    Returns ``indices (N, k, *S)`` int64 and ``costs (N, k, *S)`` float32, ascending along k, ``S``
    the query's spatial shape; with ``positions (M,)``, ``(N, k, M)`` for the listed query pixels
    only (``init_idx`` too).
    """
    gen = torch.Generator(device=query.device)
    gen.manual_seed(seed)
    s = _Search(query, key, mask, num_neighbors, patch_size, similarity, gen, positions)
    idx, cost = s.init(init_idx)
    for _ in range(num_iters):
        for step in _JUMPS:
            if step < max(s.T, s.H, s.W):
                idx, cost = s.merge(idx, cost, s.propagate(idx, step))
        idx, cost = s.merge(idx, cost, s.random_search(idx))
        if s.Tk > 1 and s.K > 1:
            idx, cost = s.merge(idx, cost, s.trajectories(idx))
    shape = (s.N, s.K, *query.shape[2:]) if positions is None else (s.N, s.K, s.L)
    return idx.view(shape), cost.view(shape)
