"""Sparse queries: the search over chosen query positions only (``positions=``).

References: the independent float64 cost matrix of ``conftest.naive_cost_matrix`` (costs of the
listed pixels), brute-force ``psal.exact_knn`` (quality), and the dense call itself (a sparse call
listing every pixel is the dense call; numba's random start is per pixel, so equal at any list).
"""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, gen, naive_cost_matrix, random_key_mask, to_device
from hypothesis import given, settings
from hypothesis import strategies as st

import psal

SPARSE_CASES = CASES


def interpreted(backend, device) -> bool:
    return backend == "triton" and device == "cpu"


def check_sparse_field(field, query, key, positions, *, patch_size, num_neighbors, num_heads=1, key_mask=None, similarity="l2"):
    """The search contract on the listed pixels, costs against the independent float64 oracle."""
    B, C, H, W = query.shape
    Hk, Wk = key.shape[-2:]
    M = positions.numel()
    shape = (B, num_heads, num_neighbors, M)
    assert field.indices.shape == shape and field.costs.shape == shape
    assert field.indices.dtype == torch.int64 and field.costs.dtype == torch.float32
    assert field.indices.device == query.device
    idx, costs = field.indices.cpu(), field.costs.cpu()
    if M == 0:
        return
    assert int(idx.min()) >= 0 and int(idx.max()) < Hk * Wk
    if num_neighbors > 1:
        assert (idx.sort(2).values.diff(dim=2) != 0).all(), "matches of one query must be distinct"
        assert (costs.diff(dim=2) >= 0).all(), "costs must ascend along k"
    c = C // num_heads
    for b in range(B):
        for h in range(num_heads):
            if key_mask is not None:
                assert key_mask[b].flatten().cpu()[idx[b, h]].all(), "a match falls on a masked key position"
            full = naive_cost_matrix(query[b, h * c : (h + 1) * c].cpu(), key[b, h * c : (h + 1) * c].cpu(), patch_size, similarity)
            want = full[positions.cpu()[None, :], idx[b, h]].float()  # (k, M)
            torch.testing.assert_close(costs[b, h], want, rtol=1e-4, atol=1e-4)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 2))
    C = heads * draw(st.integers(1, 2))
    H, W = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    Hk, Wk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    K = draw(st.integers(1, min(4, Hk * Wk)))
    seed = draw(st.integers(0, 2**31))
    g = gen(seed)
    mask = random_key_mask(B, Hk, Wk, K, 0.5, g) if draw(st.booleans()) else None
    listed = torch.rand(H * W, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    return dict(
        query=torch.randn(B, C, H, W, generator=g),
        key=torch.randn(B, C, Hk, Wk, generator=g),
        patch_size=draw(st.sampled_from([1, 3, 5])),
        num_neighbors=K,
        num_heads=heads,
        key_mask=mask,
        similarity=draw(st.sampled_from(["l2", "dot"])),
        num_iters=draw(st.integers(0, 3)),
        positions=listed.nonzero().squeeze(1),
        seed=seed,
    )


@pytest.mark.parametrize("backend, device", SPARSE_CASES)
def test_sparse_field_contract(backend, device):
    @settings(max_examples=6 if interpreted(backend, device) else 40)
    @given(problem=problems())
    def check(problem):
        _search_and_check(problem, backend, device)

    check()


def _search_and_check(problem, backend, device):
    """One drawn problem searched on ``backend`` and checked against the contract."""
    seed = problem.pop("seed")
    for name in ("query", "key", "key_mask", "positions"):
        problem[name] = to_device(device, problem[name])[0]
    field = psal.patchmatch(**problem, generator=gen(seed), backend=backend)
    opts = {n: problem[n] for n in ("patch_size", "num_neighbors", "num_heads", "key_mask", "similarity")}
    check_sparse_field(field, problem["query"], problem["key"], problem["positions"], **opts)


@pytest.mark.parametrize("backend, device", SPARSE_CASES)
def test_listing_every_pixel_is_the_dense_call(backend, device):
    g = gen(1)
    H, W = (9, 8) if interpreted(backend, device) else (21, 18)
    q, k = to_device(device, torch.rand(2, 4, H, W, generator=g), torch.rand(2, 4, 17, 23, generator=g))
    for iters in (0, 2):
        dense = psal.patchmatch(q, k, num_heads=2, num_iters=iters, generator=gen(5), backend=backend)
        every = torch.ones(H, W, dtype=torch.bool, device=device)
        sparse = psal.patchmatch(q, k, num_heads=2, num_iters=iters, generator=gen(5), backend=backend, positions=every)
        assert torch.equal(sparse.indices, dense.indices.flatten(3)) and torch.equal(sparse.costs, dense.costs.flatten(3))


@pytest.mark.parametrize("backend, device", [c for c in SPARSE_CASES if c.values[0] != "torch"])
def test_compiled_random_start_is_per_pixel(backend, device):
    """numba and Triton draw each pixel's start from (seed, pixel): a listed pixel starts where it
    would in the dense call, whatever else is listed."""
    g = gen(2)
    q, k = torch.rand(1, 3, 30, 26, generator=g), torch.rand(1, 3, 20, 20, generator=g)
    listed = torch.rand(30, 26, generator=g) < 0.2
    q, k, listed_d = to_device(device, q, k, listed)
    dense = psal.patchmatch(q, k, num_iters=0, generator=gen(7), backend=backend)
    sparse = psal.patchmatch(q, k, num_iters=0, generator=gen(7), backend=backend, positions=listed_d)
    assert torch.equal(sparse.indices, dense.indices.flatten(3)[..., listed_d.flatten()])


@pytest.mark.parametrize("backend, device", SPARSE_CASES)
def test_a_connected_region_searches_as_well_as_the_dense_call(backend, device):
    """A disc of about 12% of a 64x64 smooth-noise map: propagation runs inside the region, so the
    mean cost ratio to exact is close to the dense call's on the same pixels."""
    if interpreted(backend, device):
        pytest.skip("25 s through the interpreter; Triton's sparse propagation is checked by the contract and dense-equality tests")
    sparse_ratio, dense_ratio = _region_ratios(backend, device)
    assert 1 - 1e-4 <= sparse_ratio <= dense_ratio * 1.03 + 0.005, (sparse_ratio, dense_ratio)


def _region_ratios(backend, device):
    """Mean cost ratios to exact over a disc of about 12% of a 64x64 smooth-noise map: the
    sparse call's and the dense call's on the same pixels."""
    g = gen(3)
    S = 64
    x = torch.nn.functional.avg_pool2d(torch.rand(2, 3, S + 4, S + 4, generator=g), 5, stride=1)
    q, k = x[:1], x[1:]
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    disc = (yy - S * 15 // 32) ** 2 + (xx - S * 18 // 32) ** 2 <= (S * 7 // 32) ** 2
    exact = psal.exact_knn(q, k, patch_size=5, num_neighbors=3).costs.flatten(3)[..., disc.flatten()].mean()
    q, k, disc_d = to_device(device, q, k, disc)
    dense = psal.patchmatch(q, k, patch_size=5, num_neighbors=3, generator=gen(0), backend=backend)
    sparse = psal.patchmatch(q, k, patch_size=5, num_neighbors=3, generator=gen(0), backend=backend, positions=disc_d)
    dense_ratio = float(dense.costs.flatten(3)[..., disc.flatten().to(device)].mean() / exact)
    sparse_ratio = float(sparse.costs.mean() / exact)
    return sparse_ratio, dense_ratio


@pytest.mark.parametrize("fraction", [0, 10**9], ids=["in-place", "padded-copies"])
def test_numba_sparse_search_in_place_and_on_padded_copies(monkeypatch, fraction):
    """numba's sparse search over a small fraction of the key reads the caller's (N, C, H, W) maps
    in place (clamped coordinates, no sketch, random starts offered at their true cost); forced
    either way, it keeps the contract against the float64 oracle and searches a connected region
    as well as the dense call."""
    from psal.backends.numba import search as numba_search

    monkeypatch.setattr(numba_search, "_IN_PLACE_FRACTION", fraction)

    @settings(max_examples=30)
    @given(problem=problems())
    def check(problem):
        _search_and_check(problem, "numba", "cpu")

    check()
    sparse_ratio, dense_ratio = _region_ratios("numba", "cpu")
    assert 1 - 1e-4 <= sparse_ratio <= dense_ratio * 1.03 + 0.005, (sparse_ratio, dense_ratio)


def test_numba_sparse_search_of_a_few_pixels_reads_in_place(monkeypatch):
    """The rule: listing at most 1/32 of the key's pixels takes the in-place path (which never
    builds the padded channel-last copies); more takes the padded copies."""
    from psal.backends.numba import search as numba_search

    made = []
    real = numba_search.channel_last_rows
    monkeypatch.setattr(numba_search, "channel_last_rows", lambda *a: made.append(1) or real(*a))
    q = torch.rand(1, 3, 32, 32, generator=gen(6))
    psal.patchmatch(q, q, positions=torch.arange(32), backend="numba")
    assert not made
    psal.patchmatch(q, q, positions=torch.arange(33), backend="numba")
    assert made


@pytest.mark.parametrize("backend, device", SPARSE_CASES)
def test_sparse_warm_start_and_empty_lists(backend, device):
    g = gen(4)
    q, k = to_device(device, torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g))
    listed = torch.tensor([0, 5, 17, 18, 19, 100, 255], device=device)
    rough = psal.patchmatch(q, k, num_iters=0, generator=gen(1), backend=backend, positions=listed)
    warm = psal.patchmatch(q, k, num_iters=1, init=rough, generator=gen(2), backend=backend, positions=listed)
    assert (warm.costs <= rough.costs + 1e-6).all()
    again = psal.patchmatch(q, k, num_iters=0, init=rough.indices, generator=gen(3), backend=backend, positions=listed)
    assert (again.costs <= rough.costs + 1e-6).all()
    none = psal.patchmatch(q, k, generator=gen(1), backend=backend, positions=torch.zeros(0, dtype=torch.int64, device=device))
    assert none.indices.shape == (1, 1, 3, 0) and none.indices.device.type == device


# ----------------------------------------------------------------------------------------------
# Attention over sparse queries: every backend's forward (numba's and Triton's backwards are the
# pure-PyTorch one).

SPARSE_ATTEND_CASES = SPARSE_CASES

AGGREGATIONS = ["center", "patch", "patch_mean"]


def _attend_inputs(seed=0, H=6, W=7, Hk=5, Wk=5, C=4, Cv=4, heads=2):
    g = gen(seed)
    q = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    k = torch.randn(2, C, Hk, Wk, generator=g, dtype=torch.float64)
    v = torch.randn(2, Cv, Hk, Wk, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(Hk * Wk, generator=g)[:3] for _ in range(2 * heads * H * W)])
    return q, k, v, idx.view(2, heads, H * W, 3).permute(0, 1, 3, 2).reshape(2, heads, 3, H, W).contiguous()


