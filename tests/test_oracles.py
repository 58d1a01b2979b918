"""The exact oracles (``exact_knn``, ``patch_costs``) against an independent brute force."""

from __future__ import annotations

import pytest
import torch
from conftest import naive_cost_matrix

import psal
from psal.backends.layout import unfold_patches
from psal.backends.torch.search import exact_knn_patches


def test_patch_cost_by_hand():
    # 1-channel 2x2 query and key, p = 3, replicate padding: the 3x3 patch of query pixel (0, 0)
    # reads [[a, a, b], [a, a, b], [c, c, d]].
    q = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    k = torch.zeros(1, 1, 2, 2)
    idx = torch.zeros(1, 1, 1, 2, 2, dtype=torch.int64)  # every query matched to key (0, 0)
    cost = psal.patch_costs(q, k, idx, patch_size=3)
    # pixel (0, 0): 4*1 + 2*4 + 2*9 + 16 = 46; (0, 1): 2*1 + 4*4 + 9 + 2*16 = 59
    # (1, 0): 2*1 + 4 + 4*9 + 2*16 = 74;       (1, 1): 1 + 2*4 + 2*9 + 4*16 = 91
    assert cost.flatten().tolist() == [46.0, 59.0, 74.0, 91.0]
    # "dot" against a key of ones: minus the sum of each replicate-padded query patch.
    dot = psal.patch_costs(q, torch.ones(1, 1, 2, 2), idx, patch_size=3, similarity="dot")
    assert dot.flatten().tolist() == [-18.0, -21.0, -24.0, -27.0]


@pytest.mark.parametrize("similarity", ["l2", "dot"])
@pytest.mark.parametrize("p", [1, 3, 5, 9])
def test_patch_costs_match_naive(similarity, p):
    g = torch.Generator().manual_seed(p)
    q = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 24, (2, 1, 4, 5, 7), generator=g)
    got = psal.patch_costs(q, k, idx, patch_size=p, similarity=similarity)
    for b in range(2):
        full = naive_cost_matrix(q[b], k[b], p, similarity)  # (35, 24)
        want = full.gather(1, idx[b, 0].reshape(4, 35).T).T.reshape(4, 5, 7)
        torch.testing.assert_close(got[b, 0].double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("similarity", ["l2", "dot"])
@pytest.mark.parametrize("p,size,ksize", [(1, (4, 5), (3, 3)), (3, (6, 5), (7, 4)), (5, (3, 3), (5, 6)), (7, (5, 4), (2, 3))])
def test_exact_knn_matches_naive(similarity, p, size, ksize):
    g = torch.Generator().manual_seed(sum(size) * p)
    q = torch.randn(2, 2, *size, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, *ksize, generator=g, dtype=torch.float64)
    K = min(3, ksize[0] * ksize[1])
    field = psal.exact_knn(q, k, patch_size=p, num_neighbors=K, similarity=similarity)
    for b in range(2):
        full = naive_cost_matrix(q[b], k[b], p, similarity)
        want = full.sort(1).values[:, :K].T.reshape(K, *size)
        torch.testing.assert_close(field.costs[b, 0].double(), want, rtol=1e-5, atol=1e-5)
        # the indices carry exactly those costs
        torch.testing.assert_close(full.gather(1, field.indices[b, 0].reshape(K, -1).T).T.reshape(K, *size), want, rtol=1e-5, atol=1e-5)


def test_exact_knn_mask_and_heads():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 6, 5, generator=g) < 0.4
    mask[:, 0, 0] = True
    mask[:, 5, 4] = True
    field = psal.exact_knn(q, k, patch_size=3, num_neighbors=2, key_mask=mask, num_heads=2)
    for b in range(2):
        for h in range(2):
            full = naive_cost_matrix(q[b, 2 * h : 2 * h + 2], k[b, 2 * h : 2 * h + 2], 3)
            full[:, ~mask[b].flatten()] = float("inf")
            want = full.sort(1).values[:, :2].T.reshape(2, 5, 6)
            torch.testing.assert_close(field.costs[b, h].double(), want, rtol=1e-5, atol=1e-5)


def test_exact_knn_with_exactly_k_allowed_keys():
    """Fewer allowed keys than the K + 8 candidates it pre-selects: only allowed ones come back."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 3, 6, 5, generator=g)
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 5, 4] = True
    mask[1, 2, 2] = mask[1, 3, 1] = True
    field = psal.exact_knn(q, k, patch_size=3, num_neighbors=2, key_mask=mask)
    for b in range(2):
        allowed = set(mask[b].flatten().nonzero().flatten().tolist())
        assert set(field.indices[b].unique().tolist()) == allowed


def test_exact_knn_chunking_does_not_change_the_answer():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 9, 11, generator=g)
    k = torch.randn(2, 3, 8, 7, generator=g)
    qp, kp = unfold_patches(q, 3), unfold_patches(k, 3)
    whole = exact_knn_patches(qp, kp, None, 4, "l2")
    tiny = exact_knn_patches(qp, kp, None, 4, "l2", budget=64)  # one query column per chunk
    torch.testing.assert_close(whole[1], tiny[1])


def test_exact_knn_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(1, 3, 12, 12, generator=g)
    k = torch.rand(1, 3, 12, 12, generator=g)
    a = psal.exact_knn(q, k, patch_size=5, num_neighbors=3)
    b = psal.exact_knn(q.double(), k.double(), patch_size=5, num_neighbors=3)
    torch.testing.assert_close(a.costs, b.costs, rtol=1e-4, atol=1e-5)
