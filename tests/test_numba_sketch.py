"""The numba search's sketch: its filters are orthonormal, so its distance is a lower bound."""

from __future__ import annotations

import pytest
import torch

from psal.backends.torch.search import PatchCosts

numba_search = pytest.importorskip("psal.backends.numba.search")


@pytest.mark.parametrize("C, p", [(3, 7), (1, 5), (64, 3), (5, 1), (2, 9)])
def test_sketch_distance_is_a_lower_bound_of_the_cost(C, p):
    g = torch.Generator().manual_seed(C * p)
    key = torch.rand(2, C, 30, 40, generator=g).cumsum(-1)  # some smooth structure
    query = torch.rand(2, C, 20, 25, generator=g).cumsum(-1)
    basis = numba_search._sketch_basis(p, C, key, 8)
    filters = (basis.chans[basis.which][:, :, None, None] * basis.spatial[:, None]).flatten(1)
    gram = filters @ filters.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    sq = torch.from_numpy(numba_search._sketch(query, p // 2, basis)).flatten(1, 2)  # (2, 500, D)
    sk = torch.from_numpy(numba_search._sketch(key, p // 2, basis)).flatten(1, 2)  # (2, 1200, D)
    idx = torch.randint(0, 1200, (2, 4, 500), generator=g)
    cost = PatchCosts(query, key, p, "l2")(idx)
    bound = (sq[:, None] - torch.stack([sk[n][idx[n]] for n in range(2)])).square().sum(-1)
    assert (bound <= cost * (1 + 1e-5) + 1e-4).all()
    assert (bound > 0.1 * cost).float().mean() > 0.5, "the bound should carry real information"
