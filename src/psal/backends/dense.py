"""Full attention with PSAL's semantics: every allowed key patch, dense softmax, O(N) memory.

The baseline for tests and benchmarks. Folded tensors (heads in the batch) and plain autograd:
query ``(N, C, H, W)``, key ``(N, C, Hk, Wk)``, value ``(N, Cv, Hk, Wk)``, mask ``(N, Hk * Wk)``
bool or ``None``, temperature a 0-dim tensor.

Both paths first compute, for every query pixel ``x``, the softmax-weighted mean ``A(x)`` of the
value columns over all keys (the value pixel for ``"center"``, the whole replicate-padded value
patch for the patch aggregations) and ``lse(x) = logsumexp_y s(x, y)``. The patch aggregations
then combine the per-patch means into pixels (``PSAL.md``): ``"patch_mean"`` by an average of
the votes (``F.fold``), ``"patch"`` weighting each patch by ``exp(lse(x))``, stabilised per pixel.

- ``"sdpa"``: through ``scaled_dot_product_attention`` on patch vectors (PyTorch's flash kernel
  where it applies). The l2 score ``-(|q|^2 + |k|^2 - 2 q.k) / T`` becomes a dot product of
  ``[2q / T, -1 / T]`` and ``[k, |k|^2]``, up to ``-|q|^2 / T``, which softmax ignores. SDPA does
  not return ``lse``, so ``"patch"`` cannot take this path.
- ``"chunked"``: query pixels in chunks; each chunk's scores ``(chunk, Nk)`` are recomputed in
  an explicit backward from the saved softmax normalisers, so memory stays ``O(chunk * Nk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .layout import compute_dtype, patch_dims, unfold_patches, vote_counts

# Score elements per chunk of the chunked path (a (chunk, Nk) matrix of this many entries).
CHUNK_ELEMENTS = 1 << 22


def _value_columns(value, patch_size, aggregation: str):
    """``(N, E, Nk)``: the value pixel (center) or the whole value patch of every key position."""
    if aggregation == "center":
        return value.to(compute_dtype(value.dtype)).flatten(2)
    return unfold_patches(value, patch_size)


def _chunk_scores(qc, kpat, knorm, mask, T, dot: bool):
    """``s(x, y)`` for a chunk of query columns ``qc (N, D, s)``: ``(N, s, Nk)``, exact for l2."""
    s = torch.bmm(qc.transpose(1, 2), kpat)
    if not dot:
        s.mul_(2).sub_(knorm[:, None, :]).sub_(qc.square().sum(1)[:, :, None])
    s.div_(T)
    if mask is not None:
        s.masked_fill_(~mask[:, None, :], float("-inf"))
    return s


def _chunks(L: int, Nk: int, N: int):
    step = max(1, CHUNK_ELEMENTS // max(N * Nk, 1))
    return [slice(start, start + step) for start in range(0, L, step)]


class _Chunked(torch.autograd.Function):
    """Dense attention of patch vectors, flash style: ``A (N, E, L)`` and ``lse (N, L)`` by chunks
    of query columns, with a backward that recomputes each chunk's scores from the saved
    ``lse``. Only ``(chunk, Nk)`` blocks ever exist, in the forward and in the backward.

    ``s = (2 q.k - |k|^2 - |q|^2) / T`` (l2) or ``q.k / T`` (dot); ``P = softmax_y s``;
    ``A = P v``. Backward: ``dv = P^T dA``; ``ds = P * (dA.v - dA.A + dlse)``; then the
    derivatives of ``s`` in ``q``, ``k`` and ``T``.
    """

    @staticmethod
    def forward(ctx, qpat, kpat, vcols, mask, T, dot: bool):
        N, L = qpat.shape[0], qpat.shape[2]
        knorm = None if dot else kpat.square().sum(1)
        # Results go into buffers allocated once: small results kept alive between the large
        # freed temporaries of each chunk would fragment the heap, which then grows chunk by chunk.
        A = qpat.new_empty(N, vcols.shape[1], L)
        lse = qpat.new_empty(N, L)
        for sl in _chunks(L, kpat.shape[2], N):
            s = _chunk_scores(qpat[:, :, sl], kpat, knorm, mask, T, dot)
            lse[:, sl] = torch.logsumexp(s, 2)
            A[:, :, sl] = torch.bmm(torch.softmax(s, 2), vcols.transpose(1, 2)).transpose(1, 2)
        ctx.save_for_backward(qpat, kpat, vcols, mask, T, A, lse)
        ctx.dot = dot
        return A, lse

    @staticmethod
    def backward(ctx, dA, dlse):
        qpat, kpat, vcols, mask, T, A, lse = ctx.saved_tensors
        dot = ctx.dot
        N, L = qpat.shape[0], qpat.shape[2]
        knorm = None if dot else kpat.square().sum(1)
        dq = torch.empty_like(qpat)
        dk = torch.zeros_like(kpat)
        dv = torch.zeros_like(vcols)
        dT = torch.zeros((), dtype=qpat.dtype, device=qpat.device)
        rowdot = (dA * A).sum(1)  # (N, L): dA . A
        for sl in _chunks(L, kpat.shape[2], N):
            qc = qpat[:, :, sl]
            s = _chunk_scores(qc, kpat, knorm, mask, T, dot)  # (N, c, Nk)
            P = torch.exp(s - lse[:, sl, None])
            dAc = dA[:, :, sl]  # (N, E, c)
            dv += torch.bmm(dAc, P)
            ds = torch.bmm(dAc.transpose(1, 2), vcols)  # dA . v, (N, c, Nk)
            ds.sub_(rowdot[:, sl, None]).add_(dlse[:, sl, None]).mul_(P)
            del P
            if mask is not None:
                s.masked_fill_(~mask[:, None, :], 0)  # ds is 0 there; keeps 0 * -inf out of dT
            dT -= (ds * s).sum() / T
            if dot:
                dq[:, :, sl] = torch.bmm(kpat, ds.transpose(1, 2)) / T
                dk += torch.bmm(qc, ds) / T
            else:
                dq[:, :, sl] = (torch.bmm(kpat, ds.transpose(1, 2)) - qc * ds.sum(2)[:, None, :]) * (2 / T)
                dk += (torch.bmm(qc, ds) - kpat * ds.sum(1)[:, None, :]) * (2 / T)
        return dq, dk, dv, None, dT, None


# Never the math kernel: it materialises the (L, Nk) score matrix, which is what this avoids.
_SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _sdpa(qpat, kpat, vcols, mask, T, dot: bool):
    if dot:
        q, k = qpat / T, kpat
    else:
        one = qpat.new_ones(qpat.shape[0], 1, qpat.shape[2])
        q = torch.cat([2 * qpat / T, -one / T], 1)
        k = torch.cat([kpat, kpat.square().sum(1, keepdim=True)], 1)
    # The fused kernels want one last dimension for q, k and v, a multiple of 8 on CUDA (aligned
    # rows): pad with zeros, which changes no dot product and no output channel that is kept.
    D, E = q.shape[1], vcols.shape[1]
    width = -(-max(D, E) // 8) * 8
    q, k = F.pad(q, (0, 0, 0, width - D)), F.pad(k, (0, 0, 0, width - D))
    vcols = F.pad(vcols, (0, 0, 0, width - E))
    attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, Nk)
    with sdpa_kernel(_SDPA_KERNELS):
        # Fused kernels read rows with stride 1: (N, 1, L, D) contiguous.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).contiguous()[:, None],
            k.transpose(1, 2).contiguous()[:, None],
            vcols.transpose(1, 2).contiguous()[:, None],
            attn_mask=attn_mask,
            scale=1.0,
        )
    return out[:, 0, :, :E].transpose(1, 2), None


def full_attention(query, key, value, mask, temperature, patch_size, aggregation: str, similarity: str, method: str):
    """``(N, Cv, *S)`` in the compute dtype, ``S`` the query's spatial shape; differentiable by
    autograd. Maps ``(N, C, H, W)`` take an int ``patch_size``, volumes ``(N, C, T, H, W)`` a
    ``(pt, ph, pw)``."""
    N = query.shape[0]
    S = tuple(query.shape[2:])
    Cv = value.shape[1]
    dt = compute_dtype(query.dtype)
    T = temperature.to(dt)
    qpat = unfold_patches(query, patch_size)  # (N, C * P, L)
    kpat = unfold_patches(key, patch_size)  # (N, C * P, Nk)
    vcols = _value_columns(value, patch_size, aggregation)  # (N, E, Nk)
    if method == "sdpa":
        A, lse = _sdpa(qpat, kpat, vcols, mask, T, similarity == "dot")  # A: (N, E, L)
    else:
        A, lse = _Chunked.apply(qpat, kpat, vcols, mask, T, similarity == "dot")
    if aggregation == "center":
        return A.reshape(N, Cv, *S)
    if query.dim() == 4:
        return _combine_map(A, lse, N, Cv, S, patch_size, aggregation)
    return _combine_volume(A, lse, N, Cv, S, patch_dims(patch_size), aggregation)


def _combine_map(A, lse, N, Cv, S, p, aggregation):
    """The per-patch means ``A (N, Cv * p * p, H * W)`` of a map combined into pixels."""
    H, W = S
    r = p // 2
    if aggregation == "patch_mean":
        votes = F.fold(A, (H, W), p, padding=r)
        return votes / vote_counts((H, W), (p, p), A.device, A.dtype)
    # "patch": out(z) = sum_d exp(lse(z - d)) A(z - d)[d] / sum_d exp(lse(z - d)).
    lse = lse.view(N, 1, H, W)
    m = F.max_pool2d(lse, p, 1, r)  # (N, 1, H, W), the largest weight reaching each pixel
    lsep = F.pad(lse, (r, r, r, r), value=float("-inf"))
    Ap = F.pad(A.view(N, Cv, p, p, H, W), (r, r, r, r))
    num = A.new_zeros(N, Cv, H, W)
    den = A.new_zeros(N, 1, H, W)
    for a in range(p):
        for b in range(p):
            # Patch x = z - d, d = (a - r, b - r), sits at padded z + (p - 1 - a, p - 1 - b).
            sl = (slice(p - 1 - a, p - 1 - a + H), slice(p - 1 - b, p - 1 - b + W))
            wgt = torch.exp(lsep[..., sl[0], sl[1]] - m)
            den = den + wgt
            num = num + wgt * Ap[:, :, a, b, sl[0], sl[1]]
    return num / den


def _combine_volume(A, lse, N, Cv, S, patch, aggregation):
    """:func:`_combine_map` for a volume: ``A (N, Cv * pt * ph * pw, T * H * W)``. Patch ``x``'s
    vote with offset ``d`` lands on ``z = x + d``; votes outside the volume are dropped."""
    T, H, W = S
    pt, ph, pw = patch
    rt, rh, rw = (q // 2 for q in patch)
    pad = (rw, rw, rh, rh, rt, rt)
    A = A.view(N, Cv, pt, ph, pw, T, H, W)
    if aggregation == "patch":
        lse = lse.view(N, 1, T, H, W)
        m = F.max_pool3d(lse, patch, 1, (rt, rh, rw))
        lsep = F.pad(lse, pad, value=float("-inf"))
    num = A.new_zeros(N, Cv, T, H, W)
    den = A.new_zeros(N, 1, T, H, W)
    for a in range(pt):
        for b in range(ph):
            for c in range(pw):
                # Patch x = z - d, d = (a, b, c) - r, sits at padded z + patch - 1 - (a, b, c).
                sl = (slice(pt - 1 - a, pt - 1 - a + T), slice(ph - 1 - b, ph - 1 - b + H), slice(pw - 1 - c, pw - 1 - c + W))
                vote = F.pad(A[:, :, a, b, c], pad)[..., sl[0], sl[1], sl[2]]
                if aggregation == "patch":
                    wgt = torch.exp(lsep[..., sl[0], sl[1], sl[2]] - m)
                    den = den + wgt
                    num = num + wgt * vote
                else:
                    num = num + vote
    if aggregation == "patch":
        return num / den
    return num / vote_counts(S, patch, A.device, A.dtype)
