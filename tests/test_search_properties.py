"""Properties every search backend must have, over many random shapes and options.

The sizes here are for compiled kernels: numba and torch on the CPU, Triton and torch on a GPU
(``NATIVE_CASES``). Triton through its interpreter (no GPU) runs the same properties at smaller
sizes in ``test_triton_search.py``: at these sizes it took 5 minutes of a 10-minute budget.
Only the cheap ones run here for every case."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, NATIVE_CASES, check_field, field_to, gen, random_key_mask, to_device
from hypothesis import given, settings
from hypothesis import strategies as st

import psal


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    C = heads * draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    Hk, Wk = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    p = draw(st.sampled_from([1, 3, 5, 7, 2 * max(H, W, Hk, Wk) + 1]))
    use_mask = draw(st.booleans())
    K = draw(st.integers(1, min(5, Hk * Wk)))
    seed = draw(st.integers(0, 2**31))
    g = gen(seed)
    mask = None
    if use_mask:
        mask = random_key_mask(B, Hk, Wk, K, draw(st.sampled_from([0.2, 0.5, 0.9])), g)
    return dict(
        query=torch.randn(B, C, H, W, generator=g),
        key=torch.randn(B, C, Hk, Wk, generator=g),
        patch_size=p,
        num_neighbors=K,
        num_heads=heads,
        key_mask=mask,
        similarity=draw(st.sampled_from(["l2", "dot"])),
        num_iters=draw(st.integers(0, 3)),
        seed=seed,
    )


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
@settings(max_examples=60)
@given(problem=problems())
def test_field_contract(backend, device, problem):
    _search_and_check(problem, backend, device)


def _search_and_check(problem, backend, device):
    """One drawn problem searched on ``backend`` and checked against the contract."""
    seed = problem.pop("seed")
    iters = problem.pop("num_iters")
    problem["query"], problem["key"], problem["key_mask"] = to_device(device, problem["query"], problem["key"], problem["key_mask"])
    field = psal.patchmatch(**problem, num_iters=iters, generator=gen(seed), backend=backend)
    opts = {n: problem[n] for n in ("patch_size", "num_neighbors", "num_heads", "key_mask", "similarity")}
    check_field(field, problem["query"], problem["key"], **opts)


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_batch_elements_never_mix(backend, device):
    """Each batch element's query is a crop of its own noise key at its own offset: find it."""
    g = gen(7)
    shifts = [(0, 0), (5, 2), (3, 9), (8, 8)]
    key = torch.rand(len(shifts), 3, 32, 32, generator=g)
    query = torch.stack([key[b, :, dy : dy + 22, dx : dx + 20] for b, (dy, dx) in enumerate(shifts)])
    query, key = to_device(device, query, key)
    field = psal.patchmatch(query, key, patch_size=5, num_neighbors=2, generator=gen(1), backend=backend)
    check_field(field, query, key, patch_size=5, num_neighbors=2)
    field = field_to(field, "cpu")
    rows = torch.arange(22).view(22, 1)
    cols = torch.arange(20).view(1, 20)
    interior = (slice(2, -2), slice(2, -2))  # pixels whose whole patch lies inside the crop
    for b, (dy, dx) in enumerate(shifts):
        want = ((rows + dy) * 32 + cols + dx)[interior]
        found = field.indices[b, 0, 0][interior] == want
        assert found.float().mean() > 0.98, f"element {b}: shift found for {found.float().mean():.2%}"
        assert field.costs[b, 0, 0][interior][found].abs().max() < 1e-5


