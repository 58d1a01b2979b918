"""Exemplar colorization: Lab conversions against hand values, and chroma better than a global transfer."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

from psal.apps.colorize import colorize, global_transfer, lab_from_rgb, rgb_from_lab


def test_lab_of_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 3, 1)
    lab = lab_from_rgb(rgb)[0, :, :, 0].T
    # white, black, and sRGB red (53.24, 80.09, 67.20), the standard published values
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([0.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=5e-2, rtol=0)
    x = torch.rand(1, 3, 8, 9, generator=gen(0))
    torch.testing.assert_close(rgb_from_lab(lab_from_rgb(x)), x, atol=1e-5, rtol=0)


def _chroma_psnr(a, b) -> float:
    d = (lab_from_rgb(a)[:, 1:] - lab_from_rgb(b)[:, 1:]).square().mean()
    return float(10 * torch.log10(256.0**2 / d))


def test_colours_another_crop_of_the_same_scene_better_than_its_mean_colour():
    pytest.importorskip("skimage")
    from psal.apps.scenarios import colorize_case

    gray, reference, truth = colorize_case("coffee", 112)
    ours = colorize(gray, reference, generator=gen(0))
    assert ours.shape == (1, 3, 112, 112)
    base = global_transfer(gray, reference)
    # measured 29.1 against 26.7 dB (the reference's mean colour; astronaut: 28.3 against 23.3)
    assert _chroma_psnr(ours, truth) > _chroma_psnr(base, truth) + 1.0
    # the target keeps its luminance (up to colours clipped to the sRGB gamut)
    L_in = lab_from_rgb(gray.expand(1, 3, 112, 112))[:, 0]
    assert (lab_from_rgb(ours)[:, 0] - L_in).abs().median() < 0.5


def test_global_transfer_lays_the_reference_mean_colour_on_a_gray_target():
    """A gray target's a and b have no spread but float rounding: they must take the reference's
    mean, not its spread times the rounding noise (the bug issue 16 found: random colour)."""
    g = gen(3)
    # float32, where a gray pixel's a and b are rounding noise of about 1e-5 (the bug's case)
    gray = 0.35 + 0.3 * torch.rand(1, 1, 24, 20, generator=g)
    reference = torch.stack([0.3 + 0.4 * torch.rand(24, 20, generator=g) * s for s in (1.0, 0.6, 0.3)])[None]
    out = global_transfer(gray, reference)
    want = lab_from_rgb(reference.double())[:, 1:].mean((2, 3))
    got = lab_from_rgb(out.double())[:, 1:]
    torch.testing.assert_close(got, want[..., None, None].expand_as(got), atol=0.02, rtol=0)
    torch.testing.assert_close(lab_from_rgb(out)[:, 0], lab_from_rgb(gray.expand(1, 3, 24, 20))[:, 0], atol=0.02, rtol=0)
    # a colour target is still moved to the reference's mean and spread
    colour = global_transfer(reference.flip(-1) * 0.8, reference)
    torch.testing.assert_close(lab_from_rgb(colour)[:, 1:].std((2, 3)), lab_from_rgb(reference)[:, 1:].std((2, 3)), atol=1e-3, rtol=0)


def test_same_generator_same_colours_and_bad_input():
    g = gen(1)
    target, reference = torch.rand(1, 1, 16, 14, generator=g), torch.rand(1, 3, 12, 15, generator=g)
    a = colorize(target, reference, generator=gen(2))
    b = colorize(target, reference, generator=gen(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"colorize: reference must be a colour image \(1, 3, H, W\), got \(1, 1, 12, 15\)"):
        colorize(target, reference[:, :1])
    with pytest.raises(ValueError, match=r"colorize: target must be \(1, 1 or 3, H, W\), got \(16, 14\)"):
        colorize(target[0, 0], reference)
    with pytest.raises(TypeError, match="colorize: target must be a floating-point tensor"):
        colorize((target * 255).to(torch.uint8), reference)


def test_luminance_is_labs_and_banded_guided_upsampling_is_the_whole_maps():
    import torch.nn.functional as F

    from psal.apps.colorize import _guided, _luminance, guided_upsample

    g = gen(3)
    rgb, gray = torch.rand(1, 3, 20, 30, generator=g, dtype=torch.float64), torch.rand(1, 1, 20, 30, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_luminance(rgb), lab_from_rgb(rgb)[:, :1], rtol=0, atol=1e-10)
    torch.testing.assert_close(_luminance(gray), lab_from_rgb(gray.expand(1, 3, 20, 30))[:, :1], rtol=0, atol=1e-10)
    low = torch.rand(1, 2, 7, 9, generator=g, dtype=torch.float64)
    guide = 100 * torch.rand(1, 1, 61, 83, generator=g, dtype=torch.float64)
    whole = _guided(F.interpolate(low, size=(61, 83), mode="bilinear", align_corners=False), guide, 3, 25.0)
    torch.testing.assert_close(guided_upsample(low, guide, 3, 25.0, band=8), whole, rtol=0, atol=1e-12)
    # a guide with an edge: the values brought up jump where the guide does, where bilinear ramps
    step = torch.zeros(1, 1, 40, 40, dtype=torch.float64)
    step[..., 20:] = 100.0
    coarse = F.interpolate(step / 2, size=(5, 5), mode="area")
    sharp = guided_upsample(coarse, step, 4, 1.0)
    blurry = F.interpolate(coarse, size=(40, 40), mode="bilinear", align_corners=False)
    jump = (sharp[..., 20] - sharp[..., 19]).mean()
    assert jump > 4 * (blurry[..., 20] - blurry[..., 19]).mean() and jump > 12


def test_a_target_above_work_pixels_gets_its_chroma_at_the_working_size():
    pytest.importorskip("skimage")
    from psal.apps.scenarios import colorize_case

    gray, reference, truth = colorize_case("coffee", 160)
    full = colorize(gray, reference, generator=gen(0), work_pixels=None)
    small = colorize(gray, reference, generator=gen(0), work_pixels=80 * 80)
    assert small.shape == (1, 3, 160, 160)
    assert not torch.equal(small, full)  # the working size was taken
    # measured 28.62 against 29.80 dB: a quarter of the pixels, and a reference shrunk alike
    assert _chroma_psnr(small, truth) > _chroma_psnr(full, truth) - 1.5
    assert _chroma_psnr(small, truth) > _chroma_psnr(global_transfer(gray, reference), truth) + 1.0
    L_in = lab_from_rgb(gray.expand(1, 3, 160, 160))[:, 0]
    assert (lab_from_rgb(small)[:, 0] - L_in).abs().median() < 0.5  # the full-size luminance is kept
    assert torch.equal(colorize(gray, reference, generator=gen(0), work_pixels=160 * 160), full)  # at or under: full size
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="colorize: work_pixels must be a positive int or None"):
            colorize(gray, reference, work_pixels=bad)


def _two_tone(L_left: float, L_right: float, ab_left, ab_right, size=(20, 32)) -> torch.Tensor:
    """An sRGB picture of two flat halves of given Lab colours."""
    H, W = size
    lab = torch.empty(1, 3, H, W, dtype=torch.float64)
    lab[..., : W // 2] = torch.tensor([L_left, *ab_left], dtype=torch.float64).view(1, 3, 1, 1)
    lab[..., W // 2 :] = torch.tensor([L_right, *ab_right], dtype=torch.float64).view(1, 3, 1, 1)
    return rgb_from_lab(lab)


def test_luminance_is_compared_as_it_is_unless_match_luminance():
    """A reference shot darker: red at L 15, blue at L 35; the target's halves are at L 40 and 80.
    As they are, both target tones lie nearest the reference's blue; with Welsh's remapping
    (``match_luminance=True``) the reference's tones move onto the target's, red onto the dark half.
    (Hues are checked by sign: the sRGB gamut clips a colour's a and b differently at each L.)"""
    # wide enough that the measured squares lie beyond the guided filter's reach of the step, where
    # the edge features pair the target's step with the reference's (both tones meet there)
    reference = _two_tone(15, 35, (25.0, 15.0), (-5.0, -25.0), size=(20, 64))
    target = _two_tone(40, 80, (0.0, 0.0), (0.0, 0.0), size=(20, 64))[:, :1]

    def halves(out):
        lab = lab_from_rgb(out)
        return lab[0, 1:, 6:14, 6:18].mean((1, 2)), lab[0, 1:, 6:14, 46:58].mean((1, 2))

    left, right = halves(colorize(target, reference, generator=gen(0)))
    assert left[1] < -10 and right[1] < -10 and left[0] < 0 and right[0] < 0  # both blue
    left, right = halves(colorize(target, reference, generator=gen(0), match_luminance=True))
    assert left[0] > 10 and left[1] > 5  # red
    assert right[1] < -10 and right[0] < 0  # blue
    with pytest.raises(TypeError, match="colorize: match_luminance must be a bool, got int"):
        colorize(target, reference, match_luminance=1)


def test_matching_features_by_hand():
    """``_features`` on maps whose statistics are known in closed form, away from the edges: on a
    ramp ``L = 0.5 x + 2 y`` the local mean is L, the standard deviation over an n x n window
    ``sqrt((0.5^2 + 2^2) var_n)`` with ``var_n = (n^2 - 1) / 12``, the gradient magnitude
    ``sqrt(0.5^2 + 2^2)`` and the Laplacian 0; on ``L = 0.3 x^2`` the absolute 5-point Laplacian is
    0.6. ``_feature_scale`` divides every channel to a spread of 1 over both maps."""
    from psal.apps.colorize import _feature_scale, _features

    y, x = torch.meshgrid(torch.arange(16.0, dtype=torch.float64), torch.arange(18.0, dtype=torch.float64), indexing="ij")
    ramp = (0.5 * x + 2 * y)[None, None]
    f = _features(ramp)
    assert f.shape == (1, 9, 16, 18)
    inner = (..., slice(4, -4), slice(4, -4))
    slope2 = 0.5**2 + 2**2
    want = [ramp]
    for n in (3, 7):
        want += [
            ramp,
            torch.full_like(ramp, (slope2 * (n * n - 1) / 12) ** 0.5),
            torch.full_like(ramp, slope2**0.5),
            torch.zeros_like(ramp),
        ]
    torch.testing.assert_close(f[inner], torch.cat(want, 1)[inner], atol=1e-9, rtol=0)
    bowl = (0.3 * x.square())[None, None]
    lap = _features(bowl)[:, [4, 8]]
    torch.testing.assert_close(lap[inner], torch.full_like(lap[inner], 0.6), atol=1e-9, rtol=0)
    # the scale: unit spread per channel over both maps; a flat channel stays finite
    flat = torch.full((1, 1, 10, 12), 40.0, dtype=torch.float64)
    q, k = _features(ramp), _features(flat)
    scale = _feature_scale(q, k)
    assert scale.shape == (1, 9, 1, 1) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    pooled = torch.cat([(q / scale).flatten(2), (k / scale).flatten(2)], 2)
    torch.testing.assert_close(pooled.std(2), torch.ones(1, 9, dtype=torch.float64), atol=1e-9, rtol=0)
