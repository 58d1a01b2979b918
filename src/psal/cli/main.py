"""The ``psal`` command: image editing with patch-based stochastic attention, on your own files.

    psal reconstruct QUERY SOURCE -o OUT     rebuild QUERY from the patches of SOURCE
    psal inpaint IMAGE MASK -o OUT           fill the white region of MASK
    psal inpaint VIDEO MASK -o OUT           the same in a video (a file, or a folder of frames with --video)
    psal colorize GRAY REFERENCE -o OUT      colour GRAY like the colour image REFERENCE
    psal colorize VIDEO KEYFRAME... -o OUT   colour a video from colour pictures of some of its frames
    psal upscale IMAGE --scale 2 -o OUT      super-resolution learnt from the image itself
    psal demo [--out out]                    all four on bundled pictures: gallery and metrics
    psal serve [--port 8765]                 the four in a local web page (and an HTTP API)

inpaint, upscale and colorize also take a folder of pictures (and inpaint a folder of masks named
as the pictures) with ``-o OUT_DIR``: one progress bar, a summary, and every file that failed
named, the others still written. A video (``.mp4 .avi .mov .mkv .webm``, or a folder of frames
with ``--video``) is filled with space-time patches; its mask is a video, a folder of frames or one
picture for every frame; OUT is a video file (at the input's frame rate) or a folder of PNG frames.
A video is coloured from colour pictures of some of its frames (``--keyframes 0,40``).

Every subcommand reads ordinary image files (8/16-bit grayscale or RGB, opaque RGBA), writes its
result atomically (a temporary file renamed into place) and never onto an input, takes ``--seed``
and ``--device``, shows progress on stderr, and with ``--report FILE.json`` writes the metrics it
computed. Any problem is one line on stderr and a non-zero exit (2 for bad input, 1 otherwise);
set ``PSAL_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time

import torch

from .. import tasks
from ..tasks import device_from_name as _device
from ..tasks.files import (
    WRITABLE,
    InputError,
    check_output,
    read_image,
    read_image_bits,
    write_image,
)


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
    total, loss=None)`` callback for the apps that moves it (and shows the training loss)."""
    bar = _progress(0, desc, quiet)

    def progress(done, total, loss=None):
        if bar is not None:
            bar.total = total
            bar.n = done
            if loss is not None:
                bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.refresh()

    return bar, progress


