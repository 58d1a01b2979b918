"""The image-quality metrics of ``psal.apps.metrics`` against independent references: scikit-image
(SSIM, CIEDE2000, Lab), Sharma, Wu and Dalal's published CIEDE2000 test data, brute force over
permutations and numpy re-derivations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psal.apps.metrics import (
    ciede2000,
    colourfulness,
    hole_ssim,
    mean_delta_e,
    patch_swd,
    ssim_map,
    swd_directions,
)

skimage = pytest.importorskip("skimage")
from skimage import color, data, filters  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402


def _t(img: np.ndarray) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` numpy -> ``(1, C, H, W)`` float64 tensor."""
    img = np.asarray(img, dtype=np.float64)
    return torch.from_numpy(img[..., None] if img.ndim == 2 else img).permute(2, 0, 1)[None].contiguous()


def _skimage_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)[1]


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(0)
    astro = color.rgb2gray(data.astronaut()[::4, ::4])
    camera = data.camera()[100:196, 150:270] / 255.0
    return [
        (g.random((48, 41)), g.random((48, 41))),
        (astro, np.clip(astro + 0.05 * g.standard_normal(astro.shape), 0, 1)),
        (camera, filters.gaussian(camera, sigma=2)),
        (camera, 0.5 * camera + 0.25),
    ]


@pytest.mark.parametrize("case", range(4))
def test_ssim_map_matches_skimage(case):
    x, y = _pairs()[case]
    ours = ssim_map(_t(x), _t(y))
    assert ours.shape == (1, 1, *x.shape) and ours.dtype == torch.float64
    ref = _skimage_ssim_map(x, y)
    # Symmetric ("reflect" in scipy.ndimage) padding, as skimage: the whole map agrees, border included.
    np.testing.assert_allclose(ours[0, 0].numpy(), ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours[0, 0, 5:-5, 5:-5].numpy(), ref[5:-5, 5:-5], rtol=0, atol=1e-10)


def test_ssim_map_float32_input():
    x, y = _pairs()[1]
    ours = ssim_map(_t(x).float(), _t(y).float())
    np.testing.assert_allclose(ours[0, 0].numpy(), _skimage_ssim_map(x, y), rtol=0, atol=1e-5)


def test_hole_ssim():
    rgb = data.astronaut()[::4, ::4] / 255.0
    g = np.random.default_rng(1)
    other = np.clip(rgb + 0.08 * g.standard_normal(rgb.shape), 0, 1)
    region = torch.zeros(1, 1, *rgb.shape[:2], dtype=torch.bool)
    region[..., 30:70, 20:90] = True
    region[..., :3, :] = True  # border pixels too: the map is computed over the whole image
    assert hole_ssim(_t(rgb), _t(rgb), region) == pytest.approx(1.0, abs=1e-12)
    # Independent luminance (BT.601, as in ITU-R BT.601's 8-bit Y' equation) and skimage's SSIM map.
    w = np.array([65.481, 128.553, 24.966]) / 255
    ref = _skimage_ssim_map(rgb @ w, other @ w)[region[0, 0].numpy()].mean()
    assert hole_ssim(_t(rgb), _t(other), region) == pytest.approx(ref, abs=1e-10)
    assert hole_ssim(_t(rgb), _t(other), region) < 0.9


