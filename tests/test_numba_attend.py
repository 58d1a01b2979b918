"""The compiled CPU attention against the pure-PyTorch reference: outputs, statistics, gradients.

The reference (``psal.backends.torch.attend``) is itself gradchecked and checked against a brute-force
oracle elsewhere, so agreement with it to rounding is the contract here. Also: heavy collisions
of many queries on a few key positions, bitwise determinism across runs and thread counts, NaN
propagation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from psal.backends.torch import attend as ref

numba = pytest.importorskip("numba")
nb = pytest.importorskip("psal.backends.numba.attend")

AGGREGATIONS = ["center", "patch", "patch_mean"]
SIMILARITIES = ["l2", "dot"]
# (N, C, Cv, H, W, Hk, Wk): 1x1 maps, primes, H != W, query size != key size, maps smaller
# than a patch, single rows and columns, N = 1 and N = 3.
SHAPES = [
    (1, 3, 2, 1, 1, 1, 1),
    (3, 2, 3, 7, 5, 11, 13),
    (1, 4, 1, 1, 9, 5, 1),
    (2, 1, 4, 13, 3, 2, 17),
    (3, 5, 3, 6, 6, 3, 3),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def make(shape, K, p, dtype, seed, indices=None):
    N, C, Cv, H, W, Hk, Wk = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(N, C, Hk, Wk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(N, Cv, Hk, Wk, generator=g, dtype=torch.float64).to(dtype)
    if indices is None:  # repeats allowed, across pixels and within one pixel's list
        indices = torch.randint(0, Hk * Wk, (N, K, H, W), generator=g)
    # Scores of order 1, so that the weights spread and every gradient term matters.
    T = torch.tensor(0.5 * C * p * p, dtype=dtype)
    grad = torch.randn(N, Cv, H, W, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, indices, T, grad


def both(q, k, v, idx, T, grad, p, aggregation, similarity):
    """``(out, stat, gq, gk, gv, gT)`` from each implementation, the same upstream ``out``/``stat``."""
    results = []
    for mod in (ref, nb):
        out, stat = mod.attend_forward(q, k, v, idx, T, p, aggregation, similarity)
        results.append((out, stat))
    out, stat = results[0]
    for i, mod in enumerate((ref, nb)):
        results[i] += tuple(mod.attend_backward(grad, q, k, v, idx, T, out, stat, p, aggregation, similarity))
    return results


def assert_match(expected, actual, tol, what=""):
    """Max error within ``tol`` of the largest entry; of 1 at least, the scale of the inputs and
    scores, since a result can be an exact 0 (K = 1) that rounding of its terms leaves at 1e-7."""
    names = ["out", "stat", "grad_query", "grad_key", "grad_value", "grad_temperature"]
    for name, e, a in zip(names, expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, name, a.shape, a.dtype)
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (a - e).abs().max().item() if e.numel() else 0.0
        assert err <= tol * max(scale, 1.0), f"{what} {name}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_matches_reference_on_a_grid(dtype, aggregation, similarity):
    for (p, K), (s, shape) in itertools.product([(1, 1), (1, 3), (3, 1), (3, 3), (5, 1), (5, 3)], enumerate(SHAPES)):
        q, k, v, idx, T, grad = make(shape, K, p, dtype, seed=100 * p + 10 * K + s)
        expected, actual = both(q, k, v, idx, T, grad, p, aggregation, similarity)
        assert_match(expected, actual, TOL[dtype], f"{shape} p={p} K={K}")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("p", [1, 3, 5])
def test_heavy_collisions(aggregation, p):
    """Every query pixel matches one of two key positions: hundreds of entries per key list."""
    shape = (2, 3, 2, 17, 19, 9, 8)
    N, _, _, H, W, Hk, Wk = shape
    g = torch.Generator().manual_seed(p)
    two = torch.tensor([0, Hk * Wk // 2 + 3])  # a corner (border folding) and an interior position
    idx = two[torch.randint(0, 2, (N, 3, H, W), generator=g)]
    for similarity in SIMILARITIES:
        q, k, v, idx, T, grad = make(shape, 3, p, torch.float64, seed=p, indices=idx)
        expected, actual = both(q, k, v, idx, T, grad, p, aggregation, similarity)
        assert_match(expected, actual, TOL[torch.float64], similarity)
        assert (actual[3].abs().sum((1, 2, 3)) > 0).all()


def test_half_precision_inputs_are_computed_in_float32():
    shape = (2, 4, 3, 9, 7, 6, 5)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, idx, T, grad = make(shape, 3, 3, dtype, seed=7)
        expected, actual = both(q, k, v, idx, T, grad, 3, "patch", "l2")
        assert actual[0].dtype == torch.float32 and actual[5].dtype == torch.float32
        assert_match(expected, actual, 1e-4, str(dtype))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 4, 7, generator=g, dtype=torch.float64).transpose(1, 3)  # (2, 7, 4, 9)
    k = torch.randn(2, 7, 12, 6, generator=g, dtype=torch.float64)[:, :, ::2]  # (2, 7, 6, 6)
    v = torch.randn(2, 6, 6, 5, generator=g, dtype=torch.float64).permute(0, 3, 1, 2)  # (2, 5, 6, 6)
    idx = torch.randint(0, 36, (2, 9, 3, 4), generator=g).permute(0, 2, 3, 1)  # (2, 3, 4, 9)
    T = torch.tensor(20.0, dtype=torch.float64)
    grad = torch.randn(2, 5, 4, 9, generator=g, dtype=torch.float64)
    for aggregation in AGGREGATIONS:
        expected, actual = both(q, k, v, idx, T, grad, 3, aggregation, "l2")
        assert_match(expected, actual, 1e-10, aggregation)


def _backward(args, p, aggregation, similarity):
    q, k, v, idx, T, grad = args
    out, stat = nb.attend_forward(q, k, v, idx, T, p, aggregation, similarity)
    return (out, stat) + tuple(nb.attend_backward(grad, q, k, v, idx, T, out, stat, p, aggregation, similarity))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_bitwise_deterministic_across_runs_and_thread_counts(aggregation):
    shape = (3, 8, 5, 33, 29, 10, 12)
    N, _, _, H, W, Hk, Wk = shape
    g = torch.Generator().manual_seed(11)
    few = torch.tensor([0, 5, 61, Hk * Wk - 1])  # collisions everywhere, borders included
    idx = few[torch.randint(0, 4, (N, 3, H, W), generator=g)]
    args = make(shape, 3, 5, torch.float32, seed=11, indices=idx)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # all of them (a test worker may run on fewer)
        first = _backward(args, 5, aggregation, "l2")
        again = _backward(args, 5, aggregation, "l2")
        numba.set_num_threads(1)
        single = _backward(args, 5, aggregation, "l2")
    finally:
        numba.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nan_propagates(aggregation):
    shape = (2, 3, 2, 8, 9, 7, 6)
    q, k, v, idx, T, grad = make(shape, 3, 3, torch.float64, seed=5)
    q[0, 1, 4, 4] = float("nan")  # poisons the costs of every patch covering (4, 4) in map 0
    v[1, 0, 3, 2] = float("nan")  # an interior value position, read by whoever matches it
    expected, actual = both(q, k, v, idx, T, grad, 3, aggregation, "l2")
    out = actual[0]
    assert out[0, :, 4, 4].isnan().all()
    assert not out[0, :, 0, 8].isnan().any(), "far from the NaN, map 0 stays finite"
    for e, a in zip(expected, actual):
        assert torch.equal(e.isnan(), a.isnan())
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, equal_nan=True)
    assert all(t.isnan().any() for t in actual)


def test_infinite_scores_give_the_reference_statistic():
    # An infinite query value makes every l2 cost of its pixel +inf, every score -inf: the
    # logsumexp is then -inf (torch's rule), not NaN.

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=g) for _ in range(3))
    q[0, 0, 1, 1] = float("inf")
    idx = torch.randint(0, 9, (1, 2, 3, 3), generator=g)
    T = torch.tensor(1.0, dtype=torch.float64)
    _, want = ref.attend_forward(q, k, v, idx, T, 1, "center", "l2")
    _, got = nb.attend_forward(q, k, v, idx, T, 1, "center", "l2")
    assert want[0, 1, 1] == float("-inf")
    torch.testing.assert_close(got, want, equal_nan=True)
