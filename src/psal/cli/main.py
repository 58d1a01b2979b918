"""The ``psal`` command: image editing with patch-based stochastic attention, on your own files.

    psal reconstruct QUERY SOURCE -o OUT     rebuild QUERY from the patches of SOURCE
    psal inpaint IMAGE MASK -o OUT           fill the white region of MASK
    psal colorize GRAY REFERENCE -o OUT      colour GRAY like the colour image REFERENCE
    psal upscale IMAGE --scale 2 -o OUT      super-resolution from the image's own patches
    psal demo [--out out]                    all four on bundled pictures: gallery and metrics

Every subcommand reads ordinary image files (8/16-bit grayscale or RGB, opaque RGBA), writes its
result atomically (a temporary file renamed into place) and never onto an input, takes ``--seed``
and ``--device``, shows progress on stderr, and with ``--report FILE.json`` writes the metrics it
computed. Any problem is one line on stderr and a non-zero exit (2 for bad input, 1 otherwise);
set ``PSAL_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .io import (
    BYTES_PER_PIXEL,
    CLIError,
    available_memory,
    check_output,
    read_image,
    read_image_bits,
    write_image,
)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: unknown device {name!r}; use cpu, cuda or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def _progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr (nothing with ``--quiet`` or without tqdm)."""
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, leave=False)


def _steps(desc: str, quiet: bool):
    """``(bar, progress)``: a bar as :func:`_progress` gives (or None) and a ``progress(done,
    total)`` callback for the apps that moves it."""
    bar = _progress(0, desc, quiet)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    return bar, progress


def _same_channels(a: torch.Tensor, b: torch.Tensor):
    """Grayscale beside colour: the grayscale one is repeated over three channels."""
    if a.shape[1] == b.shape[1]:
        return a, b
    return a.expand(1, 3, *a.shape[-2:]), b.expand(1, 3, *b.shape[-2:])


