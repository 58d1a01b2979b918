"""Inpainting at the size of photographs, against PyPatchMatch: time, peak memory and hole PSNR.

    python -m psal.bench photos [--pictures astronaut hubble_deep_field retina retina@2]
                                [--holes object large] [--methods psal pypatchmatch]
                                [--colorize retina retina@2.45] [--upscale hubble_deep_field@0.8 retina]

A picture is a bundled one at its own size (``--longest`` shrinks it), or ``name@f``: enlarged by
``f`` (bilinear), for the sizes of phone pictures (``retina@2`` is 8 MP, ``retina@2.45`` 12 MP;
an enlarged picture has less detail per pixel than a photograph of that size). Holes, seeded:

- ``object``: an ellipse of about 3% of the area plus a thin stroke, the way people remove objects;
- ``large``: two ellipses and a rectangle, about 20% of the area.

Each (picture, hole, method) runs in a fresh process after a tiny warm-up call (numba loads its
kernels); peak memory is that process's maximum resident set (torch is imported in every one).
Methods: ``psal`` (``psal.apps.inpaint`` with its defaults: 5 x 5 patches, sparse queries around
the hole), ``psal-dense`` (the same, every pixel searched and voted, as before sparse queries), and
``pypatchmatch`` (pip ``pypatchmatch`` as ``psal.bench.peers`` runs it: ``patch_match.inpaint`` with
``patch_size=4``, patches 2 * 4 + 1 = 9 wide), when installed. The ``vs PyPatchMatch`` column is the time
ratio in the same run.

``--colorize TARGET ...``: ``psal.apps.colorize`` of each target picture, in grayscale, from the
colour ``--reference`` (``retina``, 2 MP, by default), with its defaults (chroma at a working size
of about 1 MP above that); time and peak memory, one process each. ``--upscale PICTURE ...``:
``psal.apps.upscale`` x2 of each picture with its defaults (matching in bands of about 1 MP of
output); time and peak memory, one process each.
"""

from __future__ import annotations

import argparse
import sys

from psal.bench import common, peers

PICTURES = ("astronaut", "hubble_deep_field", "retina")
METHODS = ("psal", "psal-dense", "pypatchmatch")

_CHILD = r"""
import json, resource, sys, time, torch
from psal.bench.photos import picture, make_hole
spec, longest, kind, method = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
img = picture(spec, longest)
hole = make_hole(kind, *img.shape[-2:])
if method.startswith("psal"):
    from psal.apps import inpaint as module
    if method == "psal-dense":
        module._SPARSE_BELOW = 0.0
    module.inpaint(picture("astronaut", 64), make_hole(kind, 64, 64), generator=torch.Generator().manual_seed(0))
    run = lambda: module.inpaint(img, hole, generator=torch.Generator().manual_seed(0))
else:
    from psal.bench.peers import pypatchmatch
    run = lambda: pypatchmatch(img, hole)
t = time.perf_counter()
out = run()
seconds = time.perf_counter() - t
psnr = float(10 * torch.log10(1 / (out - img)[hole.expand_as(img)].square().mean().clamp_min(1e-12)))
H, W = img.shape[-2:]
print(json.dumps(dict(picture=spec, width=W, height=H, hole_kind=kind, hole=float(hole.float().mean()), method=method,
                      seconds=seconds, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hole_psnr_db=psnr)))
"""


