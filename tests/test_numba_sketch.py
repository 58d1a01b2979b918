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


def test_channel_last_copy_is_the_padded_permuted_map():
    """``layout.channel_last`` (one allocation, the border replicated in place) against
    replicate padding then a channel-last copy, bitwise, down to 1 x 1 maps and one-frame
    volumes."""
    import torch.nn.functional as F

    from psal.backends.layout import channel_last

    for shape, pad in [((2, 3, 5, 7), 0), ((2, 3, 5, 7), 2), ((1, 11, 1, 1), 3), ((1, 4, 3, 9), 1)]:
        x = torch.randn(shape, dtype=torch.float64)
        for dtype in (None, torch.float32):
            ref = x if dtype is None else x.to(dtype)
            ref = (F.pad(ref, (pad,) * 4, mode="replicate") if pad else ref).permute(0, 2, 3, 1)
            assert torch.equal(channel_last(x, dtype, pad), ref)
    # volumes, padded in time as well: against replicate padding of all three sides
    for shape, pad_t, pad in [((2, 3, 4, 5, 7), 1, 2), ((1, 2, 1, 1, 3), 2, 1), ((1, 5, 3, 4, 4), 0, 1), ((1, 2, 2, 3, 3), 1, 0)]:
        x = torch.randn(shape, dtype=torch.float64)
        ref = F.pad(x, (pad, pad, pad, pad, pad_t, pad_t), mode="replicate").permute(0, 2, 3, 4, 1)
        assert torch.equal(channel_last(x, None, pad, pad_t), ref)


@pytest.mark.parametrize("pt, p, T", [(3, 5, 5), (3, 3, 5), (5, 3, 3), (1, 5, 4), (3, 3, 1)])
def test_volume_sketch_distance_is_a_lower_bound_of_the_space_time_cost(pt, p, T):
    """The sketch of a video's space-time patches (each filter on every frame, spread over the
    patch's ``pt`` frames, clamped in time as the cost is): its distance is a lower bound of the
    whole space-time patch cost, tighter than one frame's filters alone, and the same whether the
    video lies channel-first or channel-last in memory."""
    g = torch.Generator().manual_seed(pt * p + T)
    H, W, C = 12, 14, 3
    video = torch.rand(1, C, T, H, W, generator=g).cumsum(-1).cumsum(-2).cumsum(-3) / 100  # smooth in space and time
    r = p // 2
    basis = numba_search._sketch_basis(p, C, video.reshape(1, C, T * H, W), 8)
    sk = torch.from_numpy(numba_search._volume_sketch(video, r, basis, pt)).flatten(0, 2)  # (T * H * W, D)
    last = video.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(torch.from_numpy(numba_search._volume_sketch(last, r, basis, pt)).flatten(0, 2), sk)
    one = torch.from_numpy(numba_search._volume_sketch(video, r, basis, 1)).flatten(0, 2)
    # the spread by hand: the frames' sketches summed over clamp(t + d - pt // 2), over sqrt(pt)
    frames = one.view(T, H * W, -1)
    spread = sum(frames[(torch.arange(T) + d - pt // 2).clamp(0, T - 1)] for d in range(pt)) / pt**0.5
    torch.testing.assert_close(sk, spread.flatten(0, 1), rtol=1e-5, atol=1e-6)
    qi = torch.randperm(T * H * W, generator=g)[:400].sort().values
    ki = torch.randint(0, T * H * W, (qi.numel(),), generator=g)
    cost = PatchCosts(video, video, (pt, p, p), "l2", qi)(ki.view(1, 1, -1))[0, 0]
    bound = (sk[qi] - sk[ki]).square().sum(-1)
    assert (bound <= cost * (1 + 1e-5) + 1e-5).all()
    if pt > 1 and T > 1:
        assert bound.mean() > (one[qi] - one[ki]).square().sum(-1).mean()
