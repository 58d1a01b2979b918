"""A task only non-local attention can solve: copy a texture across the image by matching codes.

Each sample is ``size x 2 size``. Its left half shows a random smooth texture (3 channels) and a
random smooth code (4 channels); its right half shows the same code moved by a random shift
(cyclic, different for every sample) and no texture. The target is the texture in the right
half, moved like the code: to produce it, a pixel must find the left-half pixel with its code, up
to ``size`` pixels away in a direction that changes from sample to sample. A convolution sees a
fixed neighbourhood and cannot; a PSAL block finds the match by PatchMatch, once it has learned a
projection that compares codes and ignores the rest. The block shares its query and key
projection (``shared_query_key=True``): with two independent random projections, the matches found
at initialisation are unrelated to the right ones, no gradient points towards them, and the loss
stays at 1.0 (measured: 200 steps, held-out loss 0.998 against 0.10 with sharing).

``python -m psal.examples.nonlocal_copy`` trains a small PSAL network and a conv-only network
with as many parameters for the same time and prints their losses.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import psal


def _smooth(batch: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random fields with structure at about a quarter of the size, unit variance."""
    coarse = torch.randn(batch, channels, size // 4 + 1, size // 4 + 1, generator=generator)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def make_batch(batch: int, size: int, generator: torch.Generator):
    """``(inputs (B, 8, S, 2S), target (B, 3, S, S), key_mask (B, S, 2S))``; the target is the
    right half's texture."""
    code = _smooth(batch, 4, size, generator)
    texture = _smooth(batch, 3, size, generator)
    shifts = torch.randint(0, size, (batch, 2), generator=generator)
    moved_code = torch.stack([c.roll(tuple(s.tolist()), (1, 2)) for c, s in zip(code, shifts)])
    target = torch.stack([t.roll(tuple(s.tolist()), (1, 2)) for t, s in zip(texture, shifts)])
    zeros = torch.zeros_like(texture)
    flag = torch.cat([torch.zeros(batch, 1, size, size), torch.ones(batch, 1, size, size)], 3)
    inputs = torch.cat([torch.cat([code, moved_code], 3), torch.cat([texture, zeros], 3), flag], 1)
    key_mask = flag[:, 0] == 0  # attend to the left half, where the texture is known
    return inputs, target, key_mask


class PSALNet(nn.Module):
    """A 3x3 stem, one :class:`psal.PSALBlock`, a 1x1 head."""

    def __init__(self, width: int = 16, **attention_options):
        super().__init__()
        self.stem = nn.Conv2d(8, width, 3, padding=1)
        self.block = psal.PSALBlock(width, shared_query_key=True, **attention_options)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x, key_mask):
        return self.head(self.block(self.stem(x), key_mask=key_mask))


class ConvNet(nn.Module):
    """Convolutions only, about as many parameters as :class:`PSALNet`."""

    def __init__(self, width: int = 11):
        super().__init__()
        # Dilations widen the view to 15 x 15 pixels, for the parameters of a 3x3 stack.
        self.body = nn.Sequential(
            nn.Conv2d(8, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, 3, 3, padding=4, dilation=4),
        )

    def forward(self, x, key_mask):
        return self.body(x)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def right_half_loss(model: nn.Module, inputs, target, key_mask) -> torch.Tensor:
    size = target.shape[-1]
    return F.mse_loss(model(inputs, key_mask)[..., size:], target)


def train(model: nn.Module, *, steps: int, size: int = 24, batch: int = 8, lr: float = 1e-2, seed: int = 0, log=None):
    """Adam on fresh batches; returns the mean right-half loss on 4 held-out batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        loss = right_half_loss(model, *make_batch(batch, size, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}")
    test_gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        return sum(right_half_loss(model, *make_batch(batch, size, test_gen)).item() for _ in range(4)) / 4


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--size", type=int, default=24)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    nets = {"psal": PSALNet(num_neighbors=4, learn_temperature=True), "conv": ConvNet()}
    for name, net in nets.items():
        start = time.perf_counter()
        loss = train(net, steps=args.steps, size=args.size, log=lambda s, n=name: print(f"[{n}] {s}"))
        print(
            f"{name}: {num_parameters(net)} parameters, held-out loss {loss:.4f} "
            f"(predicting zero: 1.0), {time.perf_counter() - start:.1f} s"
        )


if __name__ == "__main__":
    main()