_COLORIZE_CHILD = r"""
import json, resource, sys, time, torch
from psal import images
from psal.apps.colorize import colorize
from psal.bench.photos import picture
target, reference = images.grayscale(picture(sys.argv[1])), picture(sys.argv[2])
colorize(target[..., :48, :48], reference[..., :48, :48])
t = time.perf_counter()
colorize(target, reference, generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - t
H, W = target.shape[-2:]
print(json.dumps(dict(task="colorize", picture=sys.argv[1], reference=sys.argv[2], width=W, height=H, seconds=seconds,
                      peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


_UPSCALE_CHILD = r"""
import json, resource, sys, time, torch
from psal.apps.upscale import upscale
from psal.bench.photos import picture
image = picture(sys.argv[1])
upscale(image[..., :32, :32], 2)
t = time.perf_counter()
upscale(image, 2, generator=torch.Generator().manual_seed(0))
seconds = time.perf_counter() - t
H, W = image.shape[-2:]
print(json.dumps(dict(task="upscale", picture=sys.argv[1], width=W, height=H, scale=2, seconds=seconds,
                      peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def picture(spec: str, longest: int = 0):
    """``name`` or ``name@factor`` (enlarged, bilinear) -> ``Tensor[1, 3, H, W]`` in ``[0, 1]``."""
    from psal import images

    name, _, factor = spec.partition("@")
    img = images.load_bundled(name, longest=longest or None)
    if factor:
        f = float(factor)
        img = images.resize(img, (round(img.shape[-2] * f), round(img.shape[-1] * f)))
    return img


def object_hole(H: int, W: int):
    """``(1, 1, H, W)`` bool: an ellipse of about 3% of the area and a thin diagonal stroke."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    s = min(H, W)
    hole = ((yy - H * 0.4) / (s * 0.12)) ** 2 + ((xx - W * 0.6) / (s * 0.08)) ** 2 <= 1
    stroke = ((yy - H * 0.3 - (xx - W * 0.1) * 0.5 * H / W).abs() < max(s * 0.006, 0.5)) & (xx > W * 0.1) & (xx < W * 0.7)
    return (hole | stroke)[None, None]


def large_hole(H: int, W: int):
    """``(1, 1, H, W)`` bool: two ellipses and a rectangle, about 20% of the area."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    y, x = yy / H, xx / W
    a = ((y - 0.35) / 0.2) ** 2 + ((x - 0.3) / 0.16) ** 2 <= 1
    b = ((y - 0.7) / 0.14) ** 2 + ((x - 0.72) / 0.18) ** 2 <= 1
    c = (y > 0.15) & (y < 0.3) & (x > 0.55) & (x < 0.9)
    return (a | b | c)[None, None]


def make_hole(kind: str, H: int, W: int):
    return {"object": object_hole, "large": large_hole}[kind](H, W)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench photos", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--pictures", nargs="+", default=list(PICTURES), help=f"bundled pictures, name or name@factor (default: {', '.join(PICTURES)})"
    )
    ap.add_argument("--holes", nargs="*", default=["object"], choices=["object", "large"], help="hole kinds (none: no inpainting)")
    ap.add_argument("--methods", nargs="+", default=["psal", "pypatchmatch"], choices=METHODS)
    ap.add_argument("--longest", type=int, default=0, help="shrink each picture to this longer side first (0: its own size)")
    ap.add_argument("--colorize", nargs="*", default=[], metavar="TARGET", help="also colorize these pictures (name or name@factor)")
    ap.add_argument("--reference", default="retina", help="the colour reference of --colorize (default: retina)")
    ap.add_argument("--upscale", nargs="*", default=[], metavar="PICTURE", help="also upscale these pictures x2 (name or name@factor)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    methods = list(args.methods)
    if "pypatchmatch" in methods and not peers.available("pypatchmatch"):
        print("  (pypatchmatch does not import: pip install pypatchmatch, with libopencv-dev; its rows are left out)", file=sys.stderr)
        methods.remove("pypatchmatch")
    print(common.environment())
    print("\ninpaint at photograph sizes, seed 0; one process per row\n", flush=True)
    rows, records = [], []
    for spec in args.pictures if args.holes else []:
        for kind in args.holes:
            ours = {}
            for method in methods:
                r = common.run_script(_CHILD, [spec, str(args.longest), kind, method], f"{spec} {kind} {method}")
                if r is None:
                    continue
                records.append(r)
                ours[method] = r
            peer = ours.get("pypatchmatch")
            for method, r in ours.items():
                ratio = f"{r['seconds'] / peer['seconds']:.2f}" if peer and method != "pypatchmatch" else ""
                rows.append([
                    spec, f"{r['width']} x {r['height']}", f"{r['width'] * r['height'] / 1e6:.2f}", f"{100 * r['hole']:.1f}",
                    method, f"{r['seconds']:.1f}", ratio, f"{r['peak_mib']:.0f}", f"{r['hole_psnr_db']:.2f}",
                ])  # fmt: skip
    if rows:
        print(
            common.markdown_table(["picture", "size", "MP", "hole %", "method", "s", "vs PyPatchMatch", "peak MiB", "hole PSNR dB"], rows)
        )
    colour_rows = []
    for spec in args.colorize:
        r = common.run_script(_COLORIZE_CHILD, [spec, args.reference], f"colorize {spec}")
        if r is None:
            continue
        records.append(r)
        colour_rows.append(
            [
                spec,
                f"{r['width']} x {r['height']}",
                f"{r['width'] * r['height'] / 1e6:.2f}",
                r["reference"],
                f"{r['seconds']:.1f}",
                f"{r['peak_mib']:.0f}",
            ]
        )
    if colour_rows:
        print("\ncolorize (grayscale target from a colour reference), seed 0; one process per row\n")
        print(common.markdown_table(["target", "size", "MP", "reference", "s", "peak MiB"], colour_rows))
    up_rows = []
    for spec in args.upscale:
        r = common.run_script(_UPSCALE_CHILD, [spec], f"upscale {spec}")
        if r is None:
            continue
        records.append(r)
        up_rows.append([spec, f"{r['width']} x {r['height']}", f"{r['width'] * r['height'] / 1e6:.2f}",
                        f"{4 * r['width'] * r['height'] / 1e6:.2f}", f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}"])  # fmt: skip
    if up_rows:
        print("\nupscale x2, seed 0; one process per row\n")
        print(common.markdown_table(["picture", "size", "MP", "output MP", "s", "peak MiB"], up_rows))
    common.write_json(args.json, args, records)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
