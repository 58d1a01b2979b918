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