def test_hole_ssim_validation():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="region is empty"):
        hole_ssim(a, a, torch.zeros(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        hole_ssim(a, a[..., :15], torch.ones(1, 1, 16, 16, dtype=torch.bool))


def test_swd_directions():
    d = swd_directions(27, 64, seed=3)
    assert d.shape == (64, 27) and d.dtype == torch.float64
    assert float((d.norm(dim=1) - 1).abs().max()) < 1e-12
    assert torch.equal(d, swd_directions(27, 64, seed=3))
    assert not torch.equal(d, swd_directions(27, 64, seed=4))


def _region(h: int, w: int, seed: int, p: float = 0.3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((h, w)) < p)[None, None]


def test_patch_swd_identical_is_zero():
    a = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    assert patch_swd(a, a.clone(), _region(24, 20, 0), directions=32) == 0.0


def test_patch_swd_constant_shift():
    """b = a + c (per channel): every projection moves by d . c_patch, so the sorted sets differ by it."""
    a = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = torch.tensor([0.3, -0.7, 1.25], dtype=torch.float64)
    b = a + c.view(1, 3, 1, 1)
    k, n = 5, 48
    # Patches flatten channel, then row, then column: a constant c_i fills channel i's k * k entries.
    c_patch = c.repeat_interleave(k * k)
    expected = 100 * (swd_directions(3 * k * k, n, seed=2) @ c_patch).abs().mean()
    got = patch_swd(a, b, _region(24, 20, 1), patch_size=k, directions=n, seed=2)
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_patch_swd_matches_unfold_reference():
    """Whole pipeline against patches taken by replicate padding and ``F.unfold`` and sorted in numpy."""
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(1, 2, 9, 11, generator=gen, dtype=torch.float64)
    b = torch.rand(1, 2, 9, 11, generator=gen, dtype=torch.float64) ** 2
    region = _region(9, 11, 2, p=0.5)
    region[..., 0, 0] = region[..., -1, -1] = True  # corners: the padding matters there
    k, n = 3, 16
    pick = region.flatten().numpy()

    def patches(img):
        cols = F.unfold(F.pad(img, (k // 2,) * 4, mode="replicate"), k)[0]  # (C k k, H W)
        return cols.numpy()[:, pick].T

    d = swd_directions(2 * k * k, n, seed=5).numpy()
    pa, pb = np.sort(patches(a) @ d.T, axis=0), np.sort(patches(b) @ d.T, axis=0)
    expected = 100 * np.abs(pa - pb).mean()
    assert patch_swd(a, b, region, patch_size=k, directions=n, seed=5) == pytest.approx(expected, rel=1e-12)


def _brute_w1(x: np.ndarray, y: np.ndarray) -> float:
    """1-D Wasserstein-1 of two equal-size point sets: the best matching over all permutations."""
    return min(np.abs(x - y[list(p)]).mean() for p in itertools.permutations(range(len(y))))


def _five_pixels() -> torch.Tensor:
    region = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for y, x in [(0, 0), (0, 3), (1, 2), (2, 1), (3, 3)]:
        region[0, 0, y, x] = True
    return region


def test_patch_swd_brute_force_one_dimension():
    """One channel, 1x1 patches: the only directions are +-1, so the score is 100 x the W1 of the pixels."""
    g = np.random.default_rng(3)
    a, b = _t(g.random((4, 4))), _t(g.normal(size=(4, 4)))
    region = _five_pixels()
    expected = 100 * _brute_w1(a[region].numpy(), b[region].numpy())
    assert patch_swd(a, b, region, patch_size=1, directions=7) == pytest.approx(expected, rel=1e-12)


def test_patch_swd_brute_force_three_channels():
    g = np.random.default_rng(4)
    a, b = _t(g.random((4, 4, 3))), _t(g.random((4, 4, 3)))
    region = _five_pixels()
    pa = a[0].permute(1, 2, 0)[region[0, 0]].numpy()  # (5, 3)
    pb = b[0].permute(1, 2, 0)[region[0, 0]].numpy()
    dirs = swd_directions(3, 6, seed=0).numpy()
    expected = 100 * np.mean([_brute_w1(pa @ d, pb @ d) for d in dirs])
    assert patch_swd(a, b, region, patch_size=1, directions=6) == pytest.approx(expected, rel=1e-12)


def test_patch_swd_symmetric():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.rand(1, 3, 20, 20, generator=gen), torch.rand(1, 3, 20, 20, generator=gen)
    region = _region(20, 20, 5)
    assert patch_swd(a, b, region, directions=32) == patch_swd(b, a, region, directions=32)


def test_patch_swd_blur_scores_worse_than_shifted_texture():
    """Filling a hole in a grass texture with a blur of the truth scores worse than filling it with
    the truth's own texture taken from elsewhere (measured: blur 6.8, shifts 1.2-2.8)."""
    grass = data.grass()[200:328, 100:228] / 255.0
    truth = _t(grass)
    region = torch.zeros(1, 1, 128, 128, dtype=torch.bool)
    region[..., 48:80, 40:88] = True
    blur = torch.where(region, _t(filters.gaussian(grass, sigma=4)), truth)
    blur_score = patch_swd(truth, blur, region, directions=64)
    for shift in [(37, 53), (-40, 11), (5, 64)]:
        moved = torch.where(region, truth.roll(shift, (2, 3)), truth)
        assert blur_score > 1.4 * patch_swd(truth, moved, region, directions=64)


def test_patch_swd_validation():
    a = torch.rand(1, 3, 16, 16)
    full = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"a and b must have the same shape.*\(1, 3, 16, 16\).*\(1, 3, 16, 15\)"):
        patch_swd(a, a[..., :15], full)
    with pytest.raises(ValueError, match="region must be"):
        patch_swd(a, a, full[..., :15])
    with pytest.raises(ValueError, match="region is empty"):
        patch_swd(a, a, ~full)
    with pytest.raises(ValueError, match="patch_size"):
        patch_swd(a, a, full, patch_size=4)
    with pytest.raises(ValueError, match="directions"):
        patch_swd(a, a, full, directions=0)


def _lab(x: np.ndarray) -> torch.Tensor:
    """``(N, 3)`` Lab -> ``(1, 3, N, 1)``."""
    return torch.from_numpy(np.ascontiguousarray(x.T))[None, :, :, None]


def test_ciede2000_matches_skimage():
    g = np.random.default_rng(6)
    n = 600
    lab1 = np.column_stack([g.uniform(0, 100, n), g.uniform(-100, 100, (n, 2))])
    lab2 = np.column_stack([g.uniform(0, 100, n), g.uniform(-100, 100, (n, 2))])
    lab1[:50, 1:] = 0  # gray against colour, colour against gray, gray against gray
    lab2[25:75, 1:] = 0
    # Hue differences near (not at) 180 degrees, on either side, with different chromas.
    m = 200
    hue = g.uniform(0, 2 * np.pi, m)
    delta = np.pi + np.deg2rad(g.choice([-1.0, -0.1, -0.01, 0.01, 0.1, 1.0], m))
    c1, c2 = g.uniform(0.5, 80, m), g.uniform(0.5, 80, m)
    near1 = np.column_stack([g.uniform(0, 100, m), c1 * np.cos(hue), c1 * np.sin(hue)])
    near2 = np.column_stack([g.uniform(0, 100, m), c2 * np.cos(hue + delta), c2 * np.sin(hue + delta)])
    lab1, lab2 = np.concatenate([lab1, near1]), np.concatenate([lab2, near2])
    ours = ciede2000(_lab(lab1), _lab(lab2))
    assert ours.shape == (1, 1, n + m, 1) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours[0, 0, :, 0].numpy(), color.deltaE_ciede2000(lab1, lab2), rtol=0, atol=1e-6)
    assert float(ciede2000(_lab(lab1), _lab(lab1)).abs().max()) == 0.0


# Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1, pairs 1-21 (to 4 decimals).
SHARMA = [
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
    ((50, 3.1571, -77.2803), (50, 0, -82.7485), 2.8615),
    ((50, 2.8361, -74.0200), (50, 0, -82.7485), 3.4412),
    ((50, -1.3802, -84.2814), (50, 0, -82.7485), 1.0000),
    ((50, -1.1848, -84.8006), (50, 0, -82.7485), 1.0000),
    ((50, -0.9009, -85.5211), (50, 0, -82.7485), 1.0000),
    ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, -1, 2), (50, 0, 0), 2.3669),
    ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
    ((50, 2.49, -0.001), (50, -2.49, 0.0010), 7.1792),
    ((50, 2.49, -0.001), (50, -2.49, 0.0011), 7.2195),
    ((50, 2.49, -0.001), (50, -2.49, 0.0012), 7.2195),
    ((50, -0.001, 2.49), (50, 0.0009, -2.49), 4.8045),
    ((50, -0.001, 2.49), (50, 0.0010, -2.49), 4.8045),
    ((50, -0.001, 2.49), (50, 0.0011, -2.49), 4.7461),
    ((50, 2.5, 0), (50, 0, -2.5), 4.3065),
    ((50, 2.5, 0), (73, 25, -18), 27.1492),
    ((50, 2.5, 0), (61, -5, 29), 22.8977),
    ((50, 2.5, 0), (56, -27, -3), 31.9030),
    ((50, 2.5, 0), (58, 24, 15), 19.4535),
    ((50, 2.5, 0), (50, 3.1736, 0.5854), 1.0000),
]


def test_ciede2000_sharma_table():
    lab1 = np.array([r[0] for r in SHARMA], dtype=np.float64)
    lab2 = np.array([r[1] for r in SHARMA], dtype=np.float64)
    expected = np.array([r[2] for r in SHARMA])
    ours = ciede2000(_lab(lab1), _lab(lab2))[0, 0, :, 0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=5.01e-5)


def test_ciede2000_keeps_float32():
    lab = _lab(np.array([SHARMA[0][0], SHARMA[16][0]], dtype=np.float32))
    other = _lab(np.array([SHARMA[0][1], SHARMA[16][1]], dtype=np.float32))
    out = ciede2000(lab, other)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0, :, 0].numpy(), [2.0425, 27.1492], atol=1e-4)