def cmd_reconstruct(args) -> dict:
    """Every pixel of QUERY takes the colour that the best-matching patches of SOURCE give it."""
    from psal import images

    from ..tasks import reconstruct_images

    check_output(args.out, [args.query, args.source])
    query, bits = read_image_bits(args.query, "query")
    source = read_image(args.source, "source")
    device = _device(args.device)
    t0 = time.perf_counter()
    bar, progress = _steps("search", args.quiet)
    try:
        out, field = reconstruct_images(
            query, source, device=device, seed=args.seed, patch_size=args.patch_size, k=args.k, iters=args.iters,
            aggregation=args.aggregation, temperature_scale=args.temperature_scale, progress=progress,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    write_image(out, args.out, bits)
    return {
        "command": "reconstruct",
        "output": args.out,
        "size": list(query.shape[-2:]),
        "psnr_vs_query_db": images.psnr(out.cpu(), query.expand_as(out).cpu()),
        "mean_best_patch_cost": float(field.costs[:, :, 0].mean()),
        "seconds": seconds,
    }


def cmd_colorize(args) -> dict:
    """Colour a grayscale image like a colour reference: its luminance is kept, the chroma comes
    from the reference patches that match it best. For a video (a video file, or a folder of
    frames with --video), the references are colour pictures of some of its frames (--keyframes),
    and the colours are followed through the video."""
    if args.video or _is_video(args.gray):
        return cmd_colorize_video(args)
    from ..tasks import check_reference, colorize_image

    if len(args.reference) > 1:
        raise InputError(f"{len(args.reference)} references given: several references are keyframes of a video; a picture takes one")
    model_path = _colour_checkpoint(args)
    if args.keyframes is not None:
        raise InputError("--keyframes is for a video (a video file, or a folder of frames with --video)")
    (reference_path,) = args.reference
    check_output(args.out, [args.gray, reference_path] + ([args.checkpoint] if args.checkpoint else []))
    gray = read_image(args.gray, "gray image")
    reference = read_image(reference_path, "reference")
    check_reference(reference, f"reference {reference_path!r}")
    device = _device(args.device)
    t0 = time.perf_counter()
    out = colorize_image(
        gray, reference, device=device, seed=args.seed, patch_size=args.patch_size, k=args.k, iters=args.iters,
        temperature_scale=args.temperature_scale, match_luminance=args.match_luminance, checkpoint=model_path,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    write_image(out, args.out)
    report = {"command": "colorize", "output": args.out, "size": list(gray.shape[-2:]), "seconds": seconds}
    return report | ({"model": model_path} if model_path else {})


def _colour_checkpoint(args) -> str | None:
    """The colour network's weights for ``--model`` (the shipped ones) or ``--checkpoint``."""
    from psal.apps.colour_net import PRETRAINED_PATH

    if args.match_luminance and (args.model or args.checkpoint):
        raise InputError("--match-luminance is for the zero-shot method, not the trained network (--model, --checkpoint)")
    return args.checkpoint or (PRETRAINED_PATH if args.model else None)


def _keyframe_indices(text: str | None, count: int) -> list[int]:
    """``--keyframes 0,40``: one distinct frame number per reference (default: frame 0 for one)."""
    if text is None:
        if count > 1:
            raise InputError(f"{count} references given: say which frames they show with --keyframes (e.g. --keyframes 0,40)")
        return [0]
    try:
        frames = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--keyframes {text!r}: give frame numbers separated by commas, e.g. 0,40") from None
    if len(frames) != count:
        raise InputError(f"--keyframes {text!r} names {len(frames)} frames for {count} references; give one frame per reference")
    if min(frames) < 0 or len(set(frames)) != len(frames):
        raise InputError(f"--keyframes {text!r}: frame numbers must be distinct and not negative")
    return frames


def cmd_colorize_video(args) -> dict:
    """``psal colorize VIDEO KEYFRAME... -o OUT``: every input read and checked before any work."""
    from psal.videos import read_video, write_video

    from ..tasks import check_reference, colorize_video_frames
    from ..tasks.files import available_memory

    if args.match_luminance:
        raise InputError("--match-luminance is for pictures; a video's keyframes are its own frames, in its own light")
    model_path = _colour_checkpoint(args)
    key_indices = _keyframe_indices(args.keyframes, len(args.reference))
    _check_video_output(args.out, [args.gray, *args.reference] + ([args.checkpoint] if args.checkpoint else []))
    keyframes = []
    for path in args.reference:
        picture = read_image(path, "keyframe")
        check_reference(picture, f"keyframe {path!r}")
        keyframes.append(picture)
    memory = available_memory()
    frames, fps = read_video(args.gray, max_bytes=None if memory is None else int(memory * _VIDEO_MEMORY_SHARE))
    T, _, H, W = frames.shape
    if max(key_indices) >= T:
        raise InputError(f"--keyframes {','.join(map(str, key_indices))}: the video has {T} frames, numbered 0 to {T - 1}")
    device = _device(args.device)
    _give_back_freed_memory()
    t0 = time.perf_counter()
    bar, progress = _steps("colorize", args.quiet)
    try:
        out = colorize_video_frames(
            frames, keyframes, key_indices, device=device, seed=args.seed, patch_size=args.patch_size, k=args.k, iters=args.iters,
            temperature_scale=args.temperature_scale, checkpoint=model_path, progress=progress,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    del frames
    write_video(args.out, out, fps)
    return {
        "command": "colorize",
        "output": args.out,
        "frames": T,
        "size": [H, W],
        "fps": fps,
        "keyframes": key_indices,
        "seconds": seconds,
        "seconds_per_frame": seconds / T,
    } | ({"model": model_path} if model_path else {})


def cmd_inpaint(args) -> dict:
    """Fill the white region of MASK in IMAGE with patches of the rest of the image (coarse to
    fine, masked self-attention and patch voting); the other pixels are kept exactly. For a video
    (a video file, or a folder of frames with --video), space-time patches of the whole video."""
    if args.video or _is_video(args.image):
        return cmd_inpaint_video(args)
    from psal.apps.inpaint_net import PRETRAINED_PATH

    from ..tasks import hole_from_mask, inpaint_image

    check_output(args.out, [args.image, args.mask] + ([args.checkpoint] if args.checkpoint else []))
    image, bits = read_image_bits(args.image, "image")
    mask_image = read_image(args.mask, "mask")
    hole = hole_from_mask(mask_image, image, f"mask {args.mask!r}", f"image {args.image!r}")
    device = _device(args.device)
    model_path = args.checkpoint or (PRETRAINED_PATH if args.model else None)
    t0 = time.perf_counter()
    bar, progress = _steps("inpaint", args.quiet or model_path is not None)
    try:
        out = inpaint_image(
            image, hole, device=device, seed=args.seed, patch_size=_given(args.patch_size, tasks.inpaint_image, "patch_size"),
            iters=_given(args.iters, tasks.inpaint_image, "iters"),
            checkpoint=model_path, progress=progress,
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


def _given(value, task, option: str):
    """An option as given on the command line, else ``task``'s default."""
    return tasks.default(task, option) if value is None else value


def _is_video(path: str) -> bool:
    from psal.videos import is_video_path

    return is_video_path(path)


def _check_video_output(out: str, inputs) -> None:
    """A video file's output path (its folder must exist) or a folder of frames (absent or empty),
    never one of the inputs."""
    for path in inputs:
        if os.path.abspath(path) == os.path.abspath(out) or (os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out)):
            raise InputError(f"output {out!r} is also an input; choose another path")
    ext = os.path.splitext(out)[1].lower()
    if ext in WRITABLE:
        raise InputError(
            f"output {out!r}: a video is written as a video file (.mp4, .avi, .mov, .mkv, .webm) or a folder of frames, not one picture"
        )
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"output {out!r}: folder {folder!r} does not exist")
    if not _is_video(out) and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"output {out!r} exists and is not an empty folder; choose a new folder for the frames")


# What the frames of a video may take as float32, of the memory available: the input, the result
# and the filled window's features at every scale.
_VIDEO_MEMORY_SHARE = 0.25
# glibc's mallopt(M_MMAP_THRESHOLD, ...): blocks of at least this size are mapped on their own and
# given back to the system when freed. Its default threshold grows with every large block freed
# (up to 32 MB), after which the window's medium-sized tensors stay in the heap once freed. At
# 640 x 480 x 60 (one run each): default 1.88-2.00 GB peak resident set at 1.61-1.70 s a frame;
# 16 MB 1.71 GB at 1.87 s; 8 MB 1.63-1.74 GB at 1.87-1.98 s; 1 MB 1.60 GB at 2.18 s (fresh pages
# are zeroed).
_MMAP_THRESHOLD = 16 << 20
_M_MMAP_THRESHOLD = -3


def _give_back_freed_memory() -> bool:
    """Have glibc return large freed blocks to the system for the rest of this process (a video
    command's: its tensors are freed and made again at every scale and window). False where the
    C library is not glibc or refuses."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False


def cmd_inpaint_video(args) -> dict:
    """``psal inpaint VIDEO MASK -o OUT``: every input read and checked before any work."""
    from psal.videos import read_mask_frames, read_video, write_video

    from ..tasks import inpaint_video_frames
    from ..tasks.files import available_memory

    if args.model or args.checkpoint:
        raise InputError("--model and --checkpoint are for pictures; a video is filled with space-time patches")
    _check_video_output(args.out, [args.image, args.mask])
    memory = available_memory()
    frames, fps = read_video(args.image, max_bytes=None if memory is None else int(memory * _VIDEO_MEMORY_SHARE))
    T, _, H, W = frames.shape
    hole = read_mask_frames(args.mask, T, (H, W))
    if not bool(hole.any()):
        raise InputError(f"mask {args.mask!r} is empty: no white pixel in any of its {T} frames (white marks the pixels to fill)")
    device = _device(args.device)
    _give_back_freed_memory()
    t0 = time.perf_counter()
    bar, progress = _steps("inpaint", args.quiet)
    try:
        patch = _given(None if args.patch_size is None else (3, args.patch_size, args.patch_size), inpaint_video_frames, "patch_size")
        # the frames were read for this alone: filled in place, one copy of the video in memory
        out = inpaint_video_frames(frames, hole, device=device, seed=args.seed, patch_size=patch,
                                   iters=_given(args.iters, inpaint_video_frames, "iters"), progress=progress,
                                   in_place=True)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    write_video(args.out, out, fps)
    return {
        "command": "inpaint",
        "output": args.out,
        "frames": T,
        "size": [H, W],
        "fps": fps,
        "hole_fraction": float(hole.float().mean()),
        "seconds": seconds,
        "seconds_per_frame": seconds / T,
    }


# upscale's options of each method (the attribute and the flag).
_UPSCALE_OPTIONS = {
    "network": {"steps": "--steps"},
    "patch": {"patch_size": "--patch-size", "k": "--k", "iters": "--iters", "strength": "--strength"},
}


def _upscale_options(args) -> dict:
    """The options given for ``args.method``; one given for the other method is an error."""
    for method, options in _UPSCALE_OPTIONS.items():
        given = [flag for name, flag in options.items() if getattr(args, name) is not None]
        if method != args.method and given:
            chosen = "--method patch (or --fast)" if args.method == "patch" else "--method network"
            raise InputError(f"{given[0]} is an option of --method {method}; it does nothing with {chosen}")
    return {name: getattr(args, name) for name in _UPSCALE_OPTIONS[args.method] if getattr(args, name) is not None}


def cmd_upscale(args) -> dict:
    """Enlarge an image 2, 3 or 4 times. The default method trains a small network on the image
    itself (its own crops, shrunk and enlarged back, are the examples: psal.apps.internal_sr);
    ``--method patch`` borrows detail from the image's own patches one scale lower instead, in a
    few seconds. Both back-project, so that shrinking the result gives back the input."""
    from psal.apps.upscale import downsample

    from ..tasks import upscale_image

    options = _upscale_options(args)
    check_output(args.out, [args.image])
    image, bits = read_image_bits(args.image, "image")
    H, W = image.shape[-2:]
    tasks.check_upscale_fits(H, W, args.scale, args.method, tasks.memory_pixels(), f"image {args.image!r}")
    device = _device(args.device)
    t0 = time.perf_counter()
    bar, progress = _steps("upscale", args.quiet)
    try:
        out = upscale_image(image, args.scale, device=device, seed=args.seed, method=args.method, progress=progress, **options)
    finally:  # also on Ctrl-C or an error: the bar's line is cleared before the message
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    write_image(out, args.out, bits)
    consistency = float((downsample(out, args.scale) - image.to(out)).abs().mean())
    return {
        "command": "upscale",
        "method": args.method,
        "output": args.out,
        "size": [H * args.scale, W * args.scale],
        "mean_abs_error_after_shrinking": consistency,
        "seconds": seconds,
    }


def cmd_demo(args) -> dict:
    """All four tasks (or those of --tasks) on scikit-image's bundled pictures, with generated holes
    and degradations: writes each result, a gallery (input | result | truth per task) and the
    metrics."""
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
        raise InputError(f"the demo needs scikit-image's bundled pictures: {exc}") from None
    os.makedirs(args.out, exist_ok=True)
    device = _device(args.device)
    size = args.size

    def gen():
        return torch.Generator(device=device).manual_seed(args.seed)

    def to(*tensors):
        return [t.to(device) for t in tensors]

    rows, metrics = [], {}
    wanted = args.tasks
    bar = _progress(len(wanted), "demo", args.quiet)
    t0 = time.perf_counter()
    for name in scenarios.DEMO["inpaint"] if "inpaint" in wanted else ():
        truth, hole = to(*scenarios.inpaint_case(name, size))
        out = inpaint(truth, hole, generator=gen())
        metrics[f"inpaint_{name}"] = {
            "hole_fraction": float(hole.float().mean()),
            "hole_psnr_db": hole_psnr(out, truth, hole),
            "gradient_ratio_vs_truth": gradient_ratio(out, hole) / gradient_ratio(truth, hole),
        }
        rows.append((f"inpaint_{name}", [scenarios.inpaint_shown(truth, hole), out, truth]))
    if bar is not None and "inpaint" in wanted:
        bar.update()
    for name in scenarios.DEMO["colorize"] if "colorize" in wanted else ():
        gray, reference, truth = to(*scenarios.colorize_case(name, size))
        out = colorize(gray, reference, generator=gen())
        metrics[f"colorize_{name}"] = {"chroma_psnr_db": chroma_psnr(out, truth)}
        rows.append((f"colorize_{name}", [gray, out, truth]))
    if bar is not None and "colorize" in wanted:
        bar.update()
    for name, scale in scenarios.DEMO["upscale"] if "upscale" in wanted else ():
        low, truth = to(*scenarios.upscale_case(name, size, scale))
        out = upscale(low, scale, generator=gen())
        bicubic = enlarge(low, truth.shape[-2:])
        metrics[f"upscale_{name}_x{scale}"] = {"y_psnr_db": y_psnr(out, truth, scale), "bicubic_y_psnr_db": y_psnr(bicubic, truth, scale)}
        rows.append((f"upscale_{name}_x{scale}", [bicubic.clamp(0, 1), out, truth]))
    if bar is not None and "upscale" in wanted:
        bar.update()
    for target_name, source_name in scenarios.DEMO["reconstruct"] if "reconstruct" in wanted else ():
        target, source = to(*scenarios.reconstruct_case(target_name, source_name, size))
        field = psal.patchmatch(target, source, patch_size=7, generator=gen())
        out = psal.attend(target, source, source, field.indices, patch_size=7, aggregation="center")
        metrics[f"reconstruct_{target_name}_from_{source_name}"] = {"psnr_db": images.psnr(out.cpu(), target.cpu())}
        rows.append((f"reconstruct_{target_name}_from_{source_name}", [source, out, target]))
    if bar is not None:
        if "reconstruct" in wanted:
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


def cmd_serve(args) -> None:
    """A local web page for the four tasks (open a picture, paint a mask, run, compare, download)
    and the HTTP API behind it (psal.serve). Jobs run one at a time on the device; Ctrl+C stops.
    Needs the serve extra: pip install psal[serve]."""
    from psal.serve import run_server

    run_server(host=args.host, port=args.port, device=args.device, max_pixels=args.max_pixels, quiet=args.quiet)


DEMO_TASKS = ("inpaint", "colorize", "upscale", "reconstruct")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="psal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, out: bool = True):
        if out:
            p.add_argument(
                "-o", "--out", required=True, help="output image (.png, .jpg, .tif, .bmp, .webp), or folder for a folder of pictures"
            )
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
        p.add_argument("--report", metavar="FILE.json", help="write the metrics computed to this JSON file")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("reconstruct", help="rebuild an image from another image's patches", description=cmd_reconstruct.__doc__)
    p.add_argument("query", help="the image to rebuild")
    p.add_argument("source", help="the image whose patches are used")
    common(p)
    d = functools.partial(tasks.default, tasks.reconstruct_images)  # the defaults the service uses too
    p.add_argument("--patch-size", type=int, default=d("patch_size"))
    p.add_argument("--k", type=int, default=d("k"), help="matches per pixel")
    p.add_argument("--iters", type=int, default=d("iters"), help="PatchMatch iterations")
    p.add_argument("--aggregation", choices=["center", "patch", "patch_mean"], default=d("aggregation"))
    p.add_argument("--temperature-scale", type=float, default=d("temperature_scale"), help="temperature / median best patch cost")
    p.set_defaults(run=cmd_reconstruct)

    p = sub.add_parser("demo", help="all four tasks on bundled pictures: results, gallery, metrics", description=cmd_demo.__doc__)
    p.add_argument("--out", default="out", help="folder for the pictures and demo_metrics.json (created)")
    p.add_argument("--tasks", nargs="+", choices=DEMO_TASKS, default=list(DEMO_TASKS), help="which of the four tasks to run (default: all)")
    p.add_argument("--size", type=int, default=256, help="side of the square test pictures")
    common(p, out=False)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("inpaint", help="fill the white region of a mask", description=cmd_inpaint.__doc__)
    p.add_argument("image", help="the image to repair (or a folder of them)")
    p.add_argument(
        "mask", help="same size as IMAGE; white marks the pixels to fill (a folder of masks named as the pictures, for a folder)"
    )
    common(p)
    d = functools.partial(tasks.default, tasks.inpaint_image)
    dv = functools.partial(tasks.default, tasks.inpaint_video_frames)
    p.add_argument(
        "--patch-size",
        type=int,
        help=f"side of the patches (default {d('patch_size')}; a video's are 3 frames x this, default {dv('patch_size')})",
    )
    p.add_argument("--iters", type=int, help=f"search and vote rounds per scale, at most (default {d('iters')}; for a video {dv('iters')})")
    p.add_argument("--model", action="store_true", help="use the trained network shipped with psal instead of the zero-shot patch method")
    p.add_argument("--checkpoint", help="with the network of this checkpoint (python -m psal.examples.train_inpainting) instead")
    p.add_argument("--video", action="store_true", help="IMAGE is a folder of the frames of one video (sorted by file name)")
    p.set_defaults(run=cmd_inpaint)

    p = sub.add_parser(
        "colorize", help="colour a grayscale image like a colour reference, or a video from keyframes", description=cmd_colorize.__doc__
    )
    p.add_argument("gray", help="the image or video to colour (colour is read for its luminance; or a folder of pictures)")
    p.add_argument("reference", nargs="+", help="a colour image of similar content; for a video, colour pictures of some of its frames")
    common(p)
    d = functools.partial(tasks.default, tasks.colorize_image)
    p.add_argument("--patch-size", type=int, default=d("patch_size"))
    p.add_argument("--k", type=int, default=d("k"), help="matches per pixel")
    p.add_argument("--iters", type=int, default=d("iters"), help="PatchMatch iterations")
    p.add_argument("--temperature-scale", type=float, default=d("temperature_scale"), help="temperature / median best patch cost")
    p.add_argument(
        "--match-luminance",
        action="store_true",
        help="move the reference's brightness and contrast to the gray image's first (for a reference taken in other light)",
    )
    p.add_argument("--keyframes", help="for a video: the frames the references show, e.g. 0,40 (default: 0, for one reference)")
    p.add_argument("--model", action="store_true", help="use the trained colour network shipped with psal instead of the zero-shot method")
    p.add_argument("--checkpoint", help="with the colour network of this checkpoint (python -m psal.examples.train_colorization) instead")
    p.add_argument("--video", action="store_true", help="GRAY is a folder of the frames of one video (sorted by file name)")
    p.set_defaults(run=cmd_colorize)

    p = sub.add_parser("upscale", help="super-resolution learnt from the image itself", description=cmd_upscale.__doc__)
    p.add_argument("image", help="the image to enlarge (or a folder of them)")
    d = functools.partial(tasks.default, tasks.upscale_image)
    p.add_argument("--scale", type=int, choices=[2, 3, 4], default=d("scale"))
    common(p)
    p.add_argument("--method", choices=["network", "patch"], default=d("method"),
                   help="network: train a small network on the image (about a minute); patch: borrow its own patches (seconds)")  # fmt: skip
    p.add_argument("--fast", dest="method", action="store_const", const="patch", help="the same as --method patch")
    # Each method's options default to None, so that one given to the other method is an error
    # (cmd_upscale), not silently ignored; the help shows the defaults of psal.tasks.
    p.add_argument("--steps", type=int, help=f"network: training steps per stage (x2 in one stage, x3 and x4 in two; default {d('steps')})")
    p.add_argument("--patch-size", type=int, help=f"patch: side of the patches matched (default {d('patch_size')})")
    p.add_argument("--k", type=int, help=f"patch: matches per pixel (default {d('k')})")
    p.add_argument("--iters", type=int, help=f"patch: PatchMatch iterations (default {d('iters')})")
    p.add_argument("--strength", type=float, help=f"patch: how much of the borrowed detail is added (default {d('strength')})")
    p.set_defaults(run=cmd_upscale)

    p = sub.add_parser("serve", help="a local web page (and HTTP API) for the four tasks", description=cmd_serve.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse pictures (and upscaled results) of more pixels (default: what the memory available allows)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no start-up line; errors only in the log")
    p.set_defaults(run=cmd_serve, report=None)
    return ap


def _paths(args) -> list[str]:
    """The command's input and output paths."""
    paths = []
    for name in ("out", "query", "source", "image", "mask", "gray", "reference"):
        value = getattr(args, name, None)
        paths += value if isinstance(value, list) else [value] if value else []
    return paths


def _version() -> str:
    from psal import __version__

    return f"psal {__version__}"


def _write_report(path: str, report: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"--report {path!r}: folder {folder!r} does not exist")
    from psal.images import write_json

    write_json(path, report)


# Folder mode: the argument that names the folder of pictures, and the one naming a folder of masks.
_FOLDER_ARGS = {"inpaint": ("image", "mask"), "upscale": ("image", None), "colorize": ("gray", None)}


def _pictures(folder: str) -> list[str]:
    """The files of ``folder`` with an image extension, sorted by name."""
    return sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in WRITABLE and os.path.isfile(os.path.join(folder, n)))


