"""`psal.full_attention`, and PSAL with every allowed key as a neighbour equals it."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICES, NATIVE_CASES, gen, naive_attention, to_device

import psal

AGGREGATIONS = ["center", "patch", "patch_mean"]


def _inputs(dtype=torch.float64, C=4, Cv=4, H=5, W=4, Hk=3, Wk=5, seed=0, device="cpu"):
    """Query, key and value drawn on the CPU, then moved to ``device``: leaves that require grad."""
    g = gen(seed)
    qkv = (
        torch.randn(2, C, H, W, generator=g, dtype=dtype),
        torch.randn(2, C, Hk, Wk, generator=g, dtype=dtype),
        torch.randn(2, Cv, Hk, Wk, generator=g, dtype=dtype),
    )
    return tuple(t.to(device).requires_grad_() for t in qkv)


def _mask(allowed: int, Hk=3, Wk=5, device="cpu"):
    """The same number of allowed keys in both batch elements, at different places."""
    m = torch.zeros(2, Hk * Wk, dtype=torch.bool)
    m[0, torch.randperm(Hk * Wk, generator=gen(1))[:allowed]] = True
    m[1, torch.randperm(Hk * Wk, generator=gen(2))[:allowed]] = True
    return m.view(2, Hk, Wk).to(device)


def _grads(out, inputs, seed=5):
    g = torch.randn(out.shape, generator=gen(seed), dtype=out.dtype).to(out.device)
    return torch.autograd.grad(out, inputs, g)


# On CPU without the interpreted Triton case: 48 searches and backward passes through the
# interpreter would take minutes.
@pytest.mark.parametrize("backend, device", NATIVE_CASES)
@pytest.mark.parametrize(
    "aggregation, similarity, heads, masked", list(itertools.product(AGGREGATIONS, ["l2", "dot"], [1, 2], [False, True]))
)
def test_psal_with_all_keys_equals_full_attention(backend, device, aggregation, similarity, heads, masked):
    q, k, v = _inputs(device=device)
    T = torch.tensor(2.0, dtype=torch.float64, device=device, requires_grad=True)
    mask = _mask(9, device=device) if masked else None
    K = 9 if masked else 15
    opts = dict(patch_size=3, temperature=T, aggregation=aggregation, similarity=similarity, num_heads=heads, key_mask=mask)
    sparse = psal.ps_attention(q, k, v, num_neighbors=K, generator=gen(0), backend=backend, **opts)
    dense = psal.full_attention(q, k, v, method="chunked", **opts)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-9)
    for a, b in zip(_grads(sparse, (q, k, v, T)), _grads(dense, (q, k, v, T))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregation", ["center", "patch_mean"])
def test_sdpa_path_equals_the_chunked_path(device, aggregation):
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(C=3, Cv=5, H=7, W=6, Hk=6, Wk=5, device=device))
    mask = _mask(20, 6, 5, device=device)
    opts = dict(patch_size=3, temperature=4.0, aggregation=aggregation, key_mask=mask)
    a = psal.full_attention(q, k, v, method="sdpa", **opts)
    b = psal.full_attention(q, k, v, method="chunked", **opts)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for ga, gb in zip(_grads(a, (q, k, v)), _grads(b, (q, k, v))):
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_full_attention_matches_the_naive_oracle(device, aggregation):
    q, k, v = (t.detach() for t in _inputs(C=2, Cv=2, H=4, W=3, Hk=3, Wk=4))
    idx = torch.arange(12).view(1, 12, 1, 1).expand(2, 12, 4, 3)  # every key, for every query pixel
    want = naive_attention(q, k, v, idx, 1.5, 3, aggregation)
    out = psal.full_attention(*to_device(device, q, k, v), temperature=1.5, aggregation=aggregation)
    torch.testing.assert_close(out.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_aggregation_is_stable_for_large_score_ranges(device):
    # Costs of hundreds over T = 0.01: exp underflows unless the softmax is max-subtracted per pixel.
    q, k, v = (t.detach() * 30 for t in _inputs(C=3, Cv=2, H=6, W=6, Hk=4, Wk=4, device=device))
    for method_out in (
        psal.full_attention(q, k, v, temperature=0.01, aggregation="patch"),
        psal.ps_attention(q, k, v, num_neighbors=16, temperature=0.01, aggregation="patch"),
    ):
        assert torch.isfinite(method_out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_does_not_change_the_result(device, monkeypatch):
    from psal.backends import dense

    q, k, v = _inputs(device=device)
    whole = psal.full_attention(q, k, v, aggregation="patch")
    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 2 * 15 * 3)  # 3 query pixels per chunk
    torch.testing.assert_close(psal.full_attention(q, k, v, aggregation="patch"), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregation, similarity", [("patch", "l2"), ("center", "dot"), ("patch_mean", "l2")])
def test_chunked_backward_gradcheck(device, aggregation, similarity, monkeypatch):
    from psal.backends import dense

    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 2 * 12 * 5)  # several chunks
    q, k, v = _inputs(C=2, Cv=2, H=4, W=3, Hk=3, Wk=4, device=device)
    T = torch.tensor(1.7, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.ones(2, 3, 4, dtype=torch.bool, device=device)
    mask[0, 1, 1:] = False

    def f(q, k, v, T):
        return psal.full_attention(q, k, v, temperature=T, aggregation=aggregation, similarity=similarity, key_mask=mask, method="chunked")

    assert torch.autograd.gradcheck(f, (q, k, v, T))
