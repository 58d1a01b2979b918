"""Super-resolution by internal learning: a small network trained on the picture itself, with no
weights from anywhere (after Shocher, Cohen and Irani 2018, "Zero-Shot" Super-Resolution, ZSSR).

Scheme, for a factor s:

1. Examples. "Fathers" are the input and copies of it shrunk by 0.9, 0.81, ... (as long as they
   hold a training crop), drawn with probability proportional to their area. A training pair is
   a random ``crop x crop`` square of a father under one of the 8 rotations and flips (the
   target) and its "child": the same square shrunk by s (bicubic, antialiased) and enlarged back
   (bicubic), the degradation the network is to undo.
2. The network: ``depth`` 3 x 3 convolutions of ``channels`` channels with ReLUs between them,
   predicting the residual ``target - child`` (ZSSR's 8 layers of 64 channels by default), its
   last convolution starting at zero (the untrained network is the bicubic enlargement);
   ``psal_blocks`` inserts that many :class:`psal.PSALBlock` self-attention blocks at the middle
   of the network (shared query and key, so that the matches make sense from the first step).
   The hidden convolutions start from He's initialisation: with PyTorch's default the signal
   shrinks layer by layer and the network stalls for hundreds of steps before it learns (with
   a PSAL block it never did in 1,500).
3. Training: L1 loss, Adam, ``steps`` steps of one crop each, the learning rate divided by 10 at
   60% and again at 85% of the steps (ZSSR lowers it when the loss stops falling; a fixed
   schedule keeps the time known in advance).
4. Prediction: the input enlarged (bicubic) plus the network's residual, under each of the 8
   rotations and flips, turned back and averaged (ZSSR's self-ensemble; it takes the median),
   then back-projected onto the input (Irani and Peleg) so that shrinking the result gives the
   input back.
5. Factors 3 and 4 climb in two equal stages of ``sqrt(s)`` (ZSSR's gradual configuration;
   patches recur better across small scale gaps): the same network trains ``steps`` more steps
   on the first stage's result (clipped to [0, 1]), and the second result is back-projected onto
   the original.

Everything follows the input's device and dtype (float16/bfloat16 are trained in float32); the
``seed`` fixes the network's start, the crops and the PSAL blocks' searches (without touching
torch's global random state), so the same seed gives the same result on one device and build.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as checks
from ..nn import PSALBlock
from .upscale import back_project, check_image_scale, enlarge, shrink

__all__ = ["InternalNet", "internal_upscale"]

_FN = "psal.apps.internal_upscale"
# Fathers: the input shrunk by powers of this, while the shrunk copy still holds a crop.
_FATHER_RATIO = 0.9
_MAX_FATHERS = 8


def _transform(x: torch.Tensor, t: int) -> torch.Tensor:
    """The ``t``-th of the 8 rotations and flips (``t`` in 0..7) of ``(B, C, H, W)``."""
    x = torch.rot90(x, t % 4, (-2, -1))
    return x.flip(-1) if t >= 4 else x


def _untransform(x: torch.Tensor, t: int) -> torch.Tensor:
    """The inverse of :func:`_transform`."""
    x = x.flip(-1) if t >= 4 else x
    return torch.rot90(x, -(t % 4), (-2, -1))


class InternalNet(nn.Module):
    """The residual network of :func:`internal_upscale`: ``depth`` 3 x 3 convolutions (ReLU
    between them), ``psal_blocks`` :class:`psal.PSALBlock` blocks after the middle convolution.

    ``forward(x, generator=None)``: ``(B, C, H, W)`` -> the residual to add to ``x``, ``(B, C,
    H, W)``; ``generator`` feeds the PSAL blocks' random search starts.
    """

    def __init__(self, image_channels: int, channels: int = 64, depth: int = 8, psal_blocks: int = 0, **block_options: Any) -> None:
        super().__init__()
        fn = "psal.apps.internal_sr.InternalNet"
        checks.check_int(fn, "image_channels", image_channels, 1)
        checks.check_int(fn, "channels", channels, 1)
        checks.check_int(fn, "depth", depth, 2)
        checks.check_int(fn, "psal_blocks", psal_blocks, 0)
        convs = [
            nn.Conv2d(image_channels if i == 0 else channels, image_channels if i == depth - 1 else channels, 3, padding=1)
            for i in range(depth)
        ]
        self.convs = nn.ModuleList(convs)
        # He's initialisation keeps the signal's scale through the ReLUs (PyTorch's default shrinks
        # it layer by layer, and the network then spends hundreds of steps nearly dead); the last
        # convolution starts at zero: the untrained network is the bicubic enlargement.
        for conv in convs[:-1]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(convs[-1].weight)
        for conv in convs:
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.middle = (depth - 1) // 2  # blocks go after this convolution (and its ReLU)
        options = {"num_neighbors": 4, "patch_size": 3, "shared_query_key": True, **block_options}
        self.blocks = nn.ModuleList(PSALBlock(channels, **options) for _ in range(psal_blocks))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < last:
                x = F.relu(x)
            if i == self.middle:
                for block in self.blocks:
                    x = block(x, generator=generator)
        return x


def _fathers(image: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """The input and its copies shrunk by powers of :data:`_FATHER_RATIO` that still hold a crop."""
    out = [image]
    H, W = image.shape[-2:]
    for i in range(1, _MAX_FATHERS):
        f = _FATHER_RATIO**i
        size = (round(H * f), round(W * f))
        if min(size) < crop:
            break
        out.append(shrink(image, size))
    return out


def _check(image, scale, steps, crop, channels, depth, psal_blocks, lr, seed, progress):
    check_image_scale(_FN, image, scale)
    checks.check_int(_FN, "steps", steps, 1)
    checks.check_int(_FN, "crop", crop, 2 * scale)
    checks.check_int(_FN, "channels", channels, 1)
    checks.check_int(_FN, "depth", depth, 2)
    checks.check_int(_FN, "psal_blocks", psal_blocks, 0)
    checks.check_int(_FN, "seed", seed, 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"{_FN}: lr must be a positive number, got {lr!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"{_FN}: progress must be callable as progress(done, total, loss) or None, got {type(progress).__name__}")


def _stages(scale: int) -> list[float]:
    """The factors of the successive stages: x2 in one, x3 and x4 in two equal steps (ZSSR climbs
    to large factors gradually; the nearer scales recur better)."""
    return [float(scale)] if scale <= 2 else [math.sqrt(scale)] * 2


def _train(net, image, factor, steps, crop, lr, gen, search_gen, progress):
    """``steps`` steps of Adam on crops of ``image``'s fathers against their children for
    ``factor`` (module docstring, steps 1 and 3)."""
    crop = min(crop, *image.shape[-2:])
    if factor == int(factor):  # a whole factor: a crop that it divides, so that the child is exact
        crop -= crop % int(factor)
    small = max(1, round(crop / factor))
    fathers = _fathers(image, crop)
    areas = torch.tensor([float(f.shape[-2] * f.shape[-1]) for f in fathers])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.6 * steps), int(0.85 * steps)], gamma=0.1)
    net.train()
    for step in range(steps):
        father = fathers[int(torch.multinomial(areas, 1, generator=gen))]
        fh, fw = father.shape[-2:]
        top = int(torch.randint(0, fh - crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, fw - crop + 1, (1,), generator=gen))
        target = _transform(father[..., top : top + crop, left : left + crop], int(torch.randint(0, 8, (1,), generator=gen)))
        child = enlarge(shrink(target, (small, small)), (crop, crop))
        loss = (net(child, search_gen) + child - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))


def _predict(net, image, size, search_gen, low):
    """``image`` enlarged to ``size`` plus the network's residual, averaged over the 8 rotations
    and flips, back-projected onto ``image`` and then onto the original input ``low``."""
    net.eval()
    with torch.no_grad():
        up = enlarge(image, size)
        out = torch.zeros_like(up)
        for t in range(8):
            x = _transform(up, t)
            out += _untransform(x + net(x, search_gen), t)
        out = back_project(out / 8, image)
        return out if image is low else back_project(out, low)


def internal_upscale(
    image: torch.Tensor,
    scale: int = 2,
    *,
    steps: int = 1500,
    crop: int = 48,
    channels: int = 64,
    depth: int = 8,
    psal_blocks: int = 0,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> torch.Tensor:
    """``image (1, C, H, W)`` in ``[0, 1]`` (C = 1 or 3) -> ``(1, C, scale * H, scale * W)`` in
    ``[0, 1]``, by a network trained on the image itself (the module docstring gives the scheme).

    Args:
        image: the low-resolution picture.
        scale: 2, 3 or 4.
        steps: training steps (one crop each) per stage: x3 and x4 train twice as many.
        crop: side of the training crops (at most the smallest side of the stage's input, and
            cut down to a multiple of a whole stage factor).
        channels, depth: width and number of convolutions of the network.
        psal_blocks: :class:`psal.PSALBlock` blocks in the middle of the network (0: the
            convolution-only network of ZSSR).
        lr: Adam's learning rate at the start.
        seed: fixes the network's initial weights and the training crops.
        progress: called as ``progress(done, total, loss)`` after each training step, ``total``
            counting the steps of every stage.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.
    """
    _check(image, scale, steps, crop, channels, depth, psal_blocks, lr, seed, progress)
    device, out_dtype = image.device, image.dtype
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    low = image.detach().to(dt)
    C, h, w = low.shape[1:]
    gen = torch.Generator().manual_seed(seed)  # crops and transforms: drawn on the CPU
    search_gen = torch.Generator(device=device).manual_seed(seed)  # the PSAL blocks' searches
    # The initial weights from the seed, on the CPU, without touching the caller's random state
    # (fork_rng restores the CPU's and, where present, every GPU's, which manual_seed also sets).
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        net = InternalNet(C, channels, depth, psal_blocks).to(device=device, dtype=dt)
    stages = _stages(scale)
    current = low
    for i, factor in enumerate(stages):
        report = None if progress is None else (lambda done, total, loss, i=i: progress(i * steps + done, len(stages) * steps, loss))
        _train(net, current, factor, steps, crop, lr, gen, search_gen, report)
        size = (h * scale, w * scale) if i == len(stages) - 1 else (round(current.shape[-2] * factor), round(current.shape[-1] * factor))
        # clipped to [0, 1] after every stage (as ZSSR does): the next stage trains on it as a picture
        current = _predict(net, current, size, search_gen, low).clamp(0, 1)
    return current.to(out_dtype)
