"""Colorization baselines of the benchmark (psal.bench.colour_baselines): Welsh et al. 2002, Levin
et al. 2004, both chained, and the mean colour, against hand-computed cases, a brute-force Welsh
and a dense Levin system built independently with loops."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import gen

from psal.apps.colorize import lab_from_rgb, rgb_from_lab
from psal.bench import colour_baselines as cb


def _smooth(channels, H, W, seed, lo, hi, dtype=torch.float32):
    """A smooth random image ``(1, channels, H, W)`` with values in ``[lo, hi]``."""
    coarse = torch.rand(1, channels, max(2, H // 8), max(2, W // 8), generator=gen(seed), dtype=torch.float64)
    x = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
    return (lo + (hi - lo) * x).to(dtype)


def _target_luma(gray):
    return lab_from_rgb(gray.double().expand(1, 3, *gray.shape[-2:]))[:, :1]


def _unclipped(rgb):
    """Pixels ``(H, W)`` where ``rgb_from_lab`` clipped no channel (clipped ones land on 0 or 1)."""
    return ((rgb > 1e-6) & (rgb < 1 - 1e-6)).all(1)[0]


def _gray_of_luma(L):
    """The sRGB gray ``(1, 1, H, W)`` whose Lab L is ``L``."""
    return rgb_from_lab(torch.cat([L, torch.zeros_like(L), torch.zeros_like(L)], 1))[:, :1]


# ----------------------------------------------------------------------------- all methods


def _run(method, gray, reference):
    if method == "levin_propagate":
        H, W = gray.shape[-2:]
        mask = torch.rand(1, 1, H, W, generator=gen(3)) < 0.05
        ab = 15 * (2 * torch.rand(1, 2, H, W, generator=gen(4), dtype=gray.dtype) - 1)
        return cb.levin_propagate(gray, ab, mask)
    return getattr(cb, method)(gray, reference)


@pytest.mark.parametrize("method", ["mean_colour", "welsh", "levin_propagate", "welsh_levin"])
def test_output_keeps_the_target_luminance(method):
    gray = _smooth(1, 40, 48, 0, 0.35, 0.65)
    reference = _smooth(3, 36, 44, 1, 0.3, 0.7)
    out = _run(method, gray, reference)
    assert out.shape == (1, 3, 40, 48) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    ok = _unclipped(out)
    assert ok.float().mean() > 0.95  # mid-gray targets: nearly nothing leaves the gamut
    dL = (lab_from_rgb(out.double())[:, 0] - _target_luma(gray)[:, 0])[0]
    assert float(dL[ok].abs().max()) < 1e-3
    assert (lab_from_rgb(out.double())[0, 1:].std((1, 2)) > 0.5).all() or method == "mean_colour"


def test_mean_colour_of_red_and_white_is_half_of_reds_chroma():
    # Half sRGB red (Lab 53.24, 80.09, 67.20, the published value), half white (100, 0, 0).
    reference = torch.ones(1, 3, 6, 8, dtype=torch.float64)
    reference[:, 1:, :3] = 0
    gray = torch.full((1, 1, 5, 7), 0.5, dtype=torch.float64)
    gray[..., 0, 0] = 0.45
    out = cb.mean_colour(gray, reference)
    assert _unclipped(out).all()
    lab = lab_from_rgb(out)
    torch.testing.assert_close(
        lab[:, 1:], torch.tensor([80.09 / 2, 67.20 / 2], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 5, 7), atol=0.03, rtol=0
    )
    torch.testing.assert_close(lab[:, :1], _target_luma(gray), atol=1e-6, rtol=0)
    # and in general exactly the reference's mean a, b
    reference = _smooth(3, 20, 30, 5, 0.3, 0.7, torch.float64)
    out = cb.mean_colour(gray, reference)
    assert _unclipped(out).all()
    expected = lab_from_rgb(reference)[:, 1:].mean((2, 3))
    torch.testing.assert_close(lab_from_rgb(out)[:, 1:], expected.view(1, 2, 1, 1).expand(1, 2, 5, 7), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- Levin et al. 2004


def test_levin_constant_scribbles_give_that_constant_everywhere():
    gray = torch.rand(1, 1, 20, 24, generator=gen(7), dtype=torch.float64) * 0.4 + 0.3  # rough texture
    mask = torch.rand(1, 1, 20, 24, generator=gen(8)) < 0.04
    mask[..., 0, 0] = True
    ab = torch.tensor([12.0, -7.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 20, 24).clone()
    ab[:, :, ~mask[0, 0]] = 99.0  # ignored off the scribbles
    solved = cb._levin_ab(gray[0, 0].numpy(), ab[0].numpy(), mask[0, 0].numpy(), 3)
    np.testing.assert_allclose(solved, np.broadcast_to(np.array([12.0, -7.0])[:, None, None], solved.shape), atol=1e-9)
    out = cb.levin_propagate(gray, ab, mask[0, 0])
    assert _unclipped(out).all()
    lab = lab_from_rgb(out)
    constant = torch.tensor([12.0, -7.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 20, 24)
    torch.testing.assert_close(lab[:, 1:], constant, atol=1e-6, rtol=0)
    torch.testing.assert_close(lab[:, :1], _target_luma(gray), atol=1e-6, rtol=0)


def _two_regions(H=16, W=32):
    gray = torch.full((1, 1, H, W), 0.3, dtype=torch.float64)
    gray[..., W // 2 :] = 0.7
    X, Y = torch.tensor([20.0, -10.0], dtype=torch.float64), torch.tensor([-15.0, 25.0], dtype=torch.float64)
    want = torch.where(torch.arange(W) < W // 2, X.view(2, 1, 1), Y.view(2, 1, 1)).expand(2, H, W)[None]
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, 0] = mask[:, -1] = True  # scribbles only at the far ends, 16 pixels from the edge
    return gray, want.clone(), mask


def test_levin_sharp_edge_stops_the_propagation():
    gray, want, mask = _two_regions()
    out = cb.levin_propagate(gray, want, mask)
    assert _unclipped(out).all()
    ab = lab_from_rgb(out)[:, 1:]
    assert float((ab - want).abs().max()) < 0.5  # X and Y are 35 apart in a
    # Without the edge (a flat target) the same scribbles blend across: a ramp.
    flat = cb._levin_ab(np.full((16, 32), 0.5), want[0].numpy(), mask.numpy(), 3)
    assert np.abs(flat - want[0].numpy()).max() > 10
    # The paper's text read literally (sigma_r^2 the window variance) leaks across the step.
    literal = cb._levin_ab(gray[0, 0].numpy(), want[0].numpy(), mask.numpy(), 3, var_scale=1.0)
    assert np.abs(literal - want[0].numpy()).max() > 5


def _dense_levin(Y, ab, mask, window, var_scale):
    """Levin's system built pixel by pixel with loops and solved densely."""
    H, W = Y.shape
    n, rad = H * W, window // 2
    A, rhs = np.zeros((n, n)), np.zeros((n, 2))
    for i in range(H):
        for j in range(W):
            r = i * W + j
            A[r, r] = 1.0
            if mask[i, j]:
                rhs[r] = ab[:, i, j]
                continue
            win = [(y, x) for y in range(i - rad, i + rad + 1) for x in range(j - rad, j + rad + 1) if 0 <= y < H and 0 <= x < W]
            vals = np.array([Y[y, x] for y, x in win])
            var = max(var_scale * np.mean((vals - vals.mean()) ** 2), 2e-6)
            others = [(y, x) for y, x in win if (y, x) != (i, j)]
            w = np.array([np.exp(-((Y[i, j] - Y[y, x]) ** 2) / (2 * var)) for y, x in others])
            for (y, x), wk in zip(others, w / w.sum()):
                A[r, y * W + x] -= wk
    return np.linalg.solve(A, rhs).T.reshape(2, H, W)


