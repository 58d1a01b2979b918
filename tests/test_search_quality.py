"""Search quality on natural images against the exact k-NN (PSAL.md's numbers to reason with)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, gen

import psal
from psal import images

PAIRS = [("astronaut", "coffee"), ("coffee", "chelsea"), ("chelsea", "astronaut")]


def smooth_noise(seed: int, size: int = 96) -> torch.Tensor:
    x = torch.rand(1, 3, size + 8, size + 8, generator=gen(seed))
    return F.conv2d(x, torch.ones(3, 1, 5, 5) / 25, groups=3)[:, :, 2 : 2 + size, 2 : 2 + size].contiguous() * 3


@pytest.fixture(scope="module")
def synthetic():
    q, k = smooth_noise(1), smooth_noise(2)
    return q, k, psal.exact_knn(q, k, patch_size=5, num_neighbors=3).costs.mean((0, 1, 3, 4))


@pytest.mark.parametrize("backend, limit", [("numba", 1.115), ("torch", 1.14)])
def test_quality_on_smooth_noise(backend, limit, synthetic):
    """A regression guard that needs no image files. Measured: 1.099 (numba), 1.113 (torch);
    searching around the best match only gave 1.134, no random search 1.33."""
    q, k, exact = synthetic
    field = psal.patchmatch(q, k, patch_size=5, num_neighbors=3, generator=gen(0), backend=backend)
    ratio = field.costs.mean((0, 1, 3, 4)) / exact
    assert (ratio >= 1 - 1e-4).all() and (ratio <= limit).all(), ratio.tolist()


def test_screened_start(synthetic):
    """Random starts screened by the sketch bound (no iteration): measured 2.11 for the 3rd
    match; unscreened starts gave 3.6."""
    q, k, exact = synthetic
    field = psal.patchmatch(q, k, patch_size=5, num_neighbors=3, num_iters=0, generator=gen(0), backend="numba")
    ratio = field.costs.mean((0, 1, 3, 4)) / exact
    assert (ratio <= 2.5).all(), ratio.tolist()


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("skimage")
    out = []
    for qname, kname in PAIRS:
        q = images.load_bundled(qname, 128)
        k = images.load_bundled(kname, 128)
        out.append((qname, kname, q, k, psal.exact_knn(q, k, patch_size=7, num_neighbors=3)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_cost_within_five_percent_of_exact(backend, problems):
    """128x128 RGB, p = 7, k = 3, default iterations: each of the k mean costs within 5%."""
    if backend == "triton":
        pytest.skip("3 minutes through Triton's interpreter; test_triton_search.py checks quality at 32x32")
    for qname, kname, q, k, exact in problems:
        field = psal.patchmatch(q, k, patch_size=7, num_neighbors=3, generator=gen(0), backend=backend)
        ratio = field.costs.mean((0, 1, 3, 4)) / exact.costs.mean((0, 1, 3, 4))
        assert (ratio >= 1 - 1e-4).all(), f"{qname}->{kname}: better than exact? {ratio.tolist()}"
        assert (ratio <= 1.05).all(), f"{qname}->{kname}: mean cost ratios {ratio.tolist()}"


def test_self_match_is_found():
    """Query = key: every pixel's best match is itself, at cost 0."""
    q = images.load_bundled("astronaut", 64)
    field = psal.patchmatch(q, q, patch_size=5, num_neighbors=1, generator=gen(0))
    assert (field.costs == 0).float().mean() > 0.97
