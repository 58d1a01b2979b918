"""The image-editing scenarios, in one place: each builds a task's inputs and its truth from
scikit-image's bundled pictures. ``psal demo`` runs one of each; ``python -m psal.bench apps``
loops over many, beside the baselines. Everything is built on the CPU, deterministically.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from psal import images
from psal.apps.metrics import make_hole
from psal.apps.upscale import downsample

INPAINT_PICTURES = ("brick", "grass", "gravel", "astronaut", "coffee", "chelsea", "camera", "rocket")
COLOUR_PICTURES = ("astronaut", "coffee", "chelsea", "rocket")  # the colour ones among the bundled
UPSCALE_PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")

# What `psal demo` shows: two inpaintings (a texture, a photograph), one colorization, one x2
# upscale, one reconstruction from another picture's patches.
DEMO: dict[str, Any] = {
    "inpaint": ("brick", "chelsea"),
    "colorize": ("coffee",),
    "upscale": (("camera", 2),),
    "reconstruct": (("astronaut", "coffee"),),
}


def inpaint_case(name: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(truth (1, 3, S, S), hole (1, 1, S, S) bool)``: the picture and a seeded hole of random
    rectangles and ellipses covering 12-22% of it (the seed derives from the name)."""
    return images.load_bundled(name, size), make_hole(size, 1000 + sum(map(ord, name)))