@pytest.mark.parametrize("window,var_scale", [(3, cb._VAR_SCALE), (5, 1.0)])
def test_levin_sparse_solution_equals_a_dense_solve_built_with_loops(window, var_scale):
    rng = np.random.default_rng(window)
    Y = 0.3 + 0.4 * rng.random((8, 8))
    Y[:, 5:] += 0.1  # an edge too
    mask = rng.random((8, 8)) < 0.15
    mask[0, 0] = True
    ab = rng.uniform(-15, 15, (2, 8, 8))
    want = _dense_levin(Y, ab, mask, window, var_scale)
    np.testing.assert_allclose(cb._levin_ab(Y, ab, mask, window, var_scale), want, atol=1e-10)
    gray = torch.from_numpy(Y)[None, None]
    out = cb.levin_propagate(gray, torch.from_numpy(ab)[None], torch.from_numpy(mask), window=window, var_scale=var_scale)
    ok = _unclipped(out)
    assert ok.float().mean() > 0.9
    got = lab_from_rgb(out)[0, 1:]
    np.testing.assert_allclose(got[:, ok].numpy(), want[:, ok.numpy()], atol=1e-6)


# ----------------------------------------------------------------------------- Welsh et al. 2002


_PATCHES = ((0.70, 0.40, 0.40), (0.40, 0.60, 0.40), (0.35, 0.40, 0.65), (0.75, 0.70, 0.45))


