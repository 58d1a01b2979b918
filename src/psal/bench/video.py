"""Video inpainting benchmark (issue 30): space-time PSAL against inpainting frame by frame.

    python -m psal.bench video [--out DIR] [--size W H] [--frames T] [--videos pan drift parallax]
                               [--holes disc shape logo] [--methods ...] [--no-layer] [--strip PNG] [--dry-run]

Test videos with a known truth, made here from scikit-image's bundled pictures (offline):

- ``pan``: a camera pan with a slow zoom over a photograph (``coffee``): crop windows that move
  and shrink by 12% over the clip, each resized to the frame with antialiasing;
- ``drift``: a texture (``brick``) drifting by a sub-pixel translation per frame (bilinear
  sampling, ``grid_sample``; 0.6 and 0.25 pixels a frame at 160 x 120);
- ``parallax``: two layers, a background picture (``chelsea``) moving slowly and a foreground
  cut-out (an ellipse of ``astronaut``, antialiased edge) moving four times faster, composited.

Holes (``T, H, W`` bool): ``disc``, a moving occluder (a disc of 4% of the frame on a curved path
across it); ``shape``, an ellipse of about 4% on another, diagonal path; ``logo``, a static
rectangle of about 2.7% in the bottom-right corner of every frame. What lies under a hole is set
to 0.5 before any method sees the video. Cases: every video with every hole.

Methods, in the same run on the same cases: ``psal-video`` (``psal.apps.inpaint_video`` with its
defaults), ``psal-frames`` (``psal.apps.inpaint`` on each frame with its defaults, a generator of
the same seed per frame), ``pypatchmatch-frames`` and ``telea-frames`` (the wrappers of
:mod:`psal.bench.peers`, frame by frame; left out with a note where they do not import). Every
result keeps the known pixels of the input (the peers' 8-bit known pixels are put back), so the
metrics see the fill only.

Metrics per case: hole PSNR over all hole pixels of the video; patch-SWD (``apps.metrics.patch_swd``,
7 x 7 patches, per frame over that frame's hole, averaged over the frames with a hole); flicker,
the mean over the pixels in the hole in frame ``t`` or ``t - 1`` of
``|(fill_t - fill_{t-1}) - (truth_t - truth_{t-1})|``; seconds per frame; peak memory. Each
(case, method) runs in a fresh process after a tiny warm-up call of the same method (numba loads
its kernels there): ``peak MiB`` is that process's maximum resident set (torch imported, as in
``photos``), ``+MiB`` its high-water mark during the timed call over the resting level before it.

``--layer`` (on by default; ``--no-layer`` skips it): ``psal.PSAttention(patch_size=3,
num_neighbors=4)`` forward + backward on smooth features ``(1, 64, 8, 64, 64)`` (a fixed random
1 x 1 x 1 convolution 3 -> 64 of a pan video), q, k and v the same tokens, against
``torch.nn.functional.scaled_dot_product_attention`` over those ``8 * 64 * 64`` tokens (one head,
d = 64, float32, CPU, the flash kernel where ``sdpa_kernel`` allows it on the CPU); median of 3 timed
runs after a warm-up (the profiler's two calls), peak memory of the tensors allocated plus that of
numba's numpy arrays (``common.host_peak_bytes``). Then
``(1, 64, 16, 128, 128)``: psal measured (one timed run, ``--large-repeats``), SDPA extrapolated from the first size (time as N², memory
as N).

``--dry-run``: tiny sizes (40 x 32, 6 frames, ``pan`` with ``disc``, the layer at (1, 8, 2, 8, 8)),
for the test of the command.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from psal.bench import common, peers

VIDEOS = ("pan", "drift", "parallax")
HOLES = ("disc", "shape", "logo")
METHODS = ("psal-video", "psal-frames", "pypatchmatch-frames", "telea-frames")
FRAME_METHODS = METHODS[1:]
_PEER = {"pypatchmatch-frames": "pypatchmatch", "telea-frames": "opencv-telea"}
# The goals of issue 30.
GOAL_PSNR_DB = 1.0  # psal-video's hole PSNR over the best frame-by-frame method's, at least
GOAL_FLICKER = 0.5  # psal-video's flicker over the least flickering frame-by-frame method's, at most
GOAL_SPEEDUP = 20.0  # SDPA time / psal time at the first layer size, at least
GOAL_MEMORY = 0.1  # psal memory / SDPA memory at the first layer size, at most


# ----------------------------------------------------------------------------------------------
# Test videos (1, 3, T, H, W) in [0, 1] and holes (T, H, W) bool.


def _ramp(T: int) -> torch.Tensor:
    """``(T,)`` float64 from 0 to 1 (0 for a single frame)."""
    return torch.arange(T, dtype=torch.float64) / max(T - 1, 1)


def _translated(picture: torch.Tensor, top: torch.Tensor, left: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``(T, C, H, W)``: frame ``t`` is ``picture`` (1, C, Hp, Wp) read at rows ``top[t] + i`` and
    columns ``left[t] + j`` (pixel centres, fractional: bilinear; border pixels repeated)."""
    _, C, Hp, Wp = picture.shape
    T = top.numel()
    rows = top.double()[:, None] + torch.arange(H, dtype=torch.float64)  # (T, H)
    cols = left.double()[:, None] + torch.arange(W, dtype=torch.float64)  # (T, W)
    gy = ((2 * rows + 1) / Hp - 1)[:, :, None].expand(T, H, W)
    gx = ((2 * cols + 1) / Wp - 1)[:, None, :].expand(T, H, W)
    grid = torch.stack([gx, gy], -1).to(picture.dtype)
    out = F.grid_sample(picture.expand(T, C, Hp, Wp), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp(0, 1)


PAN_PICTURE = "coffee"


def pan_boxes(W: int, H: int, T: int, Hp: int, Wp: int) -> list[tuple[int, int, int, int]]:
    """The ``pan``'s window on its ``Hp x Wp`` picture in each frame: ``(top, left, height,
    width)``, each resized to ``H x W`` (a pan to the right with a 12% zoom in)."""
    boxes = []
    for r in _ramp(T).tolist():
        zoom = 1 - 0.12 * r
        ch = min(Hp, round(0.75 * Hp * zoom))
        cw = min(Wp, round(ch * W / H))
        cx, cy = (0.36 + 0.24 * r) * Wp, (0.5 + 0.04 * r) * Hp
        x0 = min(max(round(cx - cw / 2), 0), Wp - cw)
        y0 = min(max(round(cy - ch / 2), 0), Hp - ch)
        boxes.append((y0, x0, ch, cw))
    return boxes


def _pan(W: int, H: int, T: int) -> torch.Tensor:
    from psal import images

    pic = images.load_bundled(PAN_PICTURE)  # (1, 3, 400, 600)
    frames = [images.resize(pic[..., y0 : y0 + ch, x0 : x0 + cw], (H, W))[0] for y0, x0, ch, cw in pan_boxes(W, H, T, *pic.shape[-2:])]
    return torch.stack(frames, 1)[None].contiguous()


def _drift(W: int, H: int, T: int) -> torch.Tensor:
    return drift_over(W, H, T, "brick")


def drift_velocity(W: int, H: int) -> tuple[float, float]:
    """The drift's motion, ``(vx, vy)`` pixels a frame: frame ``t``'s pixel ``(i, j)`` shows what
    frame 0 shows at ``(i + vy t, j + vx t)``."""
    return 0.6 * W / 160, 0.25 * H / 120


def drift_over(W: int, H: int, T: int, picture: str) -> torch.Tensor:
    """``(1, 3, T, H, W)``: the bundled ``picture``, as a square, drifting by 0.6 and 0.25 pixels
    a frame at 160 x 120 (``drift`` is the gray ``brick``)."""
    from psal import images

    vx, vy = drift_velocity(W, H)
    side = max(round(1.6 * max(W, H)), W + math.ceil(vx * T) + 4, H + math.ceil(vy * T) + 4)
    tex = images.load_bundled(picture, side)
    x0, y0 = (side - W - vx * (T - 1)) / 2, (side - H - vy * (T - 1)) / 2
    steps = torch.arange(T, dtype=torch.float64)
    return _translated(tex, y0 + vy * steps, x0 + vx * steps, H, W).transpose(0, 1)[None].contiguous()


def _parallax(W: int, H: int, T: int) -> torch.Tensor:
    from psal import images

    bg = images.load_bundled("chelsea")  # (1, 3, 300, 451)
    bh = round(1.25 * H)
    bw = max(round(bg.shape[-1] * bh / bg.shape[-2]), W + 2)
    bg = images.resize(bg, (bh, bw))
    steps = torch.arange(T, dtype=torch.float64)
    vb = 0.5 * W / 160  # background: pixels a frame, leftwards
    back = _translated(bg, torch.full((T,), (bh - H) / 2, dtype=torch.float64), (bw - W) / 2 - vb * (T / 2) + vb * steps, H, W)
    # The foreground: an ellipse cut out of another picture, moving with its content.
    fg = images.load_bundled("astronaut", (max(H, 2), max(W, 2)))
    rx, ry = 0.16 * W, 0.22 * H
    cx = (0.3 + 0.375 * _ramp(T)) * W  # 2.5 pixels a frame at 160 x 120
    cy = (0.45 + 0.08 * _ramp(T)) * H
    # fg pixel (i, j) centred on the picture's point (0.3 H, 0.45 W) (the astronaut's face).
    front = _translated(fg, 0.3 * H - cy, 0.45 * W - cx, H, W)
    yy = torch.arange(H, dtype=torch.float64)[None, :, None]
    xx = torch.arange(W, dtype=torch.float64)[None, None, :]
    q = ((xx - cx[:, None, None]) / rx) ** 2 + ((yy - cy[:, None, None]) / ry) ** 2
    alpha = ((1 - q.sqrt()) * min(rx, ry) + 0.5).clamp(0, 1).to(back.dtype)[:, None]  # an edge 1 pixel wide
    return (alpha * front + (1 - alpha) * back).transpose(0, 1)[None].contiguous()


def make_video(kind: str, W: int, H: int, T: int) -> torch.Tensor:
    """The test video ``kind`` (:data:`VIDEOS`) as ``Tensor[1, 3, T, H, W]`` float32 in ``[0, 1]``."""
    return {"pan": _pan, "drift": _drift, "parallax": _parallax}[kind](W, H, T)


def make_hole(kind: str, W: int, H: int, T: int) -> torch.Tensor:
    """The hole ``kind`` (:data:`HOLES`) as ``Tensor[T, H, W]`` bool."""
    yy = torch.arange(H, dtype=torch.float64)[None, :, None]
    xx = torch.arange(W, dtype=torch.float64)[None, None, :]
    r = _ramp(T)[:, None, None]
    if kind == "disc":  # 4% of the frame, left to right on an arc
        radius = math.sqrt(0.04 * H * W / math.pi)
        cx, cy = (0.2 + 0.6 * r) * W, (0.5 - 0.2 * torch.sin(math.pi * r)) * H
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    if kind == "shape":  # an ellipse of about 4%, top right to bottom left
        cx, cy = (0.75 - 0.45 * r) * W, (0.28 + 0.42 * r) * H
        return ((xx - cx) / (0.13 * W)) ** 2 + ((yy - cy) / (0.1 * H)) ** 2 <= 1
    if kind == "logo":  # a static rectangle in the bottom-right corner
        x1, y1 = W - max(round(0.04 * W), 1), H - max(round(0.05 * H), 1)
        x0, y0 = x1 - max(round(0.2 * W), 2), y1 - max(round(0.13 * H), 2)
        hole = torch.zeros(T, H, W, dtype=torch.bool)
        hole[:, y0:y1, x0:x1] = True
        return hole
    raise ValueError(f"make_hole: kind must be one of {', '.join(HOLES)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Methods and metrics.


def fill(method: str, video: torch.Tensor, hole: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``method`` (:data:`METHODS`) on ``video (1, 3, T, H, W)`` with ``hole (T, H, W)``; the
    result keeps the known pixels of ``video``."""
    if method == "psal-video":
        from psal.apps.inpaint_video import inpaint_video

        out = inpaint_video(video, hole, generator=torch.Generator().manual_seed(seed))
    else:
        frames = []
        for t in range(video.shape[2]):
            img, h = video[:, :, t], hole[t]
            if not bool(h.any()):
                frames.append(img)
            elif method == "psal-frames":
                from psal.apps.inpaint import inpaint

                frames.append(inpaint(img, h, generator=torch.Generator().manual_seed(seed)))
            else:
                frames.append(peers.INPAINT[_PEER[method]][0](img, h[None, None]))
        out = torch.stack(frames, 2)
    return torch.where(hole[None, None], out.to(video.dtype), video)


def flicker(out: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor) -> float:
    """Mean over the pixels in the hole in frame t or t - 1 (and channels) of
    ``|(out_t - out_{t-1}) - (truth_t - truth_{t-1})|``; 0 for a single frame."""
    if out.shape[2] < 2:
        return 0.0
    d = (out[:, :, 1:] - out[:, :, :-1]) - (truth[:, :, 1:] - truth[:, :, :-1])
    m = (hole[1:] | hole[:-1])[None, None].expand_as(d)
    return float(d.abs()[m].mean())


def scores(out: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor) -> dict:
    from psal.apps.metrics import hole_psnr, patch_swd

    swd = [patch_swd(out[:, :, t], truth[:, :, t], hole[t][None, None]) for t in range(out.shape[2]) if bool(hole[t].any())]
    return {
        "hole_psnr_db": hole_psnr(out, truth, hole[None, None]),
        "patch_swd": sum(swd) / len(swd),
        "flicker": flicker(out, truth, hole),
    }


_CHILD = r"""
import sys
from psal.bench.video import measure
measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7]))
"""


def measure(video_kind: str, hole_kind: str, W: int, H: int, T: int, method: str, seed: int) -> None:
    """One (case, method) in this process: a tiny warm-up call of the method, then the timed call;
    prints one JSON line (what :func:`common.run_script` reads)."""
    import gc
    import resource

    # 64 x 48 has two pyramid levels: a single-level warm-up leaves kernels to compile in the timed call
    warm = make_video("pan", 64, 48, 3)
    fill(method, warm, make_hole("disc", 64, 48, 3), seed)
    truth = make_video(video_kind, W, H, T)
    hole = make_hole(hole_kind, W, H, T)
    shown = torch.where(hole[None, None], torch.full_like(truth, 0.5), truth)
    gc.collect()
    probe = common.PeakMemory("cpu")
    probe.start()
    t0 = time.perf_counter()
    out = fill(method, shown, hole, seed)
    seconds = time.perf_counter() - t0
    over_rest = probe.peak_kib() / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {"video": video_kind, "hole": hole_kind, "method": method, "width": W, "height": H, "frames": T,
              "hole_share": float(hole.float().mean()), "seconds": seconds, "seconds_per_frame": seconds / T,
              "peak_mib": peak, "peak_over_rest_mib": over_rest, **scores(out, truth, hole)}  # fmt: skip
    print(json.dumps(record))


# ----------------------------------------------------------------------------------------------
# The layer: PSAttention against scaled_dot_product_attention on video tokens.


# ----------------------------------------------------------------------------------------------
# The 3-D search against exact k-NN on the bench's videos.

SEARCH_CASES = ("noisy-self", "halves")
GOAL_SEARCH = 1.05  # mean cost over exact k-NN's, at most (issue 30)


def search_case(video_kind: str, case: str, W: int, H: int, T: int, seed: int):
    """``(query, key)`` of one search case on ``video_kind``: its frames with sensor noise searched
    in the clean frames (a denoiser's search: ``noisy-self``), or its first half of frames searched
    in its second half (``halves``: most patches have near copies a few frames on)."""
    video = make_video(video_kind, W, H, T)
    if case == "noisy-self":
        return video + 0.03 * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed)), video
    return video[:, :, : T // 2].contiguous(), video[:, :, T // 2 :].contiguous()


def run_search(videos, W: int, H: int, T: int, backends, seed: int, patch=(3, 5, 5), k: int = 3) -> list[dict]:
    """Each backend's space-time PatchMatch (its default iterations) against exact k-NN on small
    crops of the bench's videos (``W x H``, ``T`` frames: exact k-NN is quadratic): the mean cost
    over exact's, and the seconds of both."""
    import psal

    rows = []
    for v in videos:
        for case in SEARCH_CASES:
            q, key = search_case(v, case, W, H, T, seed)
            t0 = time.perf_counter()
            exact = psal.exact_knn(q, key, patch_size=patch, num_neighbors=k)
            exact_s = time.perf_counter() - t0
            for b in backends:
                t0 = time.perf_counter()
                field = psal.patchmatch(q, key, patch_size=patch, num_neighbors=k, backend=b, generator=torch.Generator().manual_seed(seed))
                rows.append({"video": v, "case": case, "backend": b, "ratio": float(field.costs.mean() / exact.costs.mean()),
                             "seconds": time.perf_counter() - t0, "exact_seconds": exact_s})  # fmt: skip
    return rows


def search_report(rows: list[dict], W: int, H: int, T: int, patch=(3, 5, 5)) -> str:
    lines = [
        f"**The 3-D search against exact k-NN** ({W} x {H}, {T} frames of each video; patches "
        f"{' x '.join(map(str, patch))}, k = 3, default iterations; mean cost over exact's, goal <= {GOAL_SEARCH})",
        "",
    ]
    body = [[r["video"], r["case"], r["backend"], f"{r['ratio']:.3f}", f"{r['seconds']:.2f}", f"{r['exact_seconds']:.1f}"] for r in rows]
    lines.append(common.markdown_table(["video", "case", "backend", "cost / exact", "s", "exact s"], body))
    for b in sorted({r["backend"] for r in rows}):
        ratios = [r["ratio"] for r in rows if r["backend"] == b]
        lines.append(f"\n{b}: mean {statistics.mean(ratios):.3f}, worst {max(ratios):.3f} over {len(ratios)} cases")
    return "\n".join(lines)


def _sdpa_backend():
    """``(backend or None, label)``: the flash kernel where it runs on this CPU, else the default."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x = torch.rand(1, 1, 16, 8, requires_grad=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(x, x, x).sum().backward()
        return SDPBackend.FLASH_ATTENTION, "flash (sdpa_kernel(SDPBackend.FLASH_ATTENTION))"
    except Exception as exc:  # noqa: BLE001 - any refusal means the default
        return None, f"default (flash refused on this CPU: {str(exc).splitlines()[0][:80]})"


def layer_features(C: int, T: int, H: int, W: int) -> torch.Tensor:
    """Smooth features ``(1, C, T, H, W)``: a fixed random 1 x 1 x 1 convolution 3 -> C of the
    pan video at ``W x H``, ``T`` frames."""
    weight = torch.randn(C, 3, 1, 1, 1, generator=torch.Generator().manual_seed(0)) / math.sqrt(3)
    return F.conv3d(make_video("pan", W, H, T) - 0.5, weight).contiguous()


def _median_s(step, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _psal_step(feat: torch.Tensor, grad: torch.Tensor):
    import psal

    layer = psal.PSAttention(patch_size=3, num_neighbors=4, seed=0)
    q, k, v = (feat.clone().requires_grad_() for _ in range(3))

    def step():
        for x in (q, k, v):
            x.grad = None
        layer(q, k, v).backward(grad)

    return step


def _sdpa_step(feat: torch.Tensor, grad: torch.Tensor, backend):
    tokens = feat.flatten(2).transpose(1, 2)[:, None].contiguous()  # (1, 1, N, C): one head, d = C
    g = grad.flatten(2).transpose(1, 2)[:, None].contiguous()
    q, k, v = (tokens.clone().requires_grad_() for _ in range(3))

    def step():
        from contextlib import nullcontext

        from torch.nn.attention import sdpa_kernel

        for x in (q, k, v):
            x.grad = None
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(g)

    return step


def _measure_layer(step, repeats: int) -> dict:
    tensors, arrays = common.host_peak_bytes(step)  # its first call is the warm-up
    median, times = _median_s(step, repeats)
    return {"median_s": median, "times_s": times, "peak_mib": (tensors + arrays) / 2**20, "tensor_mib": tensors / 2**20,
            "array_mib": arrays / 2**20}  # fmt: skip


def run_layer(shape, repeats: int, large_repeats: int) -> dict:
    """psal and SDPA at ``shape = (1, C, T, H, W)``, then psal alone at (T, H, W) doubled and
    SDPA extrapolated there."""
    backend, label = _sdpa_backend()
    _, C, T, H, W = shape
    res: dict = {"sdpa_backend": label, "sizes": []}
    for i, (t, h, w) in enumerate([(T, H, W), (2 * T, 2 * H, 2 * W)]):
        feat = layer_features(C, t, h, w)
        grad = torch.randn(feat.shape, generator=torch.Generator().manual_seed(1))
        row: dict = {"shape": [1, C, t, h, w], "tokens": t * h * w}
        print(f"  layer {tuple(row['shape'])}: psal ...", file=sys.stderr, flush=True)
        row["psal"] = _measure_layer(_psal_step(feat, grad), repeats if i == 0 else large_repeats)
        if i == 0:
            print(f"  layer {tuple(row['shape'])}: sdpa ...", file=sys.stderr, flush=True)
            row["sdpa"] = _measure_layer(_sdpa_step(feat, grad, backend), repeats)
            first = row
        else:
            n = row["tokens"] / first["tokens"]
            row["sdpa"] = {"median_s": first["sdpa"]["median_s"] * n**2, "peak_mib": first["sdpa"]["peak_mib"] * n,
                           "extrapolated_from": first["shape"]}  # fmt: skip
        row["speedup"] = row["sdpa"]["median_s"] / row["psal"]["median_s"]
        row["memory_ratio"] = row["psal"]["peak_mib"] / max(row["sdpa"]["peak_mib"], 1e-9)
        res["sizes"].append(row)
        del feat, grad
    first = res["sizes"][0]
    res["goal"] = {
        "speedup_at_least": GOAL_SPEEDUP,
        "memory_ratio_at_most": GOAL_MEMORY,
        "speedup": first["speedup"],
        "memory_ratio": first["memory_ratio"],
        "holds": first["speedup"] >= GOAL_SPEEDUP and first["memory_ratio"] <= GOAL_MEMORY,
    }
    return res


def layer_report(res: dict) -> str:
    rows = []
    for r in res["sizes"]:
        mark = " (extrapolated)" if "extrapolated_from" in r["sdpa"] else ""
        rows.append([
            "(" + ", ".join(map(str, r["shape"])) + ")", str(r["tokens"]), f"{r['psal']['median_s']:.2f}",
            f"{r['sdpa']['median_s']:.2f}{mark}", f"{r['speedup']:.1f}x", f"{r['psal']['peak_mib']:.0f}",
            f"{r['sdpa']['peak_mib']:.0f}{mark}", f"{r['memory_ratio']:.2f}",
        ])  # fmt: skip
    header = ["shape", "tokens N", "psal s", "SDPA s", "SDPA s / psal s", "psal MiB", "SDPA MiB", "psal MiB / SDPA MiB"]
    g = res["goal"]
    shape = "(" + ", ".join(map(str, res["sizes"][0]["shape"])) + ")"
    goal = (
        f"Goal at {shape}: psal at least {g['speedup_at_least']:.0f}x faster than SDPA and at most "
        f"{g['memory_ratio_at_most']:.2f} of its memory; measured {g['speedup']:.1f}x and {g['memory_ratio']:.2f}: "
        + ("holds." if g["holds"] else "does not hold.")
    )
    return (
        f"**Layer forward + backward** (PSAttention(patch_size=3, num_neighbors=4) against "
        f"scaled_dot_product_attention, 1 head, d = C, float32, CPU; SDPA backend: {res['sdpa_backend']}; "
        "median of the timed runs after a warm-up; peak MiB: of the tensors allocated (profiler) plus of numba's "
        "numpy arrays (tracemalloc), each over the level before the call)\n\n" + common.markdown_table(header, rows) + "\n\n" + goal
    )


# ----------------------------------------------------------------------------------------------
# The suite.


def summarize(records: list[dict], methods: list[str]) -> tuple[list[dict], dict]:
    """Per method the means over the cases that every method completed, and the goals."""
    cases = [(v, h) for v, h in dict.fromkeys((r["video"], r["hole"]) for r in records)]
    by = {(r["video"], r["hole"], r["method"]): r for r in records}
    common_cases = [c for c in cases if all((c[0], c[1], m) in by for m in methods)]
    keys = ("hole_psnr_db", "patch_swd", "flicker", "seconds_per_frame", "peak_mib", "peak_over_rest_mib")
    summary: list[dict[str, Any]] = []
    for m in methods:
        rs = [by[(c[0], c[1], m)] for c in common_cases]
        if rs:
            summary.append({"method": m, "cases": len(rs), **{k: statistics.fmean(r[k] for r in rs) for k in keys}})
    means: dict[str, Any] = {s["method"]: s for s in summary}
    goals: dict = {"cases": len(common_cases), "psnr_margin_db_at_least": GOAL_PSNR_DB, "flicker_ratio_at_most": GOAL_FLICKER}
    frame = [m for m in FRAME_METHODS if m in means]
    if "psal-video" in means and frame:
        best = max(frame, key=lambda m: means[m]["hole_psnr_db"])
        calm = min(frame, key=lambda m: means[m]["flicker"])
        ours = means["psal-video"]
        goals.update(
            best_frames_method=best,
            psnr_margin_db=ours["hole_psnr_db"] - means[best]["hole_psnr_db"],
            least_flicker_frames_method=calm,
            flicker_ratio=ours["flicker"] / max(means[calm]["flicker"], 1e-12),
        )
        goals["psnr_holds"] = goals["psnr_margin_db"] >= GOAL_PSNR_DB
        goals["flicker_holds"] = goals["flicker_ratio"] <= GOAL_FLICKER
    return summary, goals


def cases_report(records: list[dict]) -> str:
    rows = [[r["video"], r["hole"], f"{100 * r['hole_share']:.1f}", r["method"], f"{r['hole_psnr_db']:.2f}", f"{r['patch_swd']:.2f}",
             f"{r['flicker']:.4f}", f"{r['seconds_per_frame']:.3f}", f"{r['peak_mib']:.0f}", f"{r['peak_over_rest_mib']:.0f}"]
            for r in records]  # fmt: skip
    header = ["video", "hole", "hole %", "method", "hole PSNR dB", "patch-SWD", "flicker", "s/frame", "peak MiB", "+MiB"]
    return common.markdown_table(header, rows)


def summary_report(summary: list[dict], goals: dict) -> str:
    ref = next((s for s in summary if s["method"] == "psal-video"), None)
    rows = []
    for s in summary:
        ratio = f"{s['seconds_per_frame'] / ref['seconds_per_frame']:.2f}" if ref else ""
        rows.append([s["method"], str(s["cases"]), f"{s['hole_psnr_db']:.2f}", f"{s['patch_swd']:.2f}", f"{s['flicker']:.4f}",
                     f"{s['seconds_per_frame']:.3f}", ratio, f"{s['peak_mib']:.0f}", f"{s['peak_over_rest_mib']:.0f}"])  # fmt: skip
    header = ["method", "cases", "hole PSNR dB", "patch-SWD", "flicker", "s/frame", "time / psal-video", "peak MiB", "+MiB"]
    text = common.markdown_table(header, rows)
    if "psnr_holds" in goals:
        text += (
            f"\n\nGoals of issue 30 (means over the {goals['cases']} cases): psal-video's hole PSNR at least "
            f"{goals['psnr_margin_db_at_least']:.0f} dB above the best frame-by-frame method ({goals['best_frames_method']}): "
            f"{goals['psnr_margin_db']:+.2f} dB, {'holds' if goals['psnr_holds'] else 'does not hold'}; its flicker at most "
            f"{goals['flicker_ratio_at_most']:.1f} x the least flickering frame-by-frame method's ({goals['least_flicker_frames_method']}): "
            f"{goals['flicker_ratio']:.2f} x, {'holds' if goals['flicker_holds'] else 'does not hold'}."
        )
    else:
        text += "\n\nGoals of issue 30: not evaluated (psal-video or every frame-by-frame method missing)."
    return text


def write_strip(path: str, video_kind: str, hole_kind: str, W: int, H: int, T: int, seed: int, frames=(0.25, 0.5, 0.75)) -> None:
    """A picture of one case: a row per frame shown (at these fractions of the clip), each row
    input (the hole grey) | psal-video | psal-frames | truth."""
    from psal import images

    truth = make_video(video_kind, W, H, T)
    hole = make_hole(hole_kind, W, H, T)
    shown = torch.where(hole[None, None], torch.full_like(truth, 0.5), truth)
    outs = [fill(m, shown, hole, seed) for m in ("psal-video", "psal-frames")]
    rows = []
    for f in frames:
        t = min(T - 1, int(round(f * (T - 1))))
        row = images.side_by_side([x[:, :, t] for x in (shown, *outs, truth)], height=2 * H)
        rows += [row, torch.ones(1, 3, 4, row.shape[-1])]
    images.save_png(torch.cat(rows[:-1], 2), path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench video", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write video.md and video.json into this folder")
    ap.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None, help="frame size (default: 160 120)")
    ap.add_argument("--frames", type=int, default=None, help="frames per video (default: 24)")
    ap.add_argument("--videos", nargs="+", default=None, choices=VIDEOS, help=f"default: {' '.join(VIDEOS)}")
    ap.add_argument("--holes", nargs="+", default=None, choices=HOLES, help=f"default: {' '.join(HOLES)}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", action=argparse.BooleanOptionalAction, default=True, help="the layer section (default: on)")
    ap.add_argument("--layer-shape", type=int, nargs=4, metavar=("C", "T", "H", "W"), default=None,
                    help="first layer size (default: 64 8 64 64); the second doubles T, H and W")  # fmt: skip
    ap.add_argument("--layer-repeats", type=int, default=3, help="timed runs at the first layer size (after a warm-up)")
    ap.add_argument("--large-repeats", type=int, default=1,
                    help="timed psal runs at the second layer size (after a warm-up; one takes minutes on 2 cores)")  # fmt: skip
    ap.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                    help="the 3-D search against exact k-NN on small crops of the videos (default: on)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, for the test of the command")
    ap.add_argument("--strip", metavar="PNG", help="also write a picture of the first case: input | psal-video | psal-frames | truth")
    args = ap.parse_args(argv)
    tiny = args.dry_run
    args.size = args.size or ([40, 32] if tiny else [160, 120])
    args.frames = args.frames or (6 if tiny else 24)
    args.videos = args.videos or (["pan"] if tiny else list(VIDEOS))
    args.holes = args.holes or (["disc"] if tiny else list(HOLES))
    args.layer_shape = args.layer_shape or ([8, 2, 8, 8] if tiny else [64, 8, 64, 64])
    W, H = args.size
    T = args.frames

    notes, methods = [], []
    for m in args.methods:
        if m in _PEER and not peers.available(_PEER[m]):
            notes.append(
                f"{m} skipped: {_PEER[m]} does not import here (pip install 'psal[bench]': pypatchmatch, opencv-contrib-python-headless)"
            )
        else:
            methods.append(m)
    parts = [common.environment()]
    print(parts[0])
    for n in notes:
        print(f"  ({n})", file=sys.stderr)
    head = (
        f"\n**Video inpainting** ({W} x {H}, {T} frames, seed {args.seed}; one process per case and method; "
        "peak MiB: the process's maximum resident set; +MiB: during the fill, over the level before it)\n"
    )
    print(head, flush=True)
    records: list[dict] = []
    started = time.perf_counter()
    for v in args.videos:
        for h in args.holes:
            for m in methods:
                r = common.run_script(_CHILD, [v, h, str(W), str(H), str(T), m, str(args.seed)], f"{v} {h} {m}")
                if r is not None:
                    records.append(r)
                    print(f"  {v} {h} {m}: {r['hole_psnr_db']:.2f} dB, flicker {r['flicker']:.4f}, {r['seconds']:.1f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
    summary, goals = summarize(records, methods)
    video_text = ""
    if records:
        video_text = "\n".join([head, cases_report(records), "", "**Summary** (means over cases)", "", summary_report(summary, goals)])
        print(video_text[len(head) :].lstrip("\n"))
    results: dict = {"cases": records, "summary": summary, "goals": goals, "notes": notes,
                     "cases_seconds": time.perf_counter() - started}  # fmt: skip
    parts.append(video_text)
    parts += [f"({n})" for n in notes]
    if args.search:
        sw, sh, st = (16, 12, 4) if tiny else (48, 36, 8)
        rows = run_search(args.videos, sw, sh, st, ["numba"], args.seed)  # torch: the slow reference (tests)
        results["search"] = rows
        text = search_report(rows, sw, sh, st)
        print("\n" + text)
        parts.append(text)
    if args.layer:
        layer = run_layer([1, *args.layer_shape], args.layer_repeats, args.large_repeats)
        results["layer"] = layer
        text = layer_report(layer)
        print("\n" + text)
        parts.append(text)
    if args.strip:
        write_strip(args.strip, args.videos[0], args.holes[0], W, H, T, args.seed)
    if args.out:
        import os

        from psal.images import write_atomically

        os.makedirs(args.out, exist_ok=True)
        common.write_json(os.path.join(args.out, "video.json"), args, results)
        md = "\n\n".join(p.strip("\n") for p in parts if p) + "\n"
        write_atomically(os.path.join(args.out, "video.md"), lambda f: f.write(md.encode()))
    return 0 if records and len(records) == len(methods) * len(args.videos) * len(args.holes) else 1


if __name__ == "__main__":
    sys.exit(main())
