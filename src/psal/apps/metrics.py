"""What the image-editing tasks are measured with, shared by ``psal demo`` and ``psal.bench apps``."""

from __future__ import annotations

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


def y_psnr(a: torch.Tensor, b: torch.Tensor, crop: int) -> float:
    """PSNR in dB of the BT.601 luminance, ``crop`` pixels left out at every border."""
    mse = (luma(a) - luma(b))[..., crop:-crop, crop:-crop].square().mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-12)))


def chroma_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the Lab a and b channels (range 256) of two RGB images."""
    from .colorize import lab_from_rgb

    d = (lab_from_rgb(a)[:, 1:] - lab_from_rgb(b)[:, 1:]).square().mean()
    return float(10 * torch.log10(256.0**2 / d.clamp_min(1e-12)))