def _patch_reference(size=48):
    ref = torch.empty(1, 3, size, size, dtype=torch.float64)
    h = size // 2
    for k, colour in enumerate(_PATCHES):
        y, x = divmod(k, 2)
        ref[0, :, y * h : (y + 1) * h, x * h : (x + 1) * h] = torch.tensor(colour, dtype=torch.float64).view(3, 1, 1)
    return ref


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.6, 25.0)])
def test_welsh_recovers_flat_patch_colours_from_their_luminance(scale, shift):
    ref = _patch_reference()
    lab = lab_from_rgb(ref)
    Ls = sorted(float(lab[0, 0, y, x]) for y, x in ((0, 0), (0, 30), (30, 0), (30, 30)))
    assert min(b - a for a, b in zip(Ls, Ls[1:])) > 3  # distinct luminances
    # The target: the reference's own luminance, or an affine copy of it (which the luminance
    # remapping must undo: unremapped, 0.6 L + 25 lands nearer another patch's L).
    gray = _gray_of_luma(scale * lab[:, :1] + shift)
    out = cb.welsh(gray, ref, samples=200, window=5, seed=0)
    interior = torch.zeros(48, 48, dtype=torch.bool)
    for y0 in (0, 24):
        for x0 in (0, 24):
            interior[y0 + 3 : y0 + 21, x0 + 3 : x0 + 21] = True
    assert _unclipped(out)[interior].all()
    got = lab_from_rgb(out)
    torch.testing.assert_close(got[0, 1:, interior], lab[0, 1:, interior], atol=1e-4, rtol=0)
    # remap=False compares the luminances as they are: the same on the reference's own luminance,
    # and on the affine copy the colours of the nearest L as it is: the copies 56.1, 60.1, 51.9
    # and 68.5 of 51.8, 58.6, 44.8 and 72.5 take those of 58.6, 58.6, 51.8 and 72.5, half wrong
    plain = lab_from_rgb(cb.welsh(gray, ref, samples=200, window=5, seed=0, remap=False))
    wrong = (plain[0, 1:, interior] - lab[0, 1:, interior]).abs().amax(0) > 1
    assert float(wrong.float().mean()) == (0.0 if scale == 1.0 else 0.5)
    torch.testing.assert_close(got[:, :1], _target_luma(gray), atol=1e-6, rtol=0)


def _brute_welsh(gray, reference, samples, window, seed):
    """Welsh's matching with loops: (ab (2, H, W), best error (H, W))."""
    L = _target_luma(gray)[0, 0].numpy()
    lab = lab_from_rgb(reference.double())[0].numpy()
    Lr = lab[0]
    Lr = (Lr - Lr.mean()) * L.std() / Lr.std() + L.mean()

    def local_std(M):
        rad, (H, W) = window // 2, M.shape
        return np.array([[M[max(0, i - rad) : i + rad + 1, max(0, j - rad) : j + rad + 1].std() for j in range(W)] for i in range(H)])

    sd_t, sd_r = local_std(L), local_std(Lr)
    iy, ix = cb._jittered_grid(*Lr.shape, samples, seed)
    ab, err = np.zeros((2,) + L.shape), np.zeros(L.shape)
    for i in range(L.shape[0]):
        for j in range(L.shape[1]):
            costs = [0.5 * (L[i, j] - Lr[y, x]) ** 2 + 0.5 * (sd_t[i, j] - sd_r[y, x]) ** 2 for y, x in zip(iy, ix)]
            k = int(np.argmin(costs))
            ab[:, i, j], err[i, j] = lab[1:, iy[k], ix[k]], costs[k]
    return ab, err


def test_welsh_matching_equals_a_brute_force_and_chunking_changes_nothing():
    gray = torch.rand(1, 1, 10, 12, generator=gen(11), dtype=torch.float64)
    reference = torch.rand(1, 3, 14, 16, generator=gen(12), dtype=torch.float64) * 0.8
    want_ab, want_err = _brute_welsh(gray, reference, samples=20, window=3, seed=5)
    for chunk in (7, None):
        L, ab, err = cb._welsh_lab(gray, reference, 20, 3, 5, chunk=chunk)
        np.testing.assert_allclose(err.numpy(), want_err, atol=1e-8)
        np.testing.assert_allclose(ab[0].numpy(), want_ab, atol=1e-10)