def colorize_case(name: str, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gray (1, 1, S, S), reference (1, 3, S, S), truth (1, 3, S, S))`` from the two halves of
    :func:`colour_halves` (no pixel in common), resized to ``size`` (``None``: as cut)."""
    reference, truth = colour_halves(name)
    if size is not None:
        reference, truth = images.resize(reference, (size, size)), images.resize(truth, (size, size))
    return images.grayscale(truth), reference, truth


# ----------------------------------------------------------------------------------------------
# The evaluation of ``python -m psal.bench apps``: pictures at their own resolution, cut as crops
# (never whole pictures shrunk), textures apart from photographs.

EVAL_TEXTURES = ("brick", "grass", "gravel")
# Super-resolution photographs (``sr_case``): the issue 17 protocol's, textures apart.
SR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "china")
EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "retina", "hubble_deep_field",
               "immunohistochemistry", "china", "flower", "grace_hopper")  # fmt: skip
EVAL_COLOUR = tuple(name for name in EVAL_PHOTOS if name != "camera")  # the colour photographs
# Hole families, each seeded per picture: a centred square of 25%, random blobs of 12-22%, thin
# strokes of 5%.
MASK_FAMILIES = ("square", "blobs", "strokes")
EVAL_SIDE = 256


def crop(name: str, side: int = EVAL_SIDE, held_out: bool = False) -> torch.Tensor:
    """``(1, 3, s, s)``: the centred ``side x side`` crop of the picture at its own resolution
    (``s`` is smaller only for a picture smaller than ``side``); ``held_out``: the crop half a
    side up and left of it instead (clipped to the picture), for tuning away from the
    evaluation's cases (it overlaps the centred crop on pictures under twice ``side``; the
    top-left corner itself is black on retina)."""
    im = images.load_bundled(name)
    H, W = im.shape[-2:]
    s = min(side, H, W)
    top, left = (H - s) // 2, (W - s) // 2
    if held_out:
        top, left = max(top - s // 2, 0), max(left - s // 2, 0)
    return im[..., top : top + s, left : left + s]


def sr_case(name: str, scale: int, side: int = EVAL_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, truth)`` of the super-resolution protocol: ``truth`` the centred crop of the picture
    at its own resolution (:func:`crop`), cut at the bottom and right to a multiple of ``scale``;
    ``low`` its bicubic, antialiased downsampling by ``scale``, in ``[0, 1]``."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"sr_case: scale must be a positive int, got {scale!r}")
    truth = crop(name, side)
    h, w = truth.shape[-2:]
    truth = truth[..., : h - h % scale, : w - w % scale]
    return downsample(truth, scale).clamp(0, 1), truth


def colour_halves(name: str, side: int = EVAL_SIDE, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference, truth)``, each ``(1, 3, s, s)``: two side-by-side squares at the picture's
    centre at its own resolution, the left one the reference and the right one the truth, so that
    they share no pixel (``s = min(side, H, W // 2)``). ``held_out``: the upper and lower squares
    instead (``s = min(side, H // 2, W)``), for tuning away from the reported pairs (the squares
    differ, though on most pictures they share pixels with the left and right ones)."""
    im = images.load_bundled(name)
    H, W = im.shape[-2:]
    if held_out:
        s = min(side, H // 2, W)
        left, mid = (W - s) // 2, H // 2
        return im[..., mid - s : mid, left : left + s], im[..., mid : mid + s, left : left + s]
    s = min(side, H, W // 2)
    top, mid = (H - s) // 2, W // 2
    return im[..., top : top + s, mid - s : mid], im[..., top : top + s, mid : mid + s]


def _seed(*parts: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate("/".join(parts)))


def square_hole(size: int, seed: int | None = None) -> torch.Tensor:
    """``(1, 1, S, S)`` bool: a square of a quarter of the area, centred (``seed=None``) or at a
    seeded place at least an eighth of the side from the borders."""
    side = round(size / 2)
    top = left = (size - side) // 2
    if seed is not None:
        top, left = (int(v) for v in np.random.default_rng(seed).integers(size // 8, size - side - size // 8 + 1, 2))
    hole = torch.zeros(1, 1, size, size, dtype=torch.bool)
    hole[..., top : top + side, left : left + side] = True
    return hole


def blob_hole(size: int, seed: int) -> torch.Tensor:
    """``(1, 1, S, S)`` bool: seeded random rotated ellipses covering 12-22% of the area."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    target = g.uniform(0.12, 0.22)
    m = np.zeros((size, size), bool)
    while m.mean() < target:
        cy, cx = g.uniform(size * 0.1, size * 0.9, 2)
        ry, rx = g.uniform(size / 18, size / 7, 2)
        t = g.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        m |= (u / ry) ** 2 + (v / rx) ** 2 <= 1
        if m.mean() > 0.22:
            m[:] = False
    return torch.from_numpy(m)[None, None]


def stroke_hole(size: int, seed: int, cover: float = 0.05) -> torch.Tensor:
    """``(1, 1, S, S)`` bool: seeded thin brush strokes (polylines 3-7 pixels wide that turn a
    little at each step) until they cover ``cover`` of the area."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    m = np.zeros((size, size), bool)
    while m.mean() < cover:
        y, x = g.uniform(size * 0.1, size * 0.9, 2)
        angle = g.uniform(0, 2 * np.pi)
        half = g.uniform(1.5, 3.5)
        for _ in range(g.integers(4, 9)):
            angle += g.uniform(-0.8, 0.8)
            length = g.uniform(size / 16, size / 6)
            y1 = float(np.clip(y + length * np.sin(angle), 0, size - 1))
            x1 = float(np.clip(x + length * np.cos(angle), 0, size - 1))
            # pixels within `half` of the segment (y, x) - (y1, x1)
            dy, dx = y1 - y, x1 - x
            t = np.clip(((yy - y) * dy + (xx - x) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
            m |= (yy - y - t * dy) ** 2 + (xx - x - t * dx) ** 2 <= half * half
            y, x = y1, x1
            if m.mean() >= cover:
                break
    return torch.from_numpy(m)[None, None]


def eval_hole(family: str, name: str, size: int, held_out: bool = False) -> torch.Tensor:
    """The hole of ``family`` (one of :data:`MASK_FAMILIES`) for picture ``name``, seeded by both
    (``held_out``: other seeds, and the square at a seeded place)."""
    seed = _seed(family, name, "held-out") if held_out else _seed(family, name)
    if family == "square":
        return square_hole(size, seed if held_out else None)
    if family == "blobs":
        return blob_hole(size, seed)
    if family == "strokes":
        return stroke_hole(size, seed)
    raise ValueError(f"eval_hole: family must be one of {', '.join(MASK_FAMILIES)}, got {family!r}")


def upscale_case(name: str, size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low (1, 3, s, s), truth (1, 3, S', S'))``: the picture at ``size`` cropped to a whole
    number of low-resolution pixels, and its bicubic downsampling by ``scale``."""
    truth = images.load_bundled(name, size)
    side = size - size % scale
    truth = truth[..., :side, :side]
    return downsample(truth, scale).clamp(0, 1), truth


def reconstruct_case(target: str, source: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, source)``, both ``(1, 3, S, S)``: rebuild the first from the second's patches."""
    return images.load_bundled(target, size), images.load_bundled(source, size)


def inpaint_shown(truth: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The picture as the user sees it before the fill: the hole painted magenta."""
    magenta = torch.tensor([1.0, 0.0, 1.0], dtype=truth.dtype, device=truth.device).view(1, 3, 1, 1)
    return torch.where(hole.expand_as(truth), magenta, truth)