def _run_folder(args) -> int:
    """``psal inpaint DIR MASK_DIR -o OUT_DIR`` (masks matched by file name, any image extension),
    ``psal upscale DIR -o OUT_DIR``, ``psal colorize DIR REFERENCE -o OUT_DIR``: each picture of
    DIR through the one-file command, written to OUT_DIR under its own name, one progress bar over
    the files. A file that fails is named on stderr and the others still run; the exit status is
    1 if any failed (2 if the folders themselves are wrong)."""
    what, masks_arg = _FOLDER_ARGS[args.command]
    folder, out = getattr(args, what), args.out
    if os.path.splitext(out)[1].lower() in WRITABLE or (os.path.exists(out) and not os.path.isdir(out)):
        raise InputError(f"-o {out!r}: with a folder of pictures, the output must be a folder")
    same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)  # noqa: E731 - links resolved
    if same(out, folder) or (masks_arg and same(out, getattr(args, masks_arg))):
        raise InputError(f"-o {out!r} is also an input folder; choose another folder")
    if masks_arg and same(folder, getattr(args, masks_arg)):
        raise InputError(
            f"{masks_arg} folder {getattr(args, masks_arg)!r} is the folder of pictures; keep the masks in a folder of their own"
        )
    # What every file would fail on alike, said once: the device, colorize's reference, a checkpoint.
    _device(args.device)
    if args.command == "colorize":
        if len(args.reference) > 1 or args.keyframes is not None:
            raise InputError("several references and --keyframes are for a video; a folder of pictures takes one reference")
        tasks.check_reference(read_image(args.reference[0], "reference"), f"reference {args.reference[0]!r}")
    if getattr(args, "checkpoint", None) and not os.path.isfile(args.checkpoint):
        raise InputError(f"checkpoint {args.checkpoint!r}: no such file")
    names = _pictures(folder)
    if not names:
        raise InputError(f"{what} folder {folder!r} holds no picture ({', '.join(sorted(WRITABLE))})")
    masks: dict[str, str] = {}
    if masks_arg:
        mask_dir = getattr(args, masks_arg)
        if not os.path.isdir(mask_dir):
            raise InputError(f"{masks_arg} {mask_dir!r}: with a folder of pictures, give a folder of masks (matched by file name)")
        for n in _pictures(mask_dir):
            stem = os.path.splitext(n)[0]
            if stem in masks:
                raise InputError(f"{masks_arg} folder {mask_dir!r} holds two masks named {stem}.*: {os.path.basename(masks[stem])} and {n}")
            masks[stem] = os.path.join(mask_dir, n)
    if args.report:
        raise InputError("--report is for one picture; a folder run prints its summary instead")
    os.makedirs(out, exist_ok=True)
    failed, bar = [], _progress(len(names), args.command, args.quiet)
    for name in names:
        one = argparse.Namespace(**{**vars(args), "quiet": True, "report": None})
        setattr(one, what, os.path.join(folder, name))
        one.out = os.path.join(out, name)
        try:
            if masks_arg:
                stem = os.path.splitext(name)[0]
                if stem not in masks:
                    raise InputError(f"no mask named {stem}.* in {getattr(args, masks_arg)!r}")
                setattr(one, masks_arg, masks[stem])
            args.run(one)
        except KeyboardInterrupt:
            raise
        except (MemoryError, torch.OutOfMemoryError):
            failed.append((name, "out of memory"))
        except Exception as exc:  # noqa: BLE001 - one line per file; the others go on
            failed.append((name, str(exc) if isinstance(exc, (InputError, ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if len(failed) == len(names) > 1 and len({why for _, why in failed}) == 1:
        raise InputError(f"{failed[0][1]} (so for all {len(names)} pictures; nothing written)")  # an option, not a file
    for name, why in failed:
        print(f"psal {args.command}: failed: {name}: {why}", file=sys.stderr)
    done = len(names) - len(failed)
    print(
        f"psal {args.command}: {done} of {len(names)} pictures written to {out}" + (f", {len(failed)} failed" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help(sys.stderr)
        return 2
    debug = os.environ.get("PSAL_DEBUG", "") not in ("", "0")
    try:
        if args.report and os.path.abspath(args.report) in {os.path.abspath(p) for p in _paths(args)}:
            raise InputError(f"--report {args.report!r} is also the output or an input; choose another path")
        if (
            args.command in _FOLDER_ARGS
            and os.path.isdir(getattr(args, _FOLDER_ARGS[args.command][0]))
            and not getattr(args, "video", False)
        ):
            return _run_folder(args)
        report = args.run(args)
        if args.report:
            _write_report(args.report, report)
    except KeyboardInterrupt:
        print(f"psal {args.command}: interrupted", file=sys.stderr)
        return 130
    except (InputError, ValueError, TypeError) as exc:
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
    if not args.quiet and report is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def entry() -> None:
    """The ``psal`` command: :func:`main`, and on Ctrl-C an exit with 130 that nothing after it
    can turn into a death by SIGINT (a KeyboardInterrupt raised again while the interpreter
    shuts down, in a thread or an atexit hook, made the exit status -2 once in CI). The output
    files are settled by then: temporary files were removed as the interrupt unwound."""
    code = main()
    if code == 130:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