@pytest.mark.parametrize("backend, device", SPARSE_ATTEND_CASES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_sparse_attention_is_the_dense_one_where_every_vote_is_listed(backend, device, aggregation):
    """Against the independent float64 oracle of the dense call: at a listed pixel whose covering
    patches are all listed (every pixel for "center"), the sparse output is the dense output."""
    from conftest import naive_attention

    q, k, v, idx = _attend_inputs()
    listed = torch.zeros(6, 7, dtype=torch.bool)
    listed[1:5, 1:6] = True
    listed[0, 0] = True
    where = listed.flatten().nonzero().squeeze(1)
    out = psal.attend(*to_device(device, q, k, v, idx.flatten(3)[..., where]), temperature=0.7, aggregation=aggregation,
                      num_heads=2, positions=where.to(device), backend=backend).cpu()  # fmt: skip
    assert out.shape == (2, 4, where.numel())
    want = torch.cat(
        [
            naive_attention(q[:, 2 * h : 2 * h + 2], k[:, 2 * h : 2 * h + 2], v[:, 2 * h : 2 * h + 2], idx[:, h], 0.7, 3, aggregation)
            for h in range(2)
        ],
        1,
    )
    covered = torch.nn.functional.max_pool2d((~listed).float()[None, None], 3, 1, 1)[0, 0] == 0  # all of its 3x3 listed
    check = torch.ones_like(listed) if aggregation == "center" else covered
    sel = check.flatten()[where]
    assert sel.sum() >= 6
    torch.testing.assert_close(out[..., sel], want.flatten(2)[..., where[sel]], rtol=1e-10, atol=1e-10)
    # listing every pixel gives the dense call, values and gradients
    every = torch.ones(6, 7, dtype=torch.bool, device=device)
    a = [t.clone().requires_grad_() for t in to_device(device, q, k, v)]
    b = [t.clone().requires_grad_() for t in to_device(device, q, k, v)]
    grad = torch.randn(2, 4, 6, 7, generator=gen(1), dtype=torch.float64).to(device)
    dense = psal.attend(*a, idx.to(device), aggregation=aggregation, num_heads=2, backend=backend)
    sparse = psal.attend(*b, idx.flatten(3).to(device), aggregation=aggregation, num_heads=2, positions=every, backend=backend)
    torch.testing.assert_close(sparse, dense.flatten(2), rtol=1e-12, atol=1e-12)
    (dense * grad).sum().backward()
    (sparse * grad.flatten(2)).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("patch_size", [1, 3])
def test_sparse_attention_gradcheck(aggregation, patch_size):
    q, k, v, idx = _attend_inputs(seed=2, H=5, W=6)
    where = torch.tensor([0, 1, 2, 7, 8, 13, 14, 15, 29])
    T = torch.tensor(0.9, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v, T)]

    def f(q, k, v, T):
        return psal.attend(q, k, v, idx.flatten(3)[..., where], patch_size=patch_size, temperature=T,
                           aggregation=aggregation, num_heads=2, positions=where)  # fmt: skip

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


