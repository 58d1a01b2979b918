"""Inpainting at the size of photographs: time, peak memory and hole PSNR, in one run.

    python -m psal.bench photos [--pictures astronaut hubble_deep_field retina] [--modes dense sparse]

Each picture keeps its own size (``--longest`` shrinks it) and gets one seeded object-removal hole:
an ellipse of about 3% of the area plus a thin stroke. ``psal.apps.inpaint`` runs once per
(picture, mode) in a fresh process after a tiny warm-up call (numba loads its kernels); peak
memory is that process's maximum resident set, imports included. ``sparse`` is the default path
(only the pixels whose patch meets the hole are searched and voted, when they are at most a fifth
of the picture); ``dense`` forces the search and the votes over every pixel, as before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from psal.bench import common

PICTURES = ("astronaut", "hubble_deep_field", "retina")

_CHILD = r"""
import json, resource, sys, time, torch
from psal import images
from psal.apps import inpaint as module
from psal.bench.photos import object_hole
name, longest, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
img = images.load_bundled(name, longest=longest or None)
hole = object_hole(*img.shape[-2:])
if mode == "dense":
    module._SPARSE_BELOW = 0.0
module.inpaint(images.load_bundled("brick", 64), object_hole(64, 64), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
out = module.inpaint(img, hole, generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - t
psnr = float(10 * torch.log10(1 / (out - img)[hole.expand_as(img)].square().mean().clamp_min(1e-12)))
H, W = img.shape[-2:]
print(json.dumps(dict(picture=name, width=W, height=H, hole=float(hole.float().mean()), mode=mode, seconds=seconds,
                      peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hole_psnr_db=psnr)))
"""


def object_hole(H: int, W: int):
    """``(1, 1, H, W)`` bool: an ellipse of about 3% of the area and a thin diagonal stroke."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    s = min(H, W)
    hole = ((yy - H * 0.4) / (s * 0.12)) ** 2 + ((xx - W * 0.6) / (s * 0.08)) ** 2 <= 1
    stroke = ((yy - H * 0.3 - (xx - W * 0.1) * 0.5 * H / W).abs() < max(s * 0.006, 0.5)) & (xx > W * 0.1) & (xx < W * 0.7)
    return (hole | stroke)[None, None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench photos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pictures", nargs="+", default=list(PICTURES), help=f"bundled pictures (default: {', '.join(PICTURES)})")
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    ap.add_argument("--longest", type=int, default=0, help="shrink each picture to this longer side (0: its own size)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    print(common.environment())
    print("\ninpaint, one object-removal hole (ellipse + stroke), seed 0; one process per row\n", flush=True)
    rows, records = [], []
    for name in args.pictures:
        for mode in args.modes:
            proc = subprocess.run([sys.executable, "-c", _CHILD, name, str(args.longest), mode], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {name} {mode}: failed ({(proc.stderr.strip().splitlines() or ['?'])[-1]})", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            records.append(r)
            rows.append([
                name, f"{r['width']} x {r['height']}", f"{r['width'] * r['height'] / 1e6:.2f}", f"{100 * r['hole']:.1f}",
                mode, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{r['hole_psnr_db']:.2f}",
            ])  # fmt: skip
    print(common.markdown_table(["picture", "size", "MP", "hole %", "mode", "s", "peak MiB", "hole PSNR dB"], rows))
    common.write_json(args.json, args, records)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