def cmd_reconstruct(args) -> dict:
    """Every pixel of QUERY takes the colour that the best-matching patches of SOURCE give it."""
    import psal
    from psal import images

    check_output(args.out, [args.query, args.source])
    query, bits = read_image_bits(args.query, "query")
    source = read_image(args.source, "source")
    query, source = _same_channels(query, source)
    device = _device(args.device)
    query, source = query.to(device), source.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    bar = _progress(args.iters, "search", args.quiet)
    field = psal.patchmatch(query, source, patch_size=args.patch_size, num_neighbors=args.k, num_iters=0, generator=gen)
    for _ in range(args.iters):  # one iteration per call, so that progress shows
        field = psal.patchmatch(
            query, source, patch_size=args.patch_size, num_neighbors=args.k, num_iters=1, init=field, generator=gen
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    # Temperature: a tenth of the median best cost, so that clearly worse matches weigh little.
    temperature = float(field.costs[:, :, 0].median().clamp_min(1e-6)) * args.temperature_scale
    out = psal.attend(
        query, source, source, field.indices, patch_size=args.patch_size, temperature=temperature,
        aggregation=args.aggregation,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    write_image(out, args.out, bits)
    return {
        "command": "reconstruct",
        "output": args.out,
        "size": list(query.shape[-2:]),
        "psnr_vs_query_db": images.psnr(out.cpu(), query.cpu()),
        "mean_best_patch_cost": float(field.costs[:, :, 0].mean()),
        "seconds": seconds,
    }


def cmd_colorize(args) -> dict:
    """Colour a grayscale image like a colour reference: its luminance is kept, the chroma comes
    from the reference patches that match it best."""
    from psal.apps.colorize import colorize

    check_output(args.out, [args.gray, args.reference])
    gray = read_image(args.gray, "gray image")
    reference = read_image(args.reference, "reference")
    if reference.shape[1] != 3:
        raise CLIError(f"reference {args.reference!r} is grayscale; colorize needs a colour reference")
    device = _device(args.device)
    t0 = time.perf_counter()
    out = colorize(
        gray.to(device), reference.to(device), patch_size=args.patch_size, num_neighbors=args.k,
        num_iters=args.iters, temperature_scale=args.temperature_scale, match_luminance=args.match_luminance,
        generator=torch.Generator(device=device).manual_seed(args.seed),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    write_image(out, args.out)
    return {"command": "colorize", "output": args.out, "size": list(gray.shape[-2:]), "seconds": seconds}


def cmd_inpaint(args) -> dict:
    """Fill the white region of MASK in IMAGE with patches of the rest of the image (coarse to
    fine, masked self-attention and patch voting); the other pixels are kept exactly."""
    from psal.apps.inpaint import inpaint
    from psal.apps.inpaint_net import PRETRAINED_PATH

    check_output(args.out, [args.image, args.mask] + ([args.checkpoint] if args.checkpoint else []))
    image, bits = read_image_bits(args.image, "image")
    mask_image = read_image(args.mask, "mask")
    if mask_image.shape[-2:] != image.shape[-2:]:
        raise CLIError(
            f"mask {args.mask!r} is {mask_image.shape[-1]}x{mask_image.shape[-2]}, "
            f"image {args.image!r} is {image.shape[-1]}x{image.shape[-2]}; they must be the same size"
        )
    hole = mask_image.mean(1, keepdim=True) > 0.5  # white (or light) = hole
    if not hole.any():
        raise CLIError(f"mask {args.mask!r} has no white pixel: nothing to fill")
    if hole.all():
        raise CLIError(f"mask {args.mask!r} is white everywhere: no known pixel to copy from")
    device = _device(args.device)
    t0 = time.perf_counter()
    if args.model or args.checkpoint:
        model_path = args.checkpoint or PRETRAINED_PATH
        out = _fill_with_model(model_path, image, hole, device, args.seed)
    else:
        model_path = None
        bar, progress = _steps("inpaint", args.quiet)
        try:
            out = inpaint(
                image.to(device), hole.to(device), patch_size=args.patch_size, num_iters=args.iters,
                generator=torch.Generator(device=device).manual_seed(args.seed), progress=progress,
            )  # fmt: skip
        finally:  # also on Ctrl-C or an error: the bar's line is cleared before the message
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - t0
    write_image(out, args.out, bits)
    report = {
        "command": "inpaint",
        "output": args.out,
        "size": list(image.shape[-2:]),
        "hole_fraction": float(hole.float().mean()),
        "seconds": seconds,
    }
    if model_path is not None:
        report["model"] = model_path
    return report


def _fill_with_model(path, image, hole, device, seed):
    """``psal inpaint --model``/``--checkpoint``: one pass of the trained network."""
    from psal.apps.inpaint_net import inpaint_with_model, load_pretrained

    if not os.path.isfile(path):
        raise CLIError(f"checkpoint {path!r}: no such file")
    try:
        model = load_pretrained(path, map_location=device)
    except Exception as exc:  # torch.load and load_state_dict raise many kinds on a wrong file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"checkpoint {path!r}: not an inpainting checkpoint of psal ({first[:160]})") from None
    return inpaint_with_model(image.to(device), hole.to(device), model.to(device), seed=seed)


def cmd_upscale(args) -> dict:
    """Enlarge an image 2, 3 or 4 times with detail borrowed from its own patches at a lower scale,
    then back-projected so that shrinking the result gives back the input."""
    from psal.apps.upscale import downsample, upscale

    check_output(args.out, [args.image])
    image, bits = read_image_bits(args.image, "image")
    H, W = image.shape[-2:]
    free = available_memory()
    if free is not None and H * W * args.scale**2 * BYTES_PER_PIXEL > free:
        raise CLIError(f"image {args.image!r}: {W}x{H} enlarged {args.scale}x does not fit in the memory available; resize it first")
    device = _device(args.device)
    t0 = time.perf_counter()
    bar, progress = _steps("upscale", args.quiet)
    try:
        out = upscale(
            image.to(device), args.scale, patch_size=args.patch_size, num_neighbors=args.k, num_iters=args.iters,
            strength=args.strength, generator=torch.Generator(device=device).manual_seed(args.seed), progress=progress,
        )  # fmt: skip
    finally:  # also on Ctrl-C or an error: the bar's line is cleared before the message
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    write_image(out, args.out, bits)
    consistency = float((downsample(out, args.scale) - image.to(out)).abs().mean())
    return {
        "command": "upscale",
        "output": args.out,
        "size": [H * args.scale, W * args.scale],
        "mean_abs_error_after_shrinking": consistency,
        "seconds": seconds,
    }


def cmd_demo(args) -> dict:
    """All four tasks on scikit-image's bundled pictures, with generated holes and degradations:
    writes each result, a gallery (input | result | truth per task) and the metrics."""
    import psal
    from psal import images
    from psal.apps import scenarios
    from psal.apps.colorize import colorize
    from psal.apps.inpaint import inpaint
    from psal.apps.metrics import chroma_psnr, gradient_ratio, hole_psnr, y_psnr
    from psal.apps.upscale import enlarge, upscale

    try:
        images.load_bundled("brick", 8)
    except ImportError as exc:
        raise CLIError(f"the demo needs scikit-image's bundled pictures: {exc}") from None
    os.makedirs(args.out, exist_ok=True)
    device = _device(args.device)
    size = args.size

    def gen():
        return torch.Generator(device=device).manual_seed(args.seed)

    def to(*tensors):
        return [t.to(device) for t in tensors]

    rows, metrics = [], {}
    bar = _progress(4, "demo", args.quiet)
    t0 = time.perf_counter()
    for name in scenarios.DEMO["inpaint"]:
        truth, hole = to(*scenarios.inpaint_case(name, size))
        out = inpaint(truth, hole, generator=gen())
        metrics[f"inpaint_{name}"] = {
            "hole_fraction": float(hole.float().mean()),
            "hole_psnr_db": hole_psnr(out, truth, hole),
            "gradient_ratio_vs_truth": gradient_ratio(out, hole) / gradient_ratio(truth, hole),
        }
        rows.append((f"inpaint_{name}", [scenarios.inpaint_shown(truth, hole), out, truth]))
    if bar is not None:
        bar.update()
    for name in scenarios.DEMO["colorize"]:
        gray, reference, truth = to(*scenarios.colorize_case(name, size))
        out = colorize(gray, reference, generator=gen())
        metrics[f"colorize_{name}"] = {"chroma_psnr_db": chroma_psnr(out, truth)}
        rows.append((f"colorize_{name}", [gray, out, truth]))
    if bar is not None:
        bar.update()
    for name, scale in scenarios.DEMO["upscale"]:
        low, truth = to(*scenarios.upscale_case(name, size, scale))
        out = upscale(low, scale, generator=gen())
        bicubic = enlarge(low, truth.shape[-2:])
        metrics[f"upscale_{name}_x{scale}"] = {"y_psnr_db": y_psnr(out, truth, scale), "bicubic_y_psnr_db": y_psnr(bicubic, truth, scale)}
        rows.append((f"upscale_{name}_x{scale}", [bicubic.clamp(0, 1), out, truth]))
    if bar is not None:
        bar.update()
    for target_name, source_name in scenarios.DEMO["reconstruct"]:
        target, source = to(*scenarios.reconstruct_case(target_name, source_name, size))
        field = psal.patchmatch(target, source, patch_size=7, generator=gen())
        out = psal.attend(target, source, source, field.indices, patch_size=7, aggregation="center")
        metrics[f"reconstruct_{target_name}_from_{source_name}"] = {"psnr_db": images.psnr(out.cpu(), target.cpu())}
        rows.append((f"reconstruct_{target_name}_from_{source_name}", [source, out, target]))
    if bar is not None:
        bar.update()
        bar.close()
    seconds = time.perf_counter() - t0
    for name, (_, result, _) in rows:
        write_image(result, os.path.join(args.out, f"{name}.png"))
    gallery = [images.side_by_side([p.cpu() for p in pics], height=size) for _, pics in rows]
    gap = torch.ones(1, 3, 6, gallery[0].shape[-1])
    write_image(torch.cat([t for row in gallery for t in (row, gap)][:-1], dim=2), os.path.join(args.out, "demo_gallery.png"))
    table = "\n".join(f"{task:36s} " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) for task, m in metrics.items())
    print(table, file=sys.stderr if args.quiet else sys.stdout)
    report = {"command": "demo", "output": args.out, "seconds": seconds, "metrics": metrics}
    images.write_json(os.path.join(args.out, "demo_metrics.json"), report)
    return report


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="psal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, out: bool = True):
        if out:
            p.add_argument("-o", "--out", required=True, help="output image (.png, .jpg, .tif, .bmp, .webp)")
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
        p.add_argument("--report", metavar="FILE.json", help="write the metrics computed to this JSON file")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("reconstruct", help="rebuild an image from another image's patches", description=cmd_reconstruct.__doc__)
    p.add_argument("query", help="the image to rebuild")
    p.add_argument("source", help="the image whose patches are used")
    common(p)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--k", type=int, default=1, help="matches per pixel")
    p.add_argument("--iters", type=int, default=5, help="PatchMatch iterations")
    p.add_argument("--aggregation", choices=["center", "patch", "patch_mean"], default="center")
    p.add_argument("--temperature-scale", type=float, default=0.1, help="temperature / median best patch cost")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("demo", help="all four tasks on bundled pictures: results, gallery, metrics", description=cmd_demo.__doc__)
    p.add_argument("--out", default="out", help="folder for the pictures and demo_metrics.json (created)")
    p.add_argument("--size", type=int, default=256, help="side of the square test pictures")
    common(p, out=False)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("inpaint", help="fill the white region of a mask", description=cmd_inpaint.__doc__)
    p.add_argument("image", help="the image to repair")
    p.add_argument("mask", help="same size as IMAGE; white marks the pixels to fill")
    common(p)
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="search and vote rounds per scale, at most")
    p.add_argument("--model", action="store_true", help="use the trained network shipped with psal instead of the zero-shot patch method")
    p.add_argument("--checkpoint", help="with the network of this checkpoint (python -m psal.examples.train_inpainting) instead")
    p.set_defaults(run=cmd_inpaint)

    p = sub.add_parser("colorize", help="colour a grayscale image like a colour reference", description=cmd_colorize.__doc__)
    p.add_argument("gray", help="the image to colour (a colour image is read for its luminance)")
    p.add_argument("reference", help="a colour image of similar content")
    common(p)
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--k", type=int, default=4, help="matches per pixel")
    p.add_argument("--iters", type=int, default=6, help="PatchMatch iterations")
    p.add_argument("--temperature-scale", type=float, default=0.5, help="temperature / median best patch cost")
    p.add_argument("--match-luminance", action="store_true",
                   help="move the reference's brightness and contrast to the gray image's first (for a reference taken in other light)")
    p.set_defaults(run=cmd_colorize)

    p = sub.add_parser("upscale", help="super-resolution from the image's own patches", description=cmd_upscale.__doc__)
    p.add_argument("image", help="the image to enlarge")
    p.add_argument("--scale", type=int, choices=[2, 3, 4], default=2)
    common(p)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--k", type=int, default=2, help="matches per pixel")
    p.add_argument("--iters", type=int, default=3, help="PatchMatch iterations")
    p.add_argument("--strength", type=float, default=0.5, help="how much of the borrowed detail is added")
    p.set_defaults(run=cmd_upscale)
    return ap


def _paths(args) -> list[str]:
    """The command's input and output paths."""
    return [getattr(args, name) for name in ("out", "query", "source", "image", "mask", "gray", "reference") if getattr(args, name, None)]


def _version() -> str:
    from psal import __version__

    return f"psal {__version__}"


def _write_report(path: str, report: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"--report {path!r}: folder {folder!r} does not exist")
    from psal.images import write_json

    write_json(path, report)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help(sys.stderr)
        return 2
    debug = os.environ.get("PSAL_DEBUG", "") not in ("", "0")
    try:
        if args.report and os.path.abspath(args.report) in {os.path.abspath(p) for p in _paths(args)}:
            raise CLIError(f"--report {args.report!r} is also the output or an input; choose another path")
        report = args.run(args)
        if args.report:
            _write_report(args.report, report)
    except KeyboardInterrupt:
        print(f"psal {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError) as exc:
        if debug:
            raise
        print(f"psal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError):
        if debug:
            raise
        print(f"psal {args.command}: error: out of memory; try a smaller image or --device cpu", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, never a traceback (PSAL_DEBUG=1 shows it)
        if debug:
            raise
        print(f"psal {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