_PARTIAL_CASES = [c for c in SPARSE_CASES if c.values[0] != "torch"]


@pytest.mark.parametrize("backend, device", _PARTIAL_CASES)
@pytest.mark.parametrize("similarity", ["l2", "dot"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_attention_matches_torch_on_partial_lists(backend, device, aggregation, dtype, similarity):
    """numba's and Triton's kernels against the pure-PyTorch sparse attention, on random lists
    where many covering patches are not listed (rows with gaps, borders, lone pixels), p = 1, 3, 5."""
    if interpreted(backend, device) and dtype == torch.float32:
        pytest.skip("the interpreter's float64 cases cover the same code")
    for seed, p in [(4, 3), (5, 5), (6, 1)]:
        q, k, v, idx = _attend_inputs(seed=seed, H=9, W=11, Hk=6, Wk=7)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        where = (torch.rand(9 * 11, generator=gen(seed)) < 0.45).nonzero().squeeze(1)
        sub = idx.flatten(3)[..., where]
        T = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        outs, grads = [], []
        for name in ("torch", backend):
            args = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
            out = psal.attend(*args, sub.to(device), patch_size=p, temperature=T, aggregation=aggregation, num_heads=2,
                              positions=where.to(device), backend=name, similarity=similarity)  # fmt: skip
            out.square().sum().backward()
            outs.append(out.detach().cpu())
            grads.append([a.grad.cpu() for a in args])
        # float32: scores reach 75 here, so their logsumexp carries 1e-5 of rounding into the weights
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
        assert outs[0].shape == (2, 4, where.numel())
        torch.testing.assert_close(outs[1], outs[0], **tol)
        for x, y in zip(*grads):  # float32: the gradients of a sum of squares, up to their scale
            scale = float(x.abs().max())
            torch.testing.assert_close(y, x, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_sparse_attention_backends_and_a_search_feeding_it():
    import warnings

    from psal import _dispatch

    q, k, v, _ = _attend_inputs(seed=3)
    q, k, v = q.float(), k.float(), v.float()
    where = torch.tensor([4, 5, 6, 11, 12, 13])
    field = psal.patchmatch(q, k, num_neighbors=3, num_heads=2, positions=where, generator=gen(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "numba missing" warning
        out = psal.attend(q, k, v, field.indices, num_heads=2, aggregation="patch", positions=where)
    assert out.shape == (2, 4, 6)
    assert _dispatch.choose("f", "attend", "auto", torch.device("cpu"), sparse=True).__name__ == "psal.backends.numba.attend"
    assert _dispatch.choose("f", "attend", "triton", torch.device("cuda"), sparse=True).__name__ == "psal.backends.triton.attend"
    # numba's and Triton's sparse forwards pair with the pure-PyTorch sparse backward; dense backwards stay theirs
    cuda = torch.device("cuda")
    assert _dispatch.choose("f", "attend_backward", "triton", cuda, sparse=True).__name__ == "psal.backends.torch.attend"
    assert _dispatch.choose("f", "attend_backward", "triton", cuda).__name__ == "psal.backends.triton.attend"
    cpu = torch.device("cpu")
    assert _dispatch.choose("f", "attend_backward", "numba", cpu, sparse=True).__name__ == "psal.backends.torch.attend"
    assert _dispatch.choose("f", "attend_backward", "auto", cpu, sparse=True).__name__ == "psal.backends.torch.attend"
    assert _dispatch.choose("f", "attend_backward", "numba", cpu).__name__ == "psal.backends.numba.attend"
