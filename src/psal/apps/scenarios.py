"""The image-editing scenarios, in one place: each builds a task's inputs and its truth from
scikit-image's bundled pictures. ``psal demo`` runs one of each; ``python -m psal.bench apps``
loops over many, beside the baselines. Everything is built on the CPU, deterministically.
"""

from __future__ import annotations

import torch

from psal import images
from psal.apps.metrics import make_hole
from psal.apps.upscale import downsample

INPAINT_PICTURES = ("brick", "grass", "gravel", "astronaut", "coffee", "chelsea", "camera", "rocket")
COLOUR_PICTURES = ("astronaut", "coffee", "chelsea", "rocket")  # the colour ones among the bundled
UPSCALE_PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")

# What `psal demo` shows: two inpaintings (a texture, a photograph), one colorization, one x2
# upscale, one reconstruction from another picture's patches.
DEMO = {"inpaint": ("brick", "chelsea"), "colorize": ("coffee",), "upscale": (("camera", 2),), "reconstruct": (("astronaut", "coffee"),)}


def inpaint_case(name: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(truth (1, 3, S, S), hole (1, 1, S, S) bool)``: the picture and a seeded hole of random
    rectangles and ellipses covering 12-22% of it (the seed derives from the name)."""
    return images.load_bundled(name, size), make_hole(size, 1000 + sum(map(ord, name)))


def colorize_case(name: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gray (1, 1, S, S), reference (1, 3, S, S), truth (1, 3, S, S))``: the reference is the
    picture's top-left 5/8 crop, the truth its bottom-right 5/8 crop, the target that truth in gray."""
    im = images.load_bundled(name)
    H, W = im.shape[-2:]
    s = min(H, W) * 5 // 8
    reference = images.resize(im[..., :s, :s], (size, size))
    truth = images.resize(im[..., H - s :, W - s :], (size, size))
    return images.grayscale(truth), reference, truth


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