def test_jittered_grid_one_position_per_cell():
    iy, ix = cb._jittered_grid(100, 150, 200, seed=0)
    gh, gw = 12, 17  # sqrt(200 * 100 / 150) = 11.5 rows, 200 / 12 = 16.7 columns
    assert len(iy) == gh * gw
    assert iy.min() >= 0 and iy.max() < 100 and ix.min() >= 0 and ix.max() < 150
    cells = set(zip((iy * gh) // 100, (ix * gw) // 150))
    assert len(cells) == gh * gw
    again = cb._jittered_grid(100, 150, 200, seed=0)
    other = cb._jittered_grid(100, 150, 200, seed=1)
    assert (again[0] == iy).all() and (again[1] == ix).all()
    assert (other[0] != iy).any()
    iy, ix = cb._jittered_grid(3, 2, 200, seed=0)  # more samples than pixels: every pixel once
    assert sorted(zip(iy, ix)) == [(y, x) for y in range(3) for x in range(2)]


# ----------------------------------------------------------------------------- Welsh then Levin


def test_welsh_levin_at_256_keeps_welsh_colours_at_its_scribbles():
    gray = _smooth(1, 256, 256, 20, 0.2, 0.8)
    gray = gray + 0.03 * torch.rand(gray.shape, generator=gen(21))  # some texture
    reference = _smooth(3, 128, 192, 22, 0.2, 0.8)
    out = cb.welsh_levin(gray, reference)
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    L, ab, err = cb._welsh_lab(gray, reference, 200, 5, 0)
    mask = cb._confident(err, 4, 0.5)
    assert 1800 < int(mask.sum()) <= 2048 + 64  # half of the 64 x 64 grid, give or take ties
    assert not mask[1::4].any() and mask[2::4, 2::4].sum() == mask.sum()
    ok = _unclipped(out) & mask
    assert ok.sum() > 0.8 * mask.sum()
    got = lab_from_rgb(out.double())
    torch.testing.assert_close(got[0, 1:, ok], ab[0, :, ok], atol=2e-3, rtol=0)
    dL = (got[:, 0] - L[:, 0])[0]
    assert float(dL[_unclipped(out)].abs().max()) < 1e-3


@pytest.mark.parametrize("remap", [True, False])
def test_welsh_levin_is_levin_over_welsh_colours_at_the_confident_pixels(remap):
    gray = _smooth(1, 64, 80, 30, 0.2, 0.8, torch.float64)
    gray = gray + 0.03 * torch.rand(gray.shape, generator=gen(31), dtype=torch.float64)
    reference = _smooth(3, 48, 40, 32, 0.2, 0.8, torch.float64)
    out = cb.welsh_levin(gray, reference, samples=100, grid=3, keep=0.4, remap=remap)
    L, ab, err = cb._welsh_lab(gray, reference, 100, 5, 0, remap=remap)
    mask = cb._confident(err, 3, 0.4)
    assert 0.3 * 22 * 27 < int(mask.sum()) < 0.5 * 22 * 27
    want = torch.from_numpy(cb._levin_ab(gray[0, 0].numpy(), ab[0].numpy(), mask.numpy(), 3))
    ok = _unclipped(out)
    assert ok.float().mean() > 0.9
    got = lab_from_rgb(out)[0, 1:]
    torch.testing.assert_close(got[:, ok], want[:, ok], atol=1e-6, rtol=0)
    assert float((got[:, ok] - ab[0, :, ok]).abs().mean()) > 1  # not Welsh's own colours


# ----------------------------------------------------------------------------- interface


def test_bad_arguments_raise():
    gray, ref = torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="gray"):
        cb.welsh(ref, ref)
    with pytest.raises(ValueError, match="reference"):
        cb.mean_colour(gray, gray)
    with pytest.raises(ValueError, match="window"):
        cb.welsh(gray, ref, window=4)
    with pytest.raises(ValueError, match="scribbled"):
        cb.levin_propagate(gray, torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scribble_ab"):
        cb.levin_propagate(gray, torch.zeros(1, 3, 8, 8), torch.ones(8, 8, dtype=torch.bool))
    for fn in (cb.welsh, cb.welsh_levin):
        with pytest.raises(TypeError, match=f"{fn.__name__}: remap must be a bool, got str"):
            fn(gray, ref, remap="no")


def test_import_psal_does_not_import_the_baselines_or_the_peers():
    peers = ["psal.bench.colour_baselines", "psal.bench.peers", "scipy", "cv2", "sklearn", "matplotlib", "resynthesizer", "patchmatch"]
    code = f"import sys, psal, psal.apps.inpaint, psal.apps.colorize; print([m for m in {peers!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
