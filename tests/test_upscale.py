"""Super-resolution from internal patch recurrence: better than bicubic and than back-projection
alone on a texture, consistent with its input, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen

from psal import images
from psal.apps.upscale import back_project, downsample, enlarge, upscale


def _y_psnr(a, b, crop):
    w = torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255
    ya, yb = (a.clamp(0, 1) * w).sum(1, keepdim=True), (b.clamp(0, 1) * w).sum(1, keepdim=True)
    return images.psnr(ya[..., crop:-crop, crop:-crop], yb[..., crop:-crop, crop:-crop])


def test_texture_gains_over_bicubic_and_back_projection():
    pytest.importorskip("skimage")
    truth = images.load_bundled("brick")[..., :128, :128]  # full resolution: the texture's own scale
    low = downsample(truth, 2).clamp(0, 1)
    ours = upscale(low, 2, generator=gen(0))
    assert ours.shape == truth.shape
    bicubic = enlarge(low, truth.shape[-2:])
    bp = back_project(bicubic, low)
    # measured: bicubic 38.00, back-projection 39.52, ours 40.57 dB
    assert _y_psnr(ours, truth, 2) > _y_psnr(bicubic, truth, 2) + 0.5
    assert _y_psnr(ours, truth, 2) > _y_psnr(bp, truth, 2) + 0.5
    # back-projected: downsampling the result gives the input back
    assert (downsample(ours, 2) - low).abs().mean() < 2e-3


@pytest.mark.parametrize("scale", [3, 4])
def test_larger_factors_gain_over_back_projection(scale):
    """x3 and x4 go in two steps; on a texture they beat back-projection alone and stay consistent."""
    pytest.importorskip("skimage")
    truth = images.load_bundled("brick")[..., :132, :132]
    low = downsample(truth, scale).clamp(0, 1)
    ours = upscale(low, scale, generator=gen(0))
    assert ours.shape == truth.shape
    bp = back_project(enlarge(low, truth.shape[-2:]), low)
    # measured: x3 35.96 vs 33.50 dB, x4 30.88 vs 29.41
    assert _y_psnr(ours, truth, scale) > _y_psnr(bp, truth, scale) + 1.0
    assert (downsample(ours, scale) - low).abs().mean() < 1e-4


@pytest.mark.parametrize("scale", [3, 4])
def test_other_scales_and_gray(scale):
    low = torch.rand(1, 1, 13, 11, generator=gen(scale))
    out = upscale(low, scale, generator=gen(1))
    assert out.shape == (1, 1, 13 * scale, 11 * scale) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, upscale(low, scale, generator=gen(1)))


def test_bad_input():
    with pytest.raises(ValueError, match=r"upscale: scale must be 2, 3 or 4, got 5"):
        upscale(torch.rand(1, 3, 16, 16), 5)
    with pytest.raises(ValueError, match=r"upscale: image \(1, 3, 5, 16\) is too small for scale 3"):
        upscale(torch.rand(1, 3, 5, 16), 3)
    with pytest.raises(ValueError, match=r"upscale: image must be \(1, 1 or 3, H, W\), got \(3, 16, 16\)"):
        upscale(torch.rand(3, 16, 16), 2)
    with pytest.raises(TypeError, match="upscale: image must be a floating-point tensor"):
        upscale(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 2)


def test_luminance_follows_the_device_of_its_input():
    """``psal demo --device cuda`` built the luminance weights of ``y_psnr`` on the CPU and failed on
    CUDA inputs; meta tensors stand in for a GPU here."""
    from psal.apps.metrics import luma, y_psnr

    y = luma(torch.empty(1, 3, 5, 4, device="meta"))
    assert y.device.type == "meta" and y.shape == (1, 1, 5, 4)
    white = luma(torch.ones(1, 3, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(white, torch.full((1, 1, 2, 2), 219 / 255, dtype=torch.float64))  # BT.601: 16..235
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[..., 4, 4] = 1.0  # one white pixel in the 4 x 4 centre: mse = (219/255)^2 / 16
    assert abs(y_psnr(a, b, 2) - 10 * math.log10(16 / (219 / 255) ** 2)) < 1e-4


def test_the_search_starts_from_the_same_place_one_scale_lower():
    from psal.apps.upscale import _corresponding

    want = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert torch.equal(_corresponding((4, 4), (2, 2), "cpu")[0, 0, 0], want)
    # x3 on 2 x 3: pixel centres (i + 0.5) / 3 - 0.5 rounded, clamped
    assert torch.equal(_corresponding((6, 9), (2, 3), "cpu")[0, 0, 0, :, ::3], torch.tensor([[0, 1, 2]] * 3 + [[3, 4, 5]] * 3))


def test_bands_give_the_whole_maps_result_up_to_the_search_and_no_seams():
    """Matching in bands of 16 output rows (8 bands) against the whole map at once: the same
    quality, a difference at the level of the search's randomness, no larger at band edges."""
    pytest.importorskip("skimage")
    truth = images.load_bundled("brick")[..., :128, :128]
    low = downsample(truth, 2).clamp(0, 1)
    whole = upscale(low, 2, generator=gen(0))
    calls = []
    banded = upscale(low, 2, generator=gen(0), band_pixels=128 * 16, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 16) for i in range(1, 17)]  # 8 bands, two passes, steadily
    assert abs(_y_psnr(banded, truth, 2) - _y_psnr(whole, truth, 2)) < 0.15
    assert images.psnr(banded, whole) > 40  # measured 48 dB
    diff = (banded - whole).abs()[0].mean((0, 2))  # per row
    edges = torch.tensor([r + d for r in range(16, 128, 16) for d in (-1, 0)])
    assert diff[edges].mean() < 2 * diff[16:].mean() + 1e-4
    # x3 goes in two steps of different sizes: one bar over both, steady, ending at its total
    calls.clear()
    upscale(torch.rand(1, 1, 21, 17, generator=gen(5)), 3, band_pixels=16 * 40, progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert [d for d, _ in calls] == list(range(1, total + 1)) and all(t == total for _, t in calls) and total > 4
    with pytest.raises(ValueError, match="upscale: band_pixels must be a positive int, got 0"):
        upscale(low, 2, band_pixels=0)
    with pytest.raises(TypeError, match="upscale: progress must be callable"):
        upscale(low, 2, progress=3)
