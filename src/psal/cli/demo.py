"""``make demo``: rebuild one bundled image from another image's patches.

Every pixel of the target (scikit-image's astronaut, 512 x 512) takes the colour at the centre of
its best-matching 7 x 7 patch in the source (coffee, 400 x 600), found by PatchMatch. The result
shows how far a global, full-resolution patch search gets with somebody else's pixels.

    python -m psal.cli.demo --out out [--target astronaut] [--source coffee] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import psal
from psal import images


def rebuild(target: torch.Tensor, source: torch.Tensor, *, patch_size: int, num_iters: int, seed: int):
    """The target rebuilt from the source's pixels, and the field used."""
    field = psal.patchmatch(
        target, source, patch_size=patch_size, num_neighbors=1, num_iters=num_iters,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    B, C = source.shape[:2]
    best = field.indices[:, 0, 0]  # (B, H, W) flat positions in the source
    out = source.flatten(2).gather(2, best.flatten(1)[:, None, :].expand(B, C, -1))
    return out.view(B, C, *target.shape[-2:]), field


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.cli.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out", help="folder for the PNG files (created)")
    ap.add_argument("--target", default="astronaut", choices=images.BUNDLED)
    ap.add_argument("--source", default="coffee", choices=images.BUNDLED)
    ap.add_argument("--size", type=int, default=None, help="resize the target to size x size (default: as is)")
    ap.add_argument("--patch-size", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    target = images.load_bundled(args.target, args.size)
    source = images.load_bundled(args.source)
    print(f"target {args.target} {tuple(target.shape)}, source {args.source} {tuple(source.shape)}, p = {args.patch_size}")

    t0 = time.perf_counter()
    rebuild(target[..., :16, :16], source[..., :16, :16], patch_size=args.patch_size, num_iters=1, seed=0)
    print(f"first call (loads or compiles the kernels): {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    rebuilt, field = rebuild(target, source, patch_size=args.patch_size, num_iters=args.iters, seed=args.seed)
    seconds = time.perf_counter() - t0
    pixels = target.shape[-2] * target.shape[-1]
    print(f"PatchMatch, {args.iters} iterations: {seconds:.2f} s for {pixels} query patches against {source.shape[-2] * source.shape[-1]} keys")
    print(f"PSNR of the rebuilt {args.target}: {images.psnr(rebuilt, target):.2f} dB (mean patch cost {field.costs.mean():.3f})")

    os.makedirs(args.out, exist_ok=True)
    result = os.path.join(args.out, f"{args.target}_from_{args.source}.png")
    images.save_png(rebuilt, result)
    panel = os.path.join(args.out, "demo_panel.png")
    images.save_png(images.side_by_side([target, source, rebuilt], height=256), panel)
    print(f"wrote {result} and {panel} (target | source | rebuilt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