@pytest.mark.parametrize("backend, device", CASES)
def test_single_allowed_key_takes_every_query(backend, device):
    g = gen(3)
    q, k = torch.randn(3, 2, 9, 7, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    mask = torch.zeros(3, 6, 8, dtype=torch.bool)
    spots = [(0, 0), (5, 7), (2, 3)]
    for b, (y, x) in enumerate(spots):
        mask[b, y, x] = True
    q, k, mask = to_device(device, q, k, mask)
    field = field_to(psal.patchmatch(q, k, num_neighbors=1, key_mask=mask, generator=gen(0), backend=backend), "cpu")
    for b, (y, x) in enumerate(spots):
        assert (field.indices[b] == y * 8 + x).all()


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_same_seed_same_field(backend, device):
    g = gen(5)
    q, k = to_device(device, torch.rand(2, 3, 20, 17, generator=g), torch.rand(2, 3, 15, 22, generator=g))
    a = psal.patchmatch(q, k, generator=gen(11), backend=backend)
    b = psal.patchmatch(q, k, generator=gen(11), backend=backend)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.costs, b.costs)
    for iters in (0, 2):
        c = psal.patchmatch(q, k, generator=gen(12), backend=backend, num_iters=iters)
        d = psal.patchmatch(q, k, generator=gen(13), backend=backend, num_iters=iters)
        assert not torch.equal(c.indices, d.indices)
    torch.manual_seed(4)
    e = psal.patchmatch(q, k, backend=backend)
    torch.manual_seed(4)
    f = psal.patchmatch(q, k, backend=backend)
    assert torch.equal(e.indices, f.indices), "generator=None must follow torch.manual_seed"


