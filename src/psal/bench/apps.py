"""Image-editing benchmark: inpaint and colorize against the strongest peers that run here, and
upscale against simple baselines, in one run.

    python -m psal.bench apps [--tasks inpaint colorize upscale] [--gallery out/apps_gallery.png]

(the internal-learning network of ``upscale`` trains for about two minutes a picture and scale:
``--sr-steps`` or ``--sr-methods`` shorten it).

- inpaint: every picture of ``scenarios.EVAL_PHOTOS`` and ``EVAL_TEXTURES`` as its centred 256 x 256
  crop at its own resolution (textures reported apart from photographs), under three seeded hole
  families (``scenarios.MASK_FAMILIES``: a centred square of 25%, random blobs of 12-22%, thin
  strokes of 5%); ``--held-out`` gives other cases of the same kinds (crops half a side up and left of the centred ones, other seeds,
  the square elsewhere) to tune a method on, so that the reported cases stay unseen. Methods:
  ``psal.apps.inpaint`` and the peers of :mod:`psal.bench.peers` that
  import here (default: PyPatchMatch, Resynthesizer with GIMP's heal-selection settings, OpenCV's
  FSR and Telea). Metrics: hole PSNR and SSIM; patch-SWD (the sliced Wasserstein distance between
  the 7 x 7 patches around the hole pixels of the fill and of the truth, x 100, 256 fixed
  directions: realism, which PSNR does not see, since it rewards blur); gradient ratio (mean
  luminance gradient in the hole over the known region's, over the truth's same ratio: 1 is
  right, smooth fills score 0.2-0.6); the largest change of a known pixel; seconds. Then psal
  against each peer, paired over the cases: the share won and the mean difference with its
  bootstrap 95% interval.
- colorize: for every colour photograph, two side-by-side squares at its own resolution
  (``scenarios.colour_halves``, no pixel in common), each in turn the reference for the other
  (``L>R``: the left one colours the gray of the right one; ``R>L`` the other way). Methods: ``psal.apps.colorize``; the reference's mean
  colour (``global_transfer``); Welsh et al. 2002; Welsh followed by Levin et al. 2004's
  propagation (:mod:`psal.bench.colour_baselines`), both comparing luminances as they are (the
  stronger variant here, as for psal), and Welsh + Levin with the paper's luminance remapping. Metrics: chroma PSNR (Lab a and b, range
  256), mean CIEDE2000, colourfulness (Hasler and Suesstrunk) over the truth's.
- upscale x2, x3, x4 (issue 17's protocol): the truth is the centred 256 x 256 crop of each
  picture at its own resolution (``scenarios.sr_case``: ``SR_PHOTOS``, textures reported apart),
  cut to a multiple of the factor; the input its bicubic, antialiased downsampling. Methods:
  bicubic; back-projection alone; ``psal.apps.upscale`` (patches of the picture one scale lower,
  "patch"); the internal-learning network ``psal.apps.internal_sr`` without PSAL blocks, ZSSR's
  design ("cnn", ``--sr-steps`` training steps). Metrics: PSNR and SSIM of the luminance Y
  (BT.601), ``scale`` pixels cut off at the borders; then each method over bicubic, paired.
  ``upscale-resized``: the earlier suite of whole pictures shrunk to ``--size``.

Every method sees the same inputs; times are single calls (psal's kernels are loaded by a
warm-up call first; a peer's first call is timed as it comes). The gallery rows are input | psal | best peer (the lowest patch-SWD of the case for
inpainting, the best chroma PSNR for colorization) | truth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from psal import images
from psal.apps import scenarios
from psal.apps.metrics import (
    chroma_psnr,
    colourfulness,
    gradient_ratio,
    hole_psnr,
    hole_ssim,
    mean_delta_e,
    patch_swd,
    y_psnr,
    y_ssim,
)
from psal.bench import common, peers


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _mean(values) -> float:
    """The mean of the values that are not nan (a metric undefined on a case: a truth with no
    gradient in its hole), nan if none is."""
    values = [v for v in values if v == v]
    return statistics.mean(values) if values else float("nan")


# What each inpainting metric is, how it prints, and which way is better.
_INPAINT_METRICS: dict[str, tuple] = {
    "psnr": ("hole PSNR dB", "{:.2f}", False),
    "ssim": ("hole SSIM", "{:.3f}", False),
    "swd": ("patch-SWD x100", "{:.2f}", True),
    "gradient": ("gradient ratio", "{:.2f}", None),
    "known": ("known max change", "{:.3f}", None),
    "seconds": ("s", "{:.2f}", None),
}


def _inpaint_methods(names, seed):
    from psal.apps.inpaint import inpaint

    methods = {}
    for name in names:
        if name == "psal":
            methods[name] = lambda gt, hole: inpaint(gt, hole, generator=torch.Generator().manual_seed(seed))
        elif not peers.available(name):
            print(f"  ({name} does not import here: pip install 'psal[bench]'; its column is left out)", file=sys.stderr)
        else:
            methods[name] = peers.INPAINT[name][0]
    return methods


def _eval_cases(args):
    """``(group, picture, family, truth, hole)`` of the evaluation: crops under the hole families."""
    for group, names in (("photos", args.photos), ("textures", args.textures)):
        for name in names:
            truth = scenarios.crop(name, args.side, args.held_out)
            for family in args.families:
                yield group, name, family, truth, scenarios.eval_hole(family, name, truth.shape[-1], args.held_out)


def _resized_cases(args):
    """The earlier suite (issue 6, and issue 15's quality bar): whole pictures shrunk to 256 x 256,
    one hole of rectangles and ellipses each (``scenarios.inpaint_case``)."""
    for name in scenarios.INPAINT_PICTURES:
        yield "resized", name, "rectangles+ellipses", *scenarios.inpaint_case(name, 256)


def run_inpaint(args, gallery, cases=None):
    methods = _inpaint_methods(["psal", *args.peers], args.seed)
    records, shown, pictures = [], set(), set()
    for group, name, family, truth, hole in cases if cases is not None else _eval_cases(args):
        truth_ratio = gradient_ratio(truth, hole)
        outs = {}
        for method, fn in methods.items():
            out, sec = _timed(lambda fn=fn, truth=truth, hole=hole: fn(truth, hole))
            outs[method] = out
            known = float((out - truth).abs()[~hole.expand_as(truth)].max())
            records.append({
                "group": group, "picture": name, "family": family, "hole": float(hole.float().mean()), "method": method,
                "psnr": hole_psnr(out, truth, hole), "ssim": hole_ssim(out, truth, hole), "swd": patch_swd(out, truth, hole),
                "gradient": gradient_ratio(out, hole) / truth_ratio if truth_ratio > 0 else float("nan"), "known": known, "seconds": sec,
            })  # fmt: skip
        case = records[-len(methods) :]
        print(f"  {group} {name} {family}: patch-SWD " + ", ".join(f"{r['method']} {r['swd']:.2f}" for r in case), file=sys.stderr)
        if (group, family) not in shown and name not in pictures and len(methods) > 1:
            shown.add((group, family))  # one picture per group and family, each picture once
            pictures.add(name)
            best = min((r for r in case if r["method"] != "psal"), key=lambda r: r["swd"])["method"]
            gallery.append(
                (f"inpaint {name} {family} (psal | {best})", [scenarios.inpaint_shown(truth, hole), outs["psal"], outs[best], truth])
            )
    _inpaint_tables(records, list(methods), list(dict.fromkeys(r["family"] for r in records)))
    return records


def _paired_cells(res) -> list[str]:
    """The cases, wins and difference cells of one :func:`common.paired` result."""
    lo, hi = res["ci95"]
    return [f"{res['cases']}", f"{100 * res['wins']:.0f}%", f"{res['mean_difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"]


def _inpaint_tables(records, methods, families):
    keys = list(_INPAINT_METRICS)
    header = ["pictures", "holes", "method", *(_INPAINT_METRICS[k][0] for k in keys)]
    rows = []
    groups = list(dict.fromkeys(r["group"] for r in records))
    for group in groups:
        for family in [*families, "all"]:
            for method in methods:
                sel = [r for r in records if r["group"] == group and r["method"] == method and family in ("all", r["family"])]
                if not sel:
                    continue
                agg = {k: (max if k == "known" else _mean)([r[k] for r in sel]) for k in keys}
                rows.append(
                    [
                        f"{group} ({len({r['picture'] for r in sel})})",
                        family,
                        method,
                        *(_INPAINT_METRICS[k][1].format(agg[k]) for k in keys),
                    ]
                )
    print(common.markdown_table(header, rows))
    print(
        "\npsal against each peer, paired over the cases (wins: share of cases psal is better; difference: psal - peer, mean and 95% interval of a bootstrap over pictures)\n"
    )
    rows = []
    for group in groups:
        ours = [r for r in records if r["group"] == group and r["method"] == "psal"]
        if not ours:
            continue
        for peer in methods[1:]:
            theirs = [r for r in records if r["group"] == group and r["method"] == peer]
            for metric in ("swd", "psnr"):
                label, _, lower = _INPAINT_METRICS[metric]
                res = common.paired([r[metric] for r in ours], [r[metric] for r in theirs], lower, groups=[r["picture"] for r in ours])
                rows.append([group, peer, label, *_paired_cells(res)])
    print(common.markdown_table(["pictures", "peer", "metric", "cases", "psal wins", "difference"], rows))


def _colour_methods(seed, models_dir=None):
    from psal.apps.colorize import colorize
    from psal.bench import colour_baselines
    from psal.bench.colour_video import pair_methods

    methods = {"psal": lambda gray, ref: colorize(gray, ref, generator=torch.Generator().manual_seed(seed))}
    # the trained colour networks (issue 31), when a training run's folder or shipped weights exist
    methods.update({k: v for k, v in pair_methods(models_dir, seed).items() if k.endswith("network")})
    return methods | {
        "mean colour": colour_baselines.mean_colour,
        "welsh": partial(colour_baselines.welsh, remap=False),
        "welsh+levin": partial(colour_baselines.welsh_levin, remap=False),
        "welsh+levin, remapped": colour_baselines.welsh_levin,
    }


def run_colorize(args, gallery):
    methods = _colour_methods(args.seed, args.colour_models)
    records, rows = [], []
    for i, name in enumerate(args.colour):
        left, right = scenarios.colour_halves(name, args.side, args.held_out)
        for direction, reference, truth in (("L>R", left, right), ("R>L", right, left)):
            gray = images.grayscale(truth)
            truth_colour = colourfulness(truth)
            outs = {}
            for method, fn in methods.items():
                out, sec = _timed(lambda fn=fn, gray=gray, reference=reference: fn(gray, reference))
                outs[method] = out
                rec = {"picture": name, "direction": direction, "method": method, "chroma_psnr": chroma_psnr(out, truth),
                       "delta_e": mean_delta_e(out, truth), "colourfulness": colourfulness(out) / max(truth_colour, 1e-9), "seconds": sec}  # fmt: skip
                records.append(rec)
                rows.append(
                    [
                        f"{name} {direction}",
                        method,
                        f"{rec['chroma_psnr']:.2f}",
                        f"{rec['delta_e']:.2f}",
                        f"{rec['colourfulness']:.2f}",
                        f"{sec:.2f}",
                    ]
                )
            if i < 3 and direction == "L>R":
                case = records[-len(methods) :]
                best = max((r for r in case if r["method"] != "psal"), key=lambda r: r["chroma_psnr"])["method"]
                gallery.append((f"colorize {name} (psal | {best})", [gray, outs["psal"], outs[best], truth]))
    for method in methods:
        sel = [r for r in records if r["method"] == method]
        rows.append(
            ["mean", method, *(f"{_mean([r[k] for r in sel]):.2f}" for k in ("chroma_psnr", "delta_e", "colourfulness", "seconds"))]
        )
    print(common.markdown_table(["picture", "method", "chroma PSNR dB", "mean CIEDE2000", "colourfulness / truth", "s"], rows))
    for mine in ("psal", "psal network"):
        if mine not in methods:
            continue
        rows = []
        ours = [r for r in records if r["method"] == mine]
        for peer in (m for m in methods if m != mine):
            theirs = [r for r in records if r["method"] == peer]
            for metric, label, lower in (("chroma_psnr", "chroma PSNR dB", False), ("delta_e", "mean CIEDE2000", True)):
                res = common.paired([r[metric] for r in ours], [r[metric] for r in theirs], lower, groups=[r["picture"] for r in ours])
                rows.append([peer, label, *_paired_cells(res)])
        print(f"\n{mine} against each other method, paired over the pictures and directions\n")
        print(common.markdown_table(["baseline", "metric", "cases", f"{mine} wins", "difference"], rows))
    return records


def _sr_methods(names, steps, seed):
    from psal.apps.internal_sr import internal_upscale
    from psal.apps.upscale import back_project, enlarge, upscale

    every = {
        "bicubic": lambda low, s: enlarge(low, (low.shape[-2] * s, low.shape[-1] * s)).clamp(0, 1),
        "back-projection": lambda low, s: back_project(enlarge(low, (low.shape[-2] * s, low.shape[-1] * s)), low).clamp(0, 1),
        "patch": lambda low, s: upscale(low, s, generator=torch.Generator().manual_seed(seed)),
        "cnn": lambda low, s: internal_upscale(low, s, steps=steps, seed=seed),
        "psal-net": lambda low, s: internal_upscale(low, s, steps=steps, seed=seed, psal_blocks=1),
    }
    return {name: every[name] for name in names}


def run_upscale(args, gallery):
    """Issue 17's protocol: crops at their own resolution, bicubic antialiased downsampling,
    Y-PSNR and SSIM with ``scale`` pixels shaved, textures apart."""
    methods = _sr_methods(args.sr_methods, args.sr_steps, args.seed)
    records = []
    for scale in args.scales:
        for group, names in (("photos", args.sr_photos), ("textures", args.sr_textures)):
            for name in names:
                low, truth = scenarios.sr_case(name, scale, args.side)
                outs = {}
                for method, fn in methods.items():
                    out, sec = _timed(lambda fn=fn, low=low, scale=scale: fn(low, scale))
                    outs[method] = out
                    records.append({"group": group, "picture": name, "scale": scale, "method": method,
                                    "y_psnr": y_psnr(out, truth, scale), "y_ssim": y_ssim(out, truth, scale), "seconds": sec})  # fmt: skip
                case = records[-len(methods) :]
                print(f"  x{scale} {group} {name}: Y-PSNR " + ", ".join(f"{r['method']} {r['y_psnr']:.2f}" for r in case), file=sys.stderr)
                if scale == args.scales[0] and sum(g[0].startswith("upscale") for g in gallery) < 2:
                    # a quarter of the picture (its centre), so that the gallery shows pixels, not the whole
                    h, w = truth.shape[-2:]
                    zoom = lambda x, h=h, w=w: x[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]  # noqa: E731
                    gallery.append(
                        (f"upscale x{scale} {name}, centre ({' | '.join(outs)} | truth)", [zoom(x) for x in (*outs.values(), truth)])
                    )
    rows = []
    for scale in args.scales:
        for group in ("photos", "textures"):
            for method in methods:
                sel = [r for r in records if r["scale"] == scale and r["group"] == group and r["method"] == method]
                if sel:
                    rows.append(
                        [
                            f"x{scale}",
                            f"{group} ({len(sel)})",
                            method,
                            *(f"{_mean([r[k] for r in sel]):{f}}" for k, f in (("y_psnr", ".2f"), ("y_ssim", ".4f"), ("seconds", ".2f"))),
                        ]
                    )
    print(common.markdown_table(["scale", "pictures", "method", "Y-PSNR dB", "Y-SSIM", "s"], rows))
    if "bicubic" in methods and len(methods) > 1:
        rows = []
        for scale in args.scales:
            for group in ("photos", "textures"):
                base = [r for r in records if r["scale"] == scale and r["group"] == group and r["method"] == "bicubic"]
                for method in [m for m in methods if m != "bicubic"]:
                    ours = [r for r in records if r["scale"] == scale and r["group"] == group and r["method"] == method]
                    if ours:
                        res = common.paired(
                            [r["y_psnr"] for r in ours], [r["y_psnr"] for r in base], False, groups=[r["picture"] for r in ours]
                        )
                        rows.append([f"x{scale}", group, method, *_paired_cells(res)])
        print("\nY-PSNR over bicubic, paired over the pictures\n")
        print(common.markdown_table(["scale", "pictures", "method", "cases", "wins", "difference"], rows))
    return records


def run_upscale_resized(args, gallery):
    """The earlier suite (issue 6): whole pictures shrunk to ``--size``, psal's patch method,
    bicubic and back-projection."""
    from psal.apps.upscale import back_project, enlarge, upscale

    results = {}
    for scale in args.scales:
        rows: list = []
        per: dict[str, list] = {"psal": [], "bicubic": [], "back-projection": []}
        for name in scenarios.UPSCALE_PICTURES:
            low, truth = scenarios.upscale_case(name, args.size, scale)
            ours, sec = _timed(lambda low=low, scale=scale: upscale(low, scale, generator=torch.Generator().manual_seed(args.seed)))
            bicubic, bsec = _timed(lambda low=low, truth=truth: enlarge(low, truth.shape[-2:]).clamp(0, 1))
            bp, psec = _timed(lambda low=low, truth=truth: back_project(enlarge(low, truth.shape[-2:]), low).clamp(0, 1))
            for m, out, t in (("psal", ours, sec), ("bicubic", bicubic, bsec), ("back-projection", bp, psec)):
                per[m].append((y_psnr(out, truth, scale), t))
                rows.append([name, m, f"{per[m][-1][0]:.2f}", f"{t:.2f}"])
            if scale == args.scales[0] and sum(g[0].startswith("upscale") for g in gallery) < 2:
                gallery.append((f"upscale x{scale} " + name, [bicubic, ours, bp, truth]))
        for m, res in per.items():
            rows.append(["mean", m, f"{statistics.mean(r[0] for r in res):.2f}", f"{statistics.mean(r[1] for r in res):.2f}"])
        print(f"x{scale}:\n")
        print(common.markdown_table(["image", "method", f"Y PSNR dB (x{scale})", "s"], rows))
        results[f"x{scale}"] = per
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench apps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["inpaint", "colorize", "upscale"], choices=["inpaint", "inpaint-resized", "colorize", "upscale", "upscale-resized"],
                    help="inpaint-resized: the earlier suite of whole pictures shrunk to 256 x 256 (issue 15's quality bar)")  # fmt: skip
    ap.add_argument(
        "--photos", nargs="*", default=list(scenarios.EVAL_PHOTOS), help="inpainting photographs (crops at their own resolution)"
    )
    ap.add_argument("--textures", nargs="*", default=list(scenarios.EVAL_TEXTURES), help="inpainting textures, reported apart")
    ap.add_argument("--families", nargs="+", default=list(scenarios.MASK_FAMILIES), choices=scenarios.MASK_FAMILIES, help="hole families")
    ap.add_argument("--peers", nargs="*", default=list(peers.DEFAULT_INPAINT), choices=list(peers.INPAINT), help="inpainting peers")
    ap.add_argument("--colour", nargs="*", default=list(scenarios.EVAL_COLOUR), help="colorization photographs (reference | target halves)")
    ap.add_argument("--colour-models", help="a colour training run's folder (psal.pt, conv.pt, full.pt); default: the shipped network")
    ap.add_argument("--side", type=int, default=scenarios.EVAL_SIDE, help="side of the inpainting crops and colour halves")
    ap.add_argument("--held-out", action="store_true",
                    help="the held-out cases, to tune on (the default ones are reported): inpaint on crops half a side up and left "
                         "of the centred ones with other hole seeds; colorize upper and lower halves instead of left and right")  # fmt: skip
    ap.add_argument(
        "--sr-photos", nargs="*", default=list(scenarios.SR_PHOTOS), help="upscale: photographs (crops at their own resolution)"
    )
    ap.add_argument("--sr-textures", nargs="*", default=list(scenarios.EVAL_TEXTURES), help="upscale: textures, reported apart")
    ap.add_argument("--sr-methods", nargs="+", default=["bicubic", "back-projection", "patch", "cnn"], choices=["bicubic", "back-projection", "patch", "cnn", "psal-net"],
                    help="upscale: methods (cnn: the internal-learning network, psal.apps.internal_sr; psal-net: the same with a PSALBlock in its middle)")  # fmt: skip
    ap.add_argument("--sr-steps", type=int, default=1500, help="upscale: training steps of the internal-learning network")
    ap.add_argument("--size", type=int, default=256, help="upscale-resized: side of the truths (whole pictures resized)")
    ap.add_argument(
        "--scales", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4], help="upscaling factors (the gallery shows the first)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery", help="write the gallery PNG here (input | psal | best peer | truth per row)")
    ap.add_argument("--gallery-height", type=int, default=128, help="pixels per gallery row")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from psal.apps.inpaint import inpaint

    print(common.environment())
    warm = images.load_bundled("brick", 64)
    hole = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    hole[..., 20:40, 20:40] = True
    inpaint(warm, hole, generator=torch.Generator().manual_seed(0))  # loads the numba kernels

    gallery: list = []
    results: dict = {}
    for task in args.tasks:
        size = {"upscale-resized": args.size, "inpaint-resized": 256}.get(task, args.side)
        print(f"\n{task}, {size}x{size}\n", flush=True)
        if task == "inpaint-resized":
            results[task] = run_inpaint(args, [], _resized_cases(args))
        else:
            runs = {"inpaint": run_inpaint, "colorize": run_colorize, "upscale": run_upscale, "upscale-resized": run_upscale_resized}
            results[task] = runs[task](args, gallery)
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
