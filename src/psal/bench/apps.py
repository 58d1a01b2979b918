"""Image-editing benchmark: inpaint, colorize and upscale against ground truth and simple
baselines, in one run.

    python -m psal.bench apps [--size 256] [--images ...] [--gallery out/apps_gallery.png]

- inpaint: bundled images resized to S x S, a seeded hole of rectangles and ellipses (12-22% of
  the area). Methods: ``psal.apps.inpaint`` (zero-shot); the trained network shipped with psal
  (``psal.apps.inpaint_net``, "psal trained"); PyPatchMatch (pip ``pypatchmatch``, 7 x 7 patches
  like ours), when installed; scikit-image's biharmonic inpainting. Metrics: PSNR inside the hole;
  gradient ratio (mean luminance gradient magnitude in the hole over the known region's, divided by
  the same ratio of the ground truth: 1 is right, smooth fills score about 0.2-0.4); the largest
  change of a known pixel; seconds.
- colorize: the top-left and the bottom-right 5/8 crops of a colour image, at S x S; the
  reference is the first, the target the second in grayscale. Methods: ``psal.apps.colorize``
  and a global transfer (Reinhard et al.'s mean and spread in Lab). Metric: PSNR of the a and b
  channels (range 256) against the true colours.
- upscale x2, x3, x4: the image at S x S (cropped to a multiple of the factor) is the truth, its
  bicubic downsampling the input. Methods: ``psal.apps.upscale``, bicubic, back-projection alone.
  Metric: PSNR of the luminance Y (BT.601), ``scale`` pixels cropped at the borders.

Every method sees the same inputs; times are single calls after one warm-up call (numba loads its
kernels). The gallery rows are input | psal | best baseline | truth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from psal.apps import scenarios
from psal.apps.inpaint_net import PRETRAINED_PATH
from psal.apps.metrics import chroma_psnr, gradient_ratio, hole_psnr, y_psnr
from psal.bench import common


def _pypatchmatch(img, hole):
    from patchmatch import patch_match

    patch_match.set_random_seed(0)
    arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = patch_match.inpaint(arr, mask=hole[0, 0].numpy().astype(np.uint8) * 255, patch_size=3)
    return torch.from_numpy(out).permute(2, 0, 1)[None].float() / 255


def _trained(model):
    from psal.apps.inpaint_net import inpaint_with_model

    def run(img, hole):
        return inpaint_with_model(img, hole, model, seed=0)

    return run


def _biharmonic(img, hole):
    from skimage.restoration import inpaint_biharmonic

    arr = img[0].permute(1, 2, 0).numpy().astype(np.float64)
    out = inpaint_biharmonic(arr, hole[0, 0].numpy(), channel_axis=-1)
    return torch.from_numpy(out).permute(2, 0, 1)[None].float().clamp(0, 1)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _has_pypatchmatch() -> bool:
    try:
        from patchmatch import patch_match  # noqa: F401
    except Exception:  # its import may fail for reasons of its own (a missing shared library)
        return False
    return True


def run_inpaint(args, gallery):
    from psal.apps.inpaint import inpaint

    methods = {"psal": lambda gt, hole: inpaint(gt, hole, generator=torch.Generator().manual_seed(args.seed))}
    if os.path.isfile(PRETRAINED_PATH):
        from psal.apps.inpaint_net import load_pretrained

        methods["psal trained"] = _trained(load_pretrained())
    if _has_pypatchmatch():
        methods["pypatchmatch"] = _pypatchmatch
    else:
        print("  (pypatchmatch is not installed: pip install pypatchmatch; its column is left out)", file=sys.stderr)
    methods["biharmonic"] = _biharmonic
    rows, per = [], {m: [] for m in methods}
    for name in args.images or scenarios.INPAINT_PICTURES:
        gt, hole = scenarios.inpaint_case(name, args.size)
        truth_ratio = gradient_ratio(gt, hole)
        outs = {}
        for m, fn in methods.items():
            out, sec = _timed(lambda fn=fn: fn(gt, hole))
            outs[m] = out
            known = float((out - gt).abs()[~hole.expand_as(gt)].max())
            res = (hole_psnr(out, gt, hole), gradient_ratio(out, hole) / truth_ratio, known, sec)
            per[m].append(res)
            rows.append([name, f"{100 * float(hole.float().mean()):.1f}", m, f"{res[0]:.2f}", f"{res[1]:.2f}", f"{res[2]:.3f}", f"{res[3]:.2f}"])
        other = outs.get("pypatchmatch", outs["biharmonic"])
        gallery.append(("inpaint " + name, [scenarios.inpaint_shown(gt, hole), outs["psal"], other, gt]))
    for m, res in per.items():
        rows.append(["mean", "", m, *(f"{statistics.mean(r[i] for r in res):.2f}" for i in range(2)), f"{max(r[2] for r in res):.3f}", f"{statistics.mean(r[3] for r in res):.2f}"])
    print(common.markdown_table(["image", "hole %", "method", "hole PSNR dB", "gradient ratio", "known max change", "s"], rows))
    return {m: [list(r) for r in res] for m, res in per.items()}


def run_colorize(args, gallery):
    from psal.apps.colorize import colorize, global_transfer

    rows, per = [], {"psal": [], "global transfer": []}
    for name in scenarios.COLOUR_PICTURES:
        gray, reference, truth = scenarios.colorize_case(name, args.size)
        ours, sec = _timed(lambda: colorize(gray, reference, generator=torch.Generator().manual_seed(args.seed)))
        base, bsec = _timed(lambda: global_transfer(gray, reference))
        for m, out, t in (("psal", ours, sec), ("global transfer", base, bsec)):
            per[m].append((chroma_psnr(out, truth), t))
            rows.append([name, m, f"{per[m][-1][0]:.2f}", f"{t:.2f}"])
        gallery.append(("colorize " + name, [gray, ours, base, truth]))
    for m, res in per.items():
        rows.append(["mean", m, f"{statistics.mean(r[0] for r in res):.2f}", f"{statistics.mean(r[1] for r in res):.2f}"])
    print(common.markdown_table(["image", "method", "chroma PSNR dB", "s"], rows))
    return per


def run_upscale(args, gallery):
    from psal.apps.upscale import back_project, enlarge, upscale

    results = {}
    for scale in args.scales:
        rows, per = [], {"psal": [], "bicubic": [], "back-projection": []}
        for name in scenarios.UPSCALE_PICTURES:
            low, truth = scenarios.upscale_case(name, args.size, scale)
            ours, sec = _timed(lambda: upscale(low, scale, generator=torch.Generator().manual_seed(args.seed)))
            bicubic, bsec = _timed(lambda: enlarge(low, truth.shape[-2:]).clamp(0, 1))
            bp, psec = _timed(lambda: back_project(enlarge(low, truth.shape[-2:]), low).clamp(0, 1))
            for m, out, t in (("psal", ours, sec), ("bicubic", bicubic, bsec), ("back-projection", bp, psec)):
                per[m].append((y_psnr(out, truth, scale), t))
                rows.append([name, m, f"{per[m][-1][0]:.2f}", f"{t:.2f}"])
            if scale == args.scales[0]:
                gallery.append((f"upscale x{scale} " + name, [bicubic, ours, bp, truth]))
        for m, res in per.items():
            rows.append(["mean", m, f"{statistics.mean(r[0] for r in res):.2f}", f"{statistics.mean(r[1] for r in res):.2f}"])
        print(f"x{scale}:\n")
        print(common.markdown_table(["image", "method", f"Y PSNR dB (x{scale})", "s"], rows))
        results[f"x{scale}"] = per
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench apps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", nargs="*", help=f"inpainting images (default: {', '.join(scenarios.INPAINT_PICTURES)})")
    ap.add_argument("--tasks", nargs="+", default=["inpaint", "colorize", "upscale"], choices=["inpaint", "colorize", "upscale"])
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4], help="upscaling factors (the gallery shows the first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery", help="write the gallery PNG here (input | psal | baseline | truth per row)")
    ap.add_argument("--gallery-height", type=int, default=128, help="pixels per gallery row")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from psal import images
    from psal.apps.inpaint import inpaint

    print(common.environment())
    warm = images.load_bundled("brick", 64)
    hole = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    hole[..., 20:40, 20:40] = True
    inpaint(warm, hole, generator=torch.Generator().manual_seed(0))  # loads the numba kernels

    gallery, results = [], {}
    for task in args.tasks:
        print(f"\n{task}, {args.size}x{args.size}\n", flush=True)
        results[task] = {"inpaint": run_inpaint, "colorize": run_colorize, "upscale": run_upscale}[task](args, gallery)
    if args.gallery:
        rows = [images.side_by_side(pics, height=args.gallery_height) for _, pics in gallery]
        width = max(r.shape[-1] for r in rows)
        rows = [F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
        gap = torch.ones(1, 3, 6, width)
        images.save_png(torch.cat([t for r in rows for t in (r, gap)][:-1], dim=2), args.gallery)
        print(f"\ngallery ({', '.join(name for name, _ in gallery)}): {args.gallery}")
    common.write_json(args.json, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
