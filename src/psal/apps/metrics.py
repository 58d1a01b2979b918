"""What the image-editing tasks are measured with, shared by ``psal demo`` and ``psal.bench apps``."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def make_hole(size: int, seed: int) -> torch.Tensor:
    """``(1, 1, S, S)`` bool: seeded random rectangles and ellipses covering 12-22% of the image."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    target = g.uniform(0.12, 0.22)
    m = np.zeros((size, size), bool)
    while m.mean() < target:
        if g.random() < 0.5:
            h, w = g.integers(size // 10, size // 4, 2)
            y, x = g.integers(0, size - h), g.integers(0, size - w)
            m[y : y + h, x : x + w] = True
        else:
            cy, cx = g.integers(size // 8, size - size // 8, 2)
            ry, rx = g.uniform(size / 20, size / 8, 2)
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if m.mean() > 0.25:
            m[:] = False
    return torch.from_numpy(m)[None, None]


def _grad_magnitude(img: torch.Tensor) -> torch.Tensor:
    y = img.mean(1, keepdim=True)
    gx = F.pad(y[..., :, 1:] - y[..., :, :-1], (0, 1, 0, 0))
    gy = F.pad(y[..., 1:, :] - y[..., :-1, :], (0, 0, 0, 1))
    return (gx.square() + gy.square()).sqrt()


def gradient_ratio(img: torch.Tensor, hole: torch.Tensor) -> float:
    """Mean luminance gradient magnitude in the hole over that of the known region."""
    g = _grad_magnitude(img)
    return float(g[hole].mean() / g[~hole].mean())


def hole_psnr(a: torch.Tensor, b: torch.Tensor, hole: torch.Tensor) -> float:
    """PSNR in dB of the pixels in ``hole`` only (images in ``[0, 1]``)."""
    h = hole.expand_as(a)
    return float(10 * torch.log10(1 / (a[h] - b[h]).square().mean().clamp_min(1e-12)))


def luma(img: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)``: BT.601 luminance of an RGB image in ``[0, 1]``, on the image's device."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=img.dtype, device=img.device).view(1, 3, 1, 1) / 255
    return (img.clamp(0, 1) * w).sum(1, keepdim=True)


def _shaved(name: str, a: torch.Tensor, b: torch.Tensor, crop, keep: int = 1) -> tuple[slice, slice]:
    """The rows and columns left when ``crop`` pixels are cut off at every border (at least
    ``keep`` of each must be left)."""
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"{name}: a and b must be (B, C, H, W) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ValueError(f"{name}: crop must be an int >= 0, got {crop!r}")
    if min(a.shape[-2:]) - 2 * crop < keep:
        raise ValueError(f"{name}: crop={crop} leaves fewer than {keep} pixels a side of images {tuple(a.shape)}")
    return slice(crop, a.shape[-2] - crop), slice(crop, a.shape[-1] - crop)


def y_psnr(a: torch.Tensor, b: torch.Tensor, crop: int) -> float:
    """PSNR in dB of the BT.601 luminance, ``crop`` pixels left out at every border."""
    rows, cols = _shaved("y_psnr", a, b, crop)
    mse = (luma(a) - luma(b))[..., rows, cols].square().mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-12)))


def y_ssim(a: torch.Tensor, b: torch.Tensor, crop: int) -> float:
    """Mean SSIM (:func:`ssim_map`, data range 1) of the BT.601 luma Y = 16/255 + :func:`luma`
    (the super-resolution convention, as MATLAB's ``rgb2ycbcr``; the offset changes SSIM, not
    PSNR), ``crop`` pixels cut off at every border first (``crop`` = the scale), and the map's
    mean taken where the 11 x 11 window lies inside (as Wang et al.'s code and scikit-image's
    ``structural_similarity`` do)."""
    rows, cols = _shaved("y_ssim", a, b, crop, keep=11)
    ya, yb = (luma(t[..., rows, cols]) + 16 / 255 for t in (a, b))
    return float(ssim_map(ya, yb)[..., 5:-5, 5:-5].mean())


