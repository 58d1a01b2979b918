"""Shared test helpers, including an independent brute-force oracle.

``naive_cost_matrix`` computes every patch cost by explicit clamped-coordinate shifts, without the
padding, unfold or gather code of the package, so the package's own oracles are checked against
something written differently.
"""

from __future__ import annotations

import pytest
import torch

import psal

BACKENDS = ["numba", "torch"]


def pytest_configure(config):
    try:
        from hypothesis import settings

        settings.register_profile("psal", deadline=None, derandomize=True, print_blob=True)
        settings.load_profile("psal")
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_cost_matrix(q: torch.Tensor, k: torch.Tensor, p: int, similarity: str = "l2") -> torch.Tensor:
    """float64 costs ``(H * W, Hk * Wk)`` between every query and key patch of one map ``(C, H, W)``."""
    q, k = q.double(), k.double()
    C, H, W = q.shape
    _, Hk, Wk = k.shape
    r = p // 2
    out = torch.zeros(H * W, Hk * Wk, dtype=torch.float64)
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            qr = (torch.arange(H) + di).clamp(0, H - 1)
            qc = (torch.arange(W) + dj).clamp(0, W - 1)
            kr = (torch.arange(Hk) + di).clamp(0, Hk - 1)
            kc = (torch.arange(Wk) + dj).clamp(0, Wk - 1)
            qs = q[:, qr][:, :, qc].reshape(C, -1).T  # (H*W, C)
            ks = k[:, kr][:, :, kc].reshape(C, -1).T  # (Hk*Wk, C)
            if similarity == "l2":
                out += (qs[:, None, :] - ks[None, :, :]).square().sum(-1)
            else:
                out -= qs @ ks.T
    return out


def check_field(field: psal.KNNField, query, key, *, patch_size, num_neighbors, num_heads=1, key_mask=None, similarity="l2"):
    """The contract every search result must meet, whatever its quality."""
    B, _, H, W = query.shape
    Hk, Wk = key.shape[-2:]
    shape = (B, num_heads, num_neighbors, H, W)
    assert field.indices.shape == shape and field.costs.shape == shape
    assert field.indices.dtype == torch.int64 and field.costs.dtype == torch.float32
    idx = field.indices
    assert int(idx.min()) >= 0 and int(idx.max()) < Hk * Wk
    if num_neighbors > 1:
        assert (idx.sort(2).values.diff(dim=2) != 0).all(), "matches of one query must be distinct"
        assert (field.costs.diff(dim=2) >= 0).all(), "costs must ascend along k"
    if key_mask is not None:
        flat = idx.reshape(B, num_heads, -1)
        ok = torch.gather(key_mask.flatten(1)[:, None, :].expand(B, num_heads, Hk * Wk), 2, flat)
        assert ok.all(), "a match falls on a masked key position"
    recomputed = psal.patch_costs(query, key, idx, patch_size=patch_size, similarity=similarity, num_heads=num_heads)
    torch.testing.assert_close(field.costs, recomputed, rtol=1e-4, atol=1e-4)