def test_numba_result_does_not_depend_on_thread_count():
    """One tall map: its bands are split between threads, so a read across a band boundary (a
    race) or a schedule-dependent random stream would show."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    g = gen(9)
    q, k = torch.rand(1, 3, 160, 24, generator=g), torch.rand(1, 3, 150, 30, generator=g)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = psal.patchmatch(q, k, generator=gen(2), backend="numba")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # all of them (a test worker may run on fewer)
        b = psal.patchmatch(q, k, generator=gen(2), backend="numba")
    finally:
        numba.set_num_threads(before)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_propagation_crosses_the_whole_column(backend, device):
    """A 64x1 query cut from a 400x400 noise key, far too large for random search to hit the
    exact match: only the first 4 rows start on it, so propagation must carry it down the column
    (through every parallel band boundary)."""
    g = gen(1)
    H, dy, dx = 64, 100, 200
    key = torch.rand(1, 3, 400, 400, generator=g)
    query = key[:, :, dy : dy + H, dx : dx + 1].clone()
    want = (torch.arange(H) + dy) * 400 + dx
    init = torch.zeros(1, 1, 1, H, 1, dtype=torch.int64)
    init[0, 0, 0, :4, 0] = want[:4]
    query, key = to_device(device, query, key)
    field = psal.patchmatch(
        query, key, patch_size=1, num_neighbors=1, num_iters=40,
        init=field_to(psal.KNNField(init, torch.zeros(1, 1, 1, H, 1)), device), generator=gen(0), backend=backend,
    )  # fmt: skip
    found = field.indices[0, 0, 0, :, 0].cpu() == want
    assert found.all(), found.int().tolist()


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
@pytest.mark.parametrize("similarity", ["l2", "dot"])
def test_warm_start_is_never_worse(backend, device, similarity):
    g = gen(21)
    q, k = to_device(device, torch.rand(2, 4, 18, 21, generator=g), torch.rand(2, 4, 16, 19, generator=g))
    opts = dict(patch_size=3, num_heads=2, similarity=similarity, backend=backend)
    rough = psal.patchmatch(q, k, num_neighbors=3, num_iters=1, generator=gen(1), **opts)
    for iters in (0, 2):
        warm = psal.patchmatch(q, k, num_neighbors=3, num_iters=iters, init=rough, generator=gen(2), **opts)
        assert (warm.costs <= rough.costs + 1e-6).all()
    # a warm start with another k: the best match never gets worse
    wide = psal.patchmatch(q, k, num_neighbors=5, num_iters=0, init=rough, generator=gen(3), **opts)
    assert (wide.costs[:, :, 0] <= rough.costs[:, :, 0] + 1e-6).all()
    # from the exact field, the exact field comes back
    exact = psal.exact_knn(q, k, patch_size=3, num_neighbors=3, num_heads=2, similarity=similarity)
    again = psal.patchmatch(q, k, num_neighbors=3, num_iters=1, init=exact, generator=gen(4), **opts)
    torch.testing.assert_close(again.costs, exact.costs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_more_iterations_approach_exact(backend, device):
    g = gen(8)
    q, k = to_device(device, torch.rand(1, 3, 24, 24, generator=g), torch.rand(1, 3, 24, 24, generator=g))
    exact = psal.exact_knn(q, k, patch_size=3, num_neighbors=2).costs.mean()
    ratios = [
        float(psal.patchmatch(q, k, patch_size=3, num_neighbors=2, num_iters=n, generator=gen(0), backend=backend).costs.mean() / exact)
        for n in (0, 2, 8)
    ]
    assert ratios[0] > ratios[1] > ratios[2] >= 1.0 - 1e-6


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_non_finite_inputs_stay_in_range(backend, device):
    g = gen(4)
    q, k = torch.randn(2, 3, 12, 13, generator=g), torch.randn(2, 3, 10, 9, generator=g)
    q[0, :, 3:6, 3:6] = float("nan")
    k[1, 1, 2:4, :] = float("inf")
    k[0, 0, 0, 0] = float("-inf")
    q, k = to_device(device, q, k)
    for similarity in ("l2", "dot"):
        field = psal.patchmatch(q, k, num_neighbors=3, similarity=similarity, generator=gen(0), backend=backend)
        idx = field.indices
        assert int(idx.min()) >= 0 and int(idx.max()) < 90
        assert (idx.sort(2).values.diff(dim=2) != 0).all()
        assert not torch.isnan(field.costs).any()
    everything_nan = psal.patchmatch(torch.full_like(q, float("nan")), k, num_neighbors=3, backend=backend)
    assert int(everything_nan.indices.max()) < 90 and torch.isinf(everything_nan.costs).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_empty_inputs_give_empty_fields(backend, device):
    def rand(*size):
        return torch.rand(*size, device=device)

    field = psal.patchmatch(rand(0, 3, 8, 8), rand(0, 3, 5, 5), num_neighbors=2, backend=backend)
    assert field.indices.shape == (0, 1, 2, 8, 8) and field.costs.shape == (0, 1, 2, 8, 8)
    assert field.indices.device.type == device and field.costs.device.type == device
    field = psal.patchmatch(rand(2, 4, 0, 8), rand(2, 4, 5, 5), num_heads=2, backend=backend)
    assert field.indices.shape == (2, 2, 3, 0, 8) and field.indices.device.type == device
    exact = psal.exact_knn(rand(0, 3, 8, 8), rand(0, 3, 5, 5))
    assert exact.costs.shape == (0, 1, 3, 8, 8) and exact.costs.device.type == device


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_low_precision_and_non_contiguous_inputs(backend, device):
    g = gen(6)
    q = torch.rand(2, 3, 16, 20, generator=g).to(device)
    k = torch.rand(2, 20, 14, 3, generator=g).to(device).permute(0, 3, 2, 1)  # non-contiguous (2, 3, 14, 20)
    assert not k.is_contiguous()
    ref = psal.patchmatch(q, k.contiguous(), generator=gen(1), backend=backend)
    again = psal.patchmatch(q, k, generator=gen(1), backend=backend)
    assert torch.equal(ref.indices, again.indices)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        field = psal.patchmatch(q.to(dtype), k.to(dtype), generator=gen(1), backend=backend)
        check_field(field, q.to(dtype), k.to(dtype), patch_size=3, num_neighbors=3)


@pytest.mark.parametrize("threshold", [0.0, 2.0], ids=["with-sketch", "without-sketch"])
def test_numba_field_contract_with_and_without_the_sketch(monkeypatch, threshold):
    """numba screens candidates by a lower-bound sketch only where it keeps enough of the key
    patches' variance (``_SKETCH_MIN_CAPTURED``); forced either way, the field keeps the contract."""
    from psal.backends.numba import search as numba_search

    monkeypatch.setattr(numba_search, "_SKETCH_MIN_CAPTURED", threshold)

    @settings(max_examples=40)
    @given(problem=problems())
    def check(problem):
        _search_and_check(problem, "numba", "cpu")

    check()


def test_numba_sketch_is_used_where_it_keeps_the_variance():
    """The rule's input: the share of the key patches' variance that the sketch keeps is high for
    a natural picture and low for white noise with many channels."""
    from psal.backends.numba import search as numba_search
    from psal.images import load_bundled

    picture = load_bundled("astronaut", 64)
    noise = torch.randn(1, 64, 64, 64, generator=gen(8))
    assert numba_search._sketch_basis(7, 3, picture, 8).captured > 0.8
    assert numba_search._sketch_basis(3, 64, noise, 8).captured < 0.05 < numba_search._SKETCH_MIN_CAPTURED
