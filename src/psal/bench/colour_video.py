"""Video colour propagation benchmark (issue 31): colour a whole video from a colour picture of
its first frame.

    python -m psal.bench colour-video [--out DIR] [--size W H] [--frames T] [--videos pan parallax drift return] [--dry-run]

Videos with a known truth, made here from bundled pictures (offline; ``psal.bench.video``'s
generators): ``pan`` (a pan with a slow zoom over ``coffee``), ``parallax`` (``chelsea`` behind a
faster ellipse of ``astronaut``) and ``drift`` (``astronaut``, a colour picture, drifting by a
sub-pixel translation per frame: the inpainting benchmark's drift is a gray brick texture, whose
chroma is zero) and ``return`` (the pan there and back: its last frames show the places of its
first ones, so a drop from the first third to the last is colour lost along the way, not new
content entering the view). Each method gets the video's luminance (as gray frames whose CIE L is the
colour frames', :func:`gray_frames`) and its first frame in colour.

Methods, in the same run: ``psal-video`` (:func:`psal.apps.colorize_video.colorize_video` with its
defaults: every frame matched against the keyframe and the frame coloured before it, the colours
followed to the keyframe), ``psal-picture`` (:func:`psal.apps.colorize.colorize` on each frame,
from the keyframe alone, same seed) and ``mean-colour`` (the keyframe's mean chroma on every
frame, ``colour_baselines.mean_colour``).

Metrics per video and method: chroma PSNR (Lab a and b, range 256) over the frames of each third
of the video after the keyframe (frames 1 to T/3 - 1, T/3 to 2T/3 - 1, 2T/3 to T - 1); mean
CIEDE2000; flicker, the mean over every pixel and frame of ``|(ab_t - ab_{t-1}) - (truth_t -
truth_{t-1})|`` in Lab units; seconds per frame. The goal of issue 31: on the mean over the
videos, psal-video's last third at most 2 dB below its first third (colour does not drain away).

``--dry-run``: 40 x 32, 6 frames, ``pan``: for the test of the command.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from psal.bench import common

VIDEOS = ("pan", "parallax", "drift", "return")
METHODS = ("psal-video", "psal-picture", "mean-colour")
GOAL_DROP_DB = 2.0  # psal-video: first third's chroma PSNR - last third's, at most


def make_colour_video(kind: str, W: int, H: int, T: int) -> torch.Tensor:
    """``(T, 3, H, W)`` in ``[0, 1]``: the inpainting benchmark's ``pan`` and ``parallax``, its
    ``drift`` over a colour picture, and the pan there and back (``return``)."""
    from psal.bench import video

    if kind == "return":
        there = make_colour_video("pan", W, H, (T + 1) // 2)
        return torch.cat([there, there.flip(0)])[:T].contiguous()
    clip = video.drift_over(W, H, T, "astronaut") if kind == "drift" else video.make_video(kind, W, H, T)
    return clip[0].transpose(0, 1).contiguous()


def gray_frames(frames: torch.Tensor) -> torch.Tensor:
    """``(T, 1, H, W)``: the sRGB gray of each pixel's relative luminance Y, so that the gray's
    CIE L is the colour pixel's own."""
    lin = torch.where(frames <= 0.04045, frames / 12.92, ((frames.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    Y = (0.2126729 * lin[:, 0] + 0.7151522 * lin[:, 1] + 0.0721750 * lin[:, 2])[:, None]
    return torch.where(Y <= 0.0031308, 12.92 * Y, 1.055 * Y.clamp_min(0) ** (1 / 2.4) - 0.055).clamp(0, 1)


def colour(method: str, truth: torch.Tensor, seed: int) -> torch.Tensor:
    """``method`` on the gray frames of ``truth`` from the colour of its frame 0."""
    from psal.apps.colorize import colorize
    from psal.apps.colorize_video import colorize_video
    from psal.bench.colour_baselines import mean_colour

    key, gray = truth[:1], gray_frames(truth)
    if method == "psal-video":
        return colorize_video(gray, [key], [0], generator=torch.Generator().manual_seed(seed))
    if method == "psal-picture":
        return torch.cat([colorize(gray[t : t + 1], key, generator=torch.Generator().manual_seed(seed)) for t in range(len(gray))])
    if method == "mean-colour":
        return torch.cat([mean_colour(gray[t : t + 1], key) for t in range(len(gray))])
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def scores(out: torch.Tensor, truth: torch.Tensor) -> dict:
    """Chroma PSNR per third after frame 0, mean CIEDE2000 and chroma flicker (module docstring)."""
    from psal.apps.colorize import lab_from_rgb
    from psal.apps.metrics import chroma_psnr, mean_delta_e

    T = len(truth)
    edges = [1, max(T // 3, 2), max(2 * T // 3, 3), T]
    thirds = []
    for a, b in zip(edges, edges[1:]):
        psnr = [chroma_psnr(out[t : t + 1], truth[t : t + 1]) for t in range(a, max(b, a + 1)) if t < T]
        thirds.append(sum(psnr) / len(psnr))
    ab, abt = lab_from_rgb(out)[:, 1:], lab_from_rgb(truth)[:, 1:]
    flicker = float(((ab[1:] - ab[:-1]) - (abt[1:] - abt[:-1])).abs().mean()) if T > 1 else 0.0
    return {
        "chroma_psnr_thirds_db": thirds,
        "drop_db": thirds[0] - thirds[-1],
        "delta_e": sum(mean_delta_e(out[t : t + 1], truth[t : t + 1]) for t in range(1, T)) / max(T - 1, 1),
        "flicker": flicker,
    }


def report(rows: list[dict], W: int, H: int, T: int) -> tuple[str, dict]:
    header = ["video", "method", "chroma PSNR dB, 1st third", "2nd third", "last third", "drop dB", "ΔE2000", "flicker", "s/frame"]
    lines = [
        [r["video"], r["method"], *(f"{x:.2f}" for x in r["chroma_psnr_thirds_db"]), f"{r['drop_db']:.2f}", f"{r['delta_e']:.2f}",
         f"{r['flicker']:.3f}", f"{r['seconds_per_frame']:.3f}"]
        for r in rows
    ]  # fmt: skip
    means = []
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        avg = lambda key, mine=mine: sum(r[key] for r in mine) / len(mine)  # noqa: E731
        thirds = [sum(r["chroma_psnr_thirds_db"][i] for r in mine) / len(mine) for i in range(3)]
        means.append({"method": m, "chroma_psnr_thirds_db": thirds, "drop_db": thirds[0] - thirds[-1], "delta_e": avg("delta_e"),
                      "flicker": avg("flicker"), "seconds_per_frame": avg("seconds_per_frame")})  # fmt: skip
        lines.append([f"**mean of {len(mine)}**", m, *(f"{x:.2f}" for x in thirds), f"{thirds[0] - thirds[-1]:.2f}",
                      f"{avg('delta_e'):.2f}", f"{avg('flicker'):.3f}", f"{avg('seconds_per_frame'):.3f}"])  # fmt: skip
    ours = next((m for m in means if m["method"] == "psal-video"), None)
    goal = {"drop_at_most_db": GOAL_DROP_DB, "drop_db": None if ours is None else ours["drop_db"]}
    goal["holds"] = ours is not None and ours["drop_db"] <= GOAL_DROP_DB
    text = (
        f"**Video colour propagation** ({W} x {H}, {T} frames; the luminance of every frame and the colour of frame 0; "
        "chroma PSNR over the thirds of the video after frame 0)\n\n"
        + common.markdown_table(header, lines)
        + "\n\n"
        + (
            "Goal of issue 31 (psal-video's last third at most 2 dB below its first): not evaluated."
            if ours is None
            else f"Goal of issue 31 (psal-video's last third at most {GOAL_DROP_DB:.0f} dB below its first, mean over the videos): "
            f"{ours['drop_db']:.2f} dB: " + ("holds." if goal["holds"] else "does not hold.")
        )
    )
    return text, {"means": means, "goal": goal}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench colour-video", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write colour_video.md and colour_video.json into this folder")
    ap.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None, help="frame size (default: 160 120)")
    ap.add_argument("--frames", type=int, default=None, help="frames per video (default: 60)")
    ap.add_argument("--videos", nargs="+", default=None, choices=VIDEOS, help=f"default: {' '.join(VIDEOS)}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, for the test of the command")
    args = ap.parse_args(argv)
    W, H = args.size or ([40, 32] if args.dry_run else [160, 120])
    T = args.frames or (6 if args.dry_run else 60)
    videos = args.videos or (["pan"] if args.dry_run else list(VIDEOS))
    env = common.environment()
    print(env)
    rows = []
    for v in videos:
        truth = make_colour_video(v, W, H, T)
        for m in args.methods:
            t0 = time.perf_counter()
            out = colour(m, truth, args.seed)
            seconds = time.perf_counter() - t0
            row = {"video": v, "method": m, "seconds_per_frame": seconds / T, **scores(out, truth)}
            rows.append(row)
            print(f"  {v} {m}: thirds " + " ".join(f"{x:.2f}" for x in row["chroma_psnr_thirds_db"]) + f" dB, {seconds:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    text, summary = report(rows, W, H, T)
    print("\n" + text)
    if args.out:
        import os

        from psal.images import write_atomically

        os.makedirs(args.out, exist_ok=True)
        common.write_json(os.path.join(args.out, "colour_video.json"), args, {"rows": rows, **summary})
        md = env.strip("\n") + "\n\n" + text + "\n"
        write_atomically(os.path.join(args.out, "colour_video.md"), lambda f: f.write(md.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
