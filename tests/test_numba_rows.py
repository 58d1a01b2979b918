"""The numba kernels' SIMD row sums against numpy in float64.

``_row_cost`` and ``_row_neg_dot`` are LLVM written by hand (full vectors, then one masked vector
for the tail), so every length around the vector widths (16 float32 lanes, 8 float64 lanes) is
checked, at offsets that leave the rows unaligned, with the row ending exactly at the array's end
(a masked-off lane must not read past it), and with NaN and infinite values.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
kernels = pytest.importorskip("psal.backends.numba.kernels")

from numba import njit  # noqa: E402


@njit(cache=False)
def _both(a, ao, b, bo, n):
    return kernels._row_cost(a, ao, b, bo, n), kernels._row_neg_dot(a, ao, b, bo, n)


LENGTHS = list(range(0, 42)) + [47, 48, 49, 63, 64, 65, 147, 192, 576]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_match_numpy(dtype):
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for n in LENGTHS:
        for ao, bo in [(0, 0), (1, 0), (3, 5), (7, 13)]:
            # The rows end at their arrays' last element: a tail lane that read past it would
            # touch memory the array does not own (and, masked or not, must not change the sum).
            a = rng.standard_normal(ao + n).astype(dtype)
            b = rng.standard_normal(bo + n).astype(dtype)
            x, y = a[ao:].astype(np.float64), b[bo:].astype(np.float64)
            cost, neg_dot = _both(a, ao, b, bo, n)
            want_cost, want_dot = ((x - y) ** 2).sum(), -(x * y).sum()
            scale = max(1.0, float((x * x).sum() + (y * y).sum()))
            assert abs(float(cost) - want_cost) <= tol * scale, (n, ao, bo)
            assert abs(float(neg_dot) - want_dot) <= tol * scale, (n, ao, bo)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_a_hand_computed_case(dtype):
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=dtype)
    b = np.array([9.0, 2.0, 1.0, 0.0, 7.0, -1.0], dtype=dtype)
    # a[1:4] = (2, 3, 4) against b[2:5] = (1, 0, 7): squares 1 + 9 + 9, dot 2 + 0 + 28.
    cost, neg_dot = _both(a, 1, b, 2, 3)
    assert cost == 19.0 and neg_dot == -30.0
    assert _both(a, 0, b, 0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [3, 16, 21, 40])
def test_rows_keep_nan_and_inf(dtype, n):
    a = np.ones(n, dtype=dtype)
    b = np.zeros(n, dtype=dtype)
    a[n - 1] = np.nan  # in the masked tail for n = 3, 21 and 40, in a full vector for 16
    cost, neg_dot = _both(a, 0, b, 0, n)
    assert np.isnan(cost) and np.isnan(neg_dot)
    a[n - 1] = np.inf
    cost, _ = _both(a, 0, b, 0, n)
    assert cost == np.inf