def chroma_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the Lab a and b channels (range 256) of two RGB images."""
    from .colorize import lab_from_rgb

    d = (lab_from_rgb(a)[:, 1:] - lab_from_rgb(b)[:, 1:]).square().mean()
    return float(10 * torch.log10(256.0**2 / d.clamp_min(1e-12)))


def _check_region(name: str, a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape[0] != 1:
        raise ValueError(f"{name}: a must be (1, C, H, W), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if region.dtype != torch.bool or region.shape != (1, 1, *a.shape[2:]):
        raise ValueError(f"{name}: region must be a bool (1, 1, {a.shape[2]}, {a.shape[3]}), got {region.dtype} {tuple(region.shape)}")
    if not bool(region.any()):
        raise ValueError(f"{name}: region is empty")


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of ``n`` samples padded by ``pad`` on each side by half-sample symmetric reflection
    (``d c b a | a b c d | d c b a``, scipy.ndimage's ``reflect``; numpy's ``symmetric``), any ``n``."""
    i = torch.arange(-pad, n + pad, device=device).remainder(2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Float64 SSIM map (Wang et al. 2004) of two ``(B, C, H, W)`` images in ``[0, 1]``, channel by channel.

    Gaussian window sigma 1.5 of radius 5 (11x11), K1 = 0.01, K2 = 0.03, data range 1, population
    statistics, half-sample symmetric padding at the border (as ``skimage.metrics.structural_similarity``
    with ``gaussian_weights=True, use_sample_covariance=False``).
    """
    radius, sigma = 5, 1.5
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    x, y = x.double(), y.double()
    stats = torch.cat([x, y, x * x, y * y, x * y], 1)  # (B, 5C, H, W)
    rows, cols = _symmetric_index(H, radius, x.device), _symmetric_index(W, radius, x.device)
    stats = stats[:, :, rows][:, :, :, cols]
    n = stats.shape[1]
    stats = F.conv2d(stats, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    stats = F.conv2d(stats, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    ux, uy, uxx, uyy, uxy = stats.split(C, 1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    return (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def hole_ssim(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
    """Mean over ``region`` ``(1, 1, H, W)`` of the SSIM map (``ssim_map``, computed on the whole
    image) of the BT.601 luminance of two RGB images in ``[0, 1]``."""
    _check_region("hole_ssim", a, b, region)
    return float(ssim_map(luma(a), luma(b))[region].mean())


def swd_directions(dim: int, directions: int, seed: int) -> torch.Tensor:
    """``(directions, dim)`` float64 random unit vectors (normalised Gaussians), the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(directions, dim, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _patches(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C * size * size)`` float64: the patches centred on ``(ys, xs)``, borders replicated,
    flattened channel, then row, then column (``F.unfold``'s order)."""
    _, C, H, W = img.shape
    o = torch.arange(size, device=img.device) - size // 2
    rows = (ys[:, None] + o).clamp(0, H - 1)
    cols = (xs[:, None] + o).clamp(0, W - 1)
    p = img[0].double()[:, rows[:, :, None], cols[:, None, :]]  # (C, N, size, size)
    return p.permute(1, 0, 2, 3).reshape(len(ys), -1)


def patch_swd(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor, patch_size: int = 7, directions: int = 256, seed: int = 0) -> float:
    """100 x the sliced Wasserstein-1 distance between the ``patch_size`` x ``patch_size`` patches
    (all channels, borders replicated) centred on the pixels of ``region`` in ``a`` and those in ``b``,
    over ``swd_directions(C * patch_size**2, directions, seed)``."""
    _check_region("patch_swd", a, b, region)
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_swd: patch_size must be a positive odd number, got {patch_size}")
    if directions < 1:
        raise ValueError(f"patch_swd: directions must be at least 1, got {directions}")
    ys, xs = region[0, 0].nonzero(as_tuple=True)
    pa, pb = _patches(a, ys, xs, patch_size), _patches(b, ys, xs, patch_size)
    dirs = swd_directions(pa.shape[1], directions, seed).to(a.device)
    chunk = max(1, min(directions, 2**21 // len(ys)))  # about 16 MiB per projection buffer
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for d in dirs.split(chunk):
        qa = (d @ pa.T).sort(1).values  # (chunk, N): sorting along rows is the faster way round
        qb = (d @ pb.T).sort(1).values
        total += (qa - qb).abs().mean(1).sum()
    return float(100 * total / directions)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)``: CIEDE2000 colour difference of two CIE Lab ``(B, 3, H, W)`` tensors
    (Sharma, Wu and Dalal 2005, kL = kC = kH = 1), computed in float64."""
    dtype = torch.promote_types(lab1.dtype, lab2.dtype)
    L1, a1, b1 = lab1.double().split(1, 1)
    L2, a2, b2 = lab2.double().split(1, 1)
    c7 = ((torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - torch.sqrt(c7 / (c7 + 25.0**7)))
    a1, a2 = a1 * (1 + g), a2 * (1 + g)
    C1, C2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    h1, h2 = torch.atan2(b1, a1), torch.atan2(b2, a2)  # radians; hue 0 where the chroma is 0
    h1 = torch.where(C1 == 0, 0.0, torch.where(h1 < 0, h1 + 2 * math.pi, h1))
    h2 = torch.where(C2 == 0, 0.0, torch.where(h2 < 0, h2 + 2 * math.pi, h2))
    cc = C1 * C2
    dh = h2 - h1
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(cc == 0, 0.0, dh)
    dH = 2 * torch.sqrt(cc) * torch.sin(dh / 2)
    hs = h1 + h2
    far = (h1 - h2).abs() > math.pi
    h_bar = torch.where(far, torch.where(hs < 2 * math.pi, hs + 2 * math.pi, hs - 2 * math.pi), hs) / 2
    h_bar = torch.where(cc == 0, hs, h_bar)
    L_bar, C_bar = (L1 + L2) / 2, (C1 + C2) / 2
    deg = math.pi / 180
    t = (
        1
        - 0.17 * torch.cos(h_bar - 30 * deg)
        + 0.24 * torch.cos(2 * h_bar)
        + 0.32 * torch.cos(3 * h_bar + 6 * deg)
        - 0.20 * torch.cos(4 * h_bar - 63 * deg)
    )
    theta = 30 * deg * torch.exp(-(((h_bar / deg - 275) / 25) ** 2))
    c7 = C_bar**7
    r_t = -2 * torch.sqrt(c7 / (c7 + 25.0**7)) * torch.sin(2 * theta)
    s_l = 1 + 0.015 * (L_bar - 50) ** 2 / torch.sqrt(20 + (L_bar - 50) ** 2)
    s_c = 1 + 0.045 * C_bar
    s_h = 1 + 0.015 * C_bar * t
    l_term, c_term, h_term = (L2 - L1) / s_l, (C2 - C1) / s_c, dH / s_h
    de2 = l_term**2 + c_term**2 + h_term**2 + r_t * c_term * h_term
    return de2.clamp_min(0).sqrt().to(dtype)


def mean_delta_e(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean CIEDE2000 colour difference of two RGB images in ``[0, 1]``."""
    from .colorize import lab_from_rgb

    return float(ciede2000(lab_from_rgb(a.double()), lab_from_rgb(b.double())).mean())


def colourfulness(img: torch.Tensor) -> float:
    """Hasler and Suesstrunk's (2003) colourfulness M of an RGB image in ``[0, 1]`` (read as ``[0, 255]``)."""
    r, g, b = (img.double() * 255).unbind(1)
    rg, yb = r - g, (r + g) / 2 - b
    spread = (rg.var(correction=0) + yb.var(correction=0)).sqrt()
    return float(spread + 0.3 * (rg.mean().square() + yb.mean().square()).sqrt())
