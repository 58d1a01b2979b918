"""psal.apps.inpaint: the contract (known pixels kept bit for bit, shapes, dtypes, determinism,
validation) and quality where the answer is known: a hole in a periodic picture, whose content
is fixed by the pattern itself, must come back almost exactly."""

from __future__ import annotations

import pytest
import torch

from psal.apps.inpaint import inpaint


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def periodic(height: int, width: int, period: tuple, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random colours on one ``period`` cell, tiled: ``Tensor[1, C, H, W]`` in ``[0, 1]``."""
    cell = torch.rand(1, channels, *period, generator=gen(seed))
    reps = (-(-height // period[0]), -(-width // period[1]))
    return cell.repeat(1, 1, *reps)[..., :height, :width].contiguous()


def box(height: int, width: int, top: int, left: int, size: tuple) -> torch.Tensor:
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
    mask[..., top : top + size[0], left : left + size[1]] = True
    return mask


def hole_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.expand_as(a)
    mse = (a[m].double() - b[m].double()).square().mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-20)))


def blobs(height: int, width: int, seed: int) -> torch.Tensor:
    """A few random rectangles, about a fifth of the picture."""
    g = gen(seed)
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
    for _ in range(3):
        h, w = (int(v) for v in torch.randint(height // 8, height // 3, (2,), generator=g))
        y = int(torch.randint(0, height - h, (1,), generator=g))
        x = int(torch.randint(0, width - w, (1,), generator=g))
        mask[..., y : y + h, x : x + w] = True
    return mask


# ----------------------------------------------------------------------------------------------
# The contract.


@pytest.mark.parametrize(
    "shape, dtype, mask_dims",
    [((1, 3, 48, 64), torch.float32, 4), ((1, 1, 37, 53), torch.float64, 3), ((1, 3, 40, 40), torch.float16, 2)],
)
def test_known_pixels_are_bitwise_unchanged(shape, dtype, mask_dims):
    image = torch.rand(shape, generator=gen(1)).to(dtype)
    mask = blobs(shape[2], shape[3], seed=2)
    out = inpaint(image, mask.reshape(mask.shape[-mask_dims:]), generator=gen(0))
    assert out.shape == image.shape and out.dtype == image.dtype and out.device == image.device
    known = ~mask.expand_as(image)
    assert torch.equal(out[known], image[known])
    assert torch.isfinite(out).all()
    # The hole is written with values from the known region's range, not left as it was.
    assert not torch.equal(out[~known], image[~known])
    assert out[~known].min() >= image[known].min() and out[~known].max() <= image[known].max()


def test_the_input_is_not_modified():
    image = torch.rand(1, 3, 32, 32, generator=gen(3))
    before = image.clone()
    inpaint(image, box(32, 32, 10, 10, (8, 8)), generator=gen(0))
    assert torch.equal(image, before)


def test_same_generator_same_result():
    image = periodic(64, 64, (7, 9), seed=4) * 0.5 + 0.5 * torch.rand(1, 3, 64, 64, generator=gen(5))
    mask = blobs(64, 64, seed=6)
    a = inpaint(image, mask, generator=gen(11))
    b = inpaint(image, mask, generator=gen(11))
    assert torch.equal(a, b)


def test_progress_reports_every_round_and_ends_at_total():
    calls = []
    image = periodic(48, 48, (6, 6), seed=7)
    inpaint(image, box(48, 48, 16, 16, (12, 12)), generator=gen(0), progress=lambda d, t: calls.append((d, t)))
    assert calls, "progress was never called"
    done = [d for d, _ in calls]
    totals = {t for _, t in calls}
    assert len(totals) == 1 and done == sorted(done) and done[-1] == totals.pop()


# ----------------------------------------------------------------------------------------------
# Quality where the right fill is known.


@pytest.mark.parametrize(
    "period, hole, k",
    # random cells; horizontal stripes; several matches per patch
    [((8, 8), (20, 20), 1), ((5, 11), (16, 24), 1), ((12, 1), (18, 30), 1), ((7, 6), (20, 20), 3)],
)
def test_periodic_hole_is_filled_almost_exactly(period, hole, k):
    truth = periodic(72, 80, period, seed=period[0] * 100 + period[1])
    mask = box(72, 80, 30, 28, hole)
    out = inpaint(truth, mask, num_neighbors=k, generator=gen(0))
    ours = hole_psnr(out, truth, mask)
    # A constant fill (the mean colour of the known part) is what a smooth method converges to.
    mean = truth[~mask.expand_as(truth)].reshape(3, -1).mean(1).view(1, 3, 1, 1)
    constant = hole_psnr(torch.where(mask, mean, truth), truth, mask)
    assert ours > 35.0, f"hole PSNR {ours:.1f} dB"
    assert ours > constant + 20.0, f"hole PSNR {ours:.1f} dB against {constant:.1f} dB for a constant fill"


def test_gray_checkerboard_with_two_holes():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    truth = (((yy // 4) + (xx // 4)) % 2).float()[None, None] * 0.8 + 0.1
    mask = box(64, 64, 8, 8, (14, 10)) | box(64, 64, 36, 40, (12, 16))
    out = inpaint(truth, mask, generator=gen(1))
    assert hole_psnr(out, truth, mask) > 35.0


def test_torch_backend_fills_the_same_pattern():
    truth = periodic(32, 32, (6, 6), seed=9)
    mask = box(32, 32, 12, 12, (8, 8))
    out = inpaint(truth, mask, patch_size=5, num_iters=3, generator=gen(0), backend="torch")
    assert torch.equal(out[~mask.expand_as(out)], truth[~mask.expand_as(truth)])
    assert hole_psnr(out, truth, mask) > 30.0


# ----------------------------------------------------------------------------------------------
# Validation: one readable error naming the argument and the shapes.


def _good():
    return torch.rand(1, 3, 32, 32, generator=gen(0)), box(32, 32, 8, 8, (8, 8))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda im, m: (im.numpy(), m), TypeError, ["image", "ndarray"]),
        (lambda im, m: (im[0], m), ValueError, ["image", "(1, C, H, W)", "(3, 32, 32)"]),
        (lambda im, m: (im.expand(2, 3, 32, 32), m), ValueError, ["image", "(2, 3, 32, 32)"]),
        (lambda im, m: ((im * 255).to(torch.uint8), m), TypeError, ["image", "torch.uint8"]),
        (lambda im, m: (im, m.to(torch.uint8)), TypeError, ["mask", "torch.bool", "torch.uint8"]),
        (lambda im, m: (im, m[..., :31, :]), ValueError, ["mask", "(1, 1, 31, 32)", "(1, 3, 32, 32)"]),
        (lambda im, m: (im, m.expand(2, 1, 32, 32)), ValueError, ["mask", "(2, 1, 32, 32)"]),
        (lambda im, m: (im, torch.zeros_like(m)), ValueError, ["mask", "empty"]),
        (lambda im, m: (im, torch.ones_like(m)), ValueError, ["mask", "covers the whole image"]),
        (lambda im, m: (im, box(32, 32, 2, 2, (28, 28))), ValueError, ["mask", "fully known", "5x5"]),
    ],
)
def test_bad_input_is_refused_with_a_reason(change, error, words):
    image, mask = change(*_good())
    with pytest.raises(error) as info:
        inpaint(image, mask)
    message = str(info.value)
    assert message.startswith("psal.apps.inpaint:")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"patch_size": 4}, ValueError, "patch_size"),
        ({"num_neighbors": 0}, ValueError, "num_neighbors"),
        ({"num_iters": 0}, ValueError, "num_iters"),
        ({"scales": 0}, ValueError, "scales"),
        ({"tolerance": -1.0}, ValueError, "tolerance"),
        ({"generator": 0}, TypeError, "generator"),
        ({"progress": "bar"}, TypeError, "progress"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_options_are_refused(kwargs, error, word):
    with pytest.raises(error, match=word) as info:
        inpaint(*_good(), **kwargs)
    assert str(info.value).startswith("psal.apps.inpaint:")


def test_small_holes_are_searched_and_voted_sparsely_and_fill_as_well(monkeypatch):
    """A 3% hole in a 128x128 texture: the pixels whose patch meets it are well under half of the
    picture, so every search lists them only (sparse queries); the fill keeps the known pixels
    and is as good as the dense path's (hole PSNR within 0.5 dB)."""
    pytest.importorskip("skimage")
    from psal import images
    from psal.apps import inpaint as module

    img = images.load_bundled("brick", 128)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    hole = (((yy - 60) / 14) ** 2 + ((xx - 70) / 9) ** 2 <= 1)[None, None]
    assert 0.02 < float(hole.float().mean()) < 0.04
    listed = []
    search = module.patchmatch

    def spy(*args, **kwargs):
        listed.append(kwargs.get("positions") is not None)
        return search(*args, **kwargs)

    monkeypatch.setattr(module, "patchmatch", spy)

    def psnr(out):
        return float(10 * torch.log10(1 / (out - img)[hole.expand_as(img)].square().mean()))

    sparse = inpaint(img, hole, generator=torch.Generator().manual_seed(0))
    assert listed and all(listed)
    listed.clear()
    monkeypatch.setattr(module, "_SPARSE_BELOW", 0.0)
    dense = inpaint(img, hole, generator=torch.Generator().manual_seed(0))
    assert listed and not any(listed)
    for out in (sparse, dense):
        assert torch.equal(out[~hole.expand_as(img)], img[~hole.expand_as(img)])
    assert psnr(sparse) >= psnr(dense) - 0.5, (psnr(sparse), psnr(dense))
    assert psnr(sparse) > 15
    # a named backend searches and aggregates sparsely too ("auto" is numba here)
    monkeypatch.setattr(module, "_SPARSE_BELOW", 0.5)
    listed.clear()
    attended, attend = [], module.attend

    def spy_attend(*args, **kwargs):
        attended.append((kwargs["backend"], kwargs.get("positions") is not None))
        return attend(*args, **kwargs)

    monkeypatch.setattr(module, "attend", spy_attend)
    named = inpaint(img, hole, generator=torch.Generator().manual_seed(0), backend="numba")
    assert listed and all(listed) and torch.equal(named, sparse)
    assert attended and set(attended) == {("numba", True)}


def test_features_refreshed_around_the_hole_are_the_whole_maps():
    """The in-place refresh of a level's features over the hole's box (grown by the features'
    reach) gives the features recomputed over the whole map, bitwise, after any change of the
    hole's pixels; holes touching the border included."""
    from psal.apps import inpaint as module

    g = torch.Generator().manual_seed(7)
    for top, left, h, w in [(5, 6, 4, 3), (0, 0, 3, 5), (10, 12, 4, 4), (0, 14, 16, 2)]:
        state = torch.rand(1, 5, 16, 16, generator=g)
        hole = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
        hole[..., top : top + h, left : left + w] = True
        feat = module._feature_map(state, 3)
        state = torch.where(hole, torch.rand(1, 5, 16, 16, generator=g), state)  # a new fill
        module._refresh(feat, state, 3, module._box(hole, module._FEATURE_REACH))
        assert torch.equal(feat[:, :-1], module._features(state, 3))
        assert not feat[:, -1].any()  # the confidence channel stays zero outside the vote


def test_hole_depth_is_the_chebyshev_distance_to_the_known_pixels():
    """Against brute force: the smallest max(|di|, |dj|) to a known pixel of the map, on random
    holes of random maps (thin, wide, touching the borders, nearly full)."""
    from psal.apps import inpaint as module

    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        H, W = (int(v) for v in torch.randint(1, 24, (2,), generator=g))
        hole = torch.rand(H, W, generator=g) < float(torch.rand(1, generator=g)) * 1.2
        hole.view(-1)[int(torch.randint(H * W, (1,), generator=g))] = False  # at least one known pixel
        ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        known = (~hole).nonzero()
        cheb = torch.maximum((ii[..., None] - known[:, 0]).abs(), (jj[..., None] - known[:, 1]).abs())
        want = cheb.amin(-1).float()
        assert torch.equal(module._hole_depth(hole[None, None], torch.float32)[0, 0], want)
