"""Search quality on natural images against the exact k-NN (PSAL.md's numbers to reason with)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, gen

import psal

images = pytest.importorskip("psal.images")
pytest.importorskip("skimage")

PAIRS = [("astronaut", "coffee"), ("coffee", "chelsea"), ("chelsea", "astronaut")]


@pytest.fixture(scope="module")
def problems():
    out = []
    for qname, kname in PAIRS:
        q = images.load_bundled(qname, 128)
        k = images.load_bundled(kname, 128)
        out.append((qname, kname, q, k, psal.exact_knn(q, k, patch_size=7, num_neighbors=3)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_cost_within_five_percent_of_exact(backend, problems):
    """128x128 RGB, p = 7, k = 3, default iterations: each of the k mean costs within 5%."""
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