def test_mean_delta_e():
    x = data.coffee()[:96, :128] / 255.0
    y = data.astronaut()[:96, :128] / 255.0
    assert mean_delta_e(_t(x), _t(x)) == 0.0
    # skimage's own sRGB -> Lab (D65) differs from lab_from_rgb by up to about 2e-3 in Lab units.
    ref = color.deltaE_ciede2000(color.rgb2lab(x), color.rgb2lab(y)).mean()
    assert mean_delta_e(_t(x), _t(y)) == pytest.approx(ref, rel=1e-4)
    assert mean_delta_e(_t(x).float(), _t(y).float()) == pytest.approx(ref, rel=1e-4)


def test_colourfulness():
    gray = np.repeat(np.random.default_rng(7).random((20, 30, 1)), 3, axis=2)
    assert colourfulness(_t(gray)) == 0.0
    red = np.zeros((8, 8, 3))
    red[..., 0] = 1
    # rg = 255 and yb = 127.5 everywhere: no spread, only the mean term.
    assert colourfulness(_t(red)) == pytest.approx(0.3 * np.hypot(255.0, 127.5), rel=1e-12)
    coffee = data.coffee().astype(np.float64)  # already 0-255
    r, g, b = coffee[..., 0], coffee[..., 1], coffee[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    ref = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert colourfulness(_t(coffee / 255)) == pytest.approx(ref, rel=1e-9, abs=1e-6)
    assert colourfulness(_t(coffee / 255).float()) == pytest.approx(ref, rel=1e-6)
