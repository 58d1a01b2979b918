"""Colour propagation through a video from colour keyframes (psal.apps.colorize_video): the order,
the colours on videos with a known truth (a still video, a pan, two scenes), no drain along the
video, the luminance kept, the working size, and bad input refused with the argument named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gen

from psal.apps.colorize import lab_from_rgb
from psal.apps.colorize_video import colorize_video, propagation_order
from psal.apps.metrics import chroma_psnr

pytest.importorskip("skimage")


def _picture(name: str, size=(48, 64)) -> torch.Tensor:
    from psal import images

    return images.load_bundled(name, size)


def _pan(picture: torch.Tensor, T: int, H: int, W: int, step: int = 1) -> torch.Tensor:
    """``(T, 3, H, W)``: windows of ``picture`` moved ``step`` pixels right and down a frame."""
    return torch.cat([picture[..., t * step : t * step + H, t * step : t * step + W] for t in range(T)])


def test_propagation_order_by_hand():
    # forward from the first keyframe, skipping keyframes, then backward to the start
    assert propagation_order(6, [2]) == [(3, 2), (4, 3), (5, 4), (1, 2), (0, 1)]
    assert propagation_order(5, [0, 3]) == [(1, 0), (2, 1), (4, 3)]
    assert propagation_order(4, [3, 1]) == [(2, 1), (0, 1)]
    assert propagation_order(1, [0]) == []


def test_a_still_video_takes_its_keyframes_colours_everywhere():
    frame = _picture("coffee")
    video = frame.expand(5, 3, 48, 64)  # colour frames: read for their luminance alone
    out = colorize_video(video, [frame], [2], generator=gen(0))
    assert out.shape == (5, 3, 48, 64)
    for t in range(5):
        # measured 45.5-49.0 dB (the keyframe's own frame: 148.7)
        assert chroma_psnr(out[t : t + 1], frame) > 42, t


def test_colour_does_not_drain_along_a_pan_there_and_back():
    """A pan over a colour photograph and back, coloured from its first frame: the last frames
    show what the first ones showed, and are coloured as well (the colours are followed back to
    the keyframe, not copied from copies, which drained them) and far better than with the
    keyframe's mean colour."""
    H, W = 40, 56
    picture = _picture("astronaut", (64, 80))
    steps = list(range(9)) + list(range(8, -1, -1))  # 18 frames, 2 pixels a step, there and back
    video = torch.cat([picture[..., 2 * s : 2 * s + H, 2 * s : 2 * s + W] for s in steps])
    out = colorize_video(video, [video[:1]], generator=gen(1))
    psnr = [chroma_psnr(out[t : t + 1], video[t : t + 1]) for t in range(len(steps))]
    first, last = sum(psnr[1:5]) / 4, sum(psnr[-5:-1]) / 4  # the same places: steps 1-4
    # measured first 33.6 dB, last 32.9 (the mean colour: 23.5); the way out dips to 26.4 where
    # the picture's new parts are coloured from matches elsewhere in the keyframe
    assert last > first - 1.5, (first, last)
    mean_colour = lab_from_rgb(video[:1])[:, 1:].mean((2, 3), keepdim=True)
    flat = (lab_from_rgb(video[-5:-1])[:, 1:] - mean_colour).square().mean()
    assert last > float(10 * torch.log10(256.0**2 / flat)) + 5


def test_frames_take_the_colours_of_the_nearest_keyframes_scene():
    """Two scenes one after the other, one keyframe in each: every frame is coloured from its own
    scene's keyframe (the keyframe after a frame is in its library too)."""
    a, b = _picture("coffee"), _picture("chelsea")
    video = torch.cat([a.expand(3, 3, 48, 64), b.expand(3, 3, 48, 64)])
    out = colorize_video(video, [b, a], [5, 0], temporal=0.0, generator=gen(2))
    for t in range(6):
        truth = a if t < 3 else b
        # measured 43.0-46.8 dB (against 21.6-21.8 dB for the other scene's colours)
        assert chroma_psnr(out[t : t + 1], truth) > 38, t


def test_keeps_the_luminance_and_works_at_a_smaller_size():
    T, H, W = 4, 40, 56
    video = _pan(_picture("astronaut", (60, 80)), T, H, W)
    out = colorize_video(video, [video[:1]], work_pixels=600, generator=gen(3))
    assert out.shape == (T, 3, H, W)
    L_in, L_out = lab_from_rgb(video)[:, 0], lab_from_rgb(out)[:, 0]
    # the luminance is the frame's own, up to colours clipped to the sRGB gamut
    assert (L_out - L_in).abs().median() < 0.5
    full = colorize_video(video, [video[:1]], generator=gen(3))
    # at a working size of 600 pixels (a quarter of the frame's) the chroma stays close: measured
    # 30.9 dB against 34.3 at full size
    assert chroma_psnr(out[1:], video[1:]) > chroma_psnr(full[1:], video[1:]) - 5


def test_keyframes_of_another_size_are_brought_to_the_frames():
    frame = _picture("coffee")
    big = F.interpolate(frame, size=(96, 128), mode="bilinear")
    out = colorize_video(frame.expand(2, 3, 48, 64), [big], generator=gen(4))
    # measured 36.6 (40.9 with the former luminance-led features); the top-left or central quarter
    # of the big keyframe instead (its content at twice the frame's scale): 26.3 and 25.5
    assert chroma_psnr(out[1:], frame) > 34


def test_re_anchoring_never_moves_a_source_to_a_worse_keyframe_patch():
    """``_anchor`` searches the keyframes from the followed sources: every source's cost against
    the keyframes (recomputed directly by ``psal.patch_costs``) is at most the cost of where it
    started, best first, and sources knocked one pixel off move back toward the true ones."""
    import psal
    from psal.apps.colorize_video import _anchor

    g = gen(6)
    h, w, k = 14, 18, 3
    keys = torch.rand(1, 5, 2, h, w, generator=g, dtype=torch.float64)  # two keyframes
    q = keys[:, :, 1] + 0.01 * torch.rand(1, 5, h, w, generator=g, dtype=torch.float64)  # near keyframe 1
    true = h * w + torch.arange(h * w)  # keyframe 1, same position
    off = true.clone()
    cols = torch.arange(h * w) % w
    off[cols < w - 1] += 1  # one pixel to the right
    start = torch.stack([off, torch.randint(0, 2 * h * w, (h * w,), generator=g), torch.randint(0, 2 * h * w, (h * w,), generator=g)])
    cost, src = _anchor(q, keys, start, 5, gen(7))
    assert cost.shape == src.shape == (k, h * w) and src.dtype == torch.int64
    direct = psal.patch_costs(q[:, :, None], keys, src.view(1, 1, k, 1, h, w), patch_size=(1, 5, 5)).view(k, -1)
    torch.testing.assert_close(cost, direct.to(cost.dtype), rtol=1e-5, atol=1e-6)
    before = psal.patch_costs(q[:, :, None], keys, start.view(1, 1, k, 1, h, w), patch_size=(1, 5, 5)).view(k, -1)
    assert bool((cost[0] <= before.min(0).values + 1e-6).all())  # the best is never worse than the best start
    assert bool((cost[:-1] <= cost[1:] + 1e-6).all())  # best first
    assert float((src[0] == true).double().mean()) > 2 * float((off == true).double().mean())


def test_progress_counts_every_frame():
    video = _picture("coffee").expand(4, 3, 48, 64)
    calls = []
    colorize_video(video, [video[:1]], [1], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(frames=torch.rand(2, 2, 8, 8)), ValueError, r"frames must be \(T, 1 or 3, H, W\), got \(2, 2, 8, 8\)"),
        (dict(frames=torch.zeros(2, 1, 8, 8, dtype=torch.int64)), TypeError, "frames must be a floating-point tensor"),
        (dict(keyframes=torch.rand(1, 3, 8, 8)), TypeError, "keyframes must be a non-empty list"),
        (dict(keyframes=[]), TypeError, "keyframes must be a non-empty list"),
        (
            dict(keyframes=[torch.rand(1, 1, 8, 8)]),
            ValueError,
            r"keyframes\[0\] must be a colour picture \(1, 3, H, W\), got \(1, 1, 8, 8\)",
        ),
        (dict(key_indices=[0, 1]), ValueError, r"key_indices must give one frame per keyframe \(1\)"),
        (dict(key_indices=[2]), ValueError, r"key_indices must be frames of the video, 0 to 1, got \[2\]"),
        (dict(keyframes=[torch.rand(1, 3, 8, 8)] * 2, key_indices=[1, 1]), ValueError, "key_indices must be distinct"),
        (dict(temporal=1.0), ValueError, r"temporal must be a number in \[0, 1\)"),
        (dict(temperature_scale=0), ValueError, "temperature_scale must be a positive number"),
        (dict(work_pixels=0), ValueError, "work_pixels must be a positive int or None"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(kwargs, error, match):
    args = dict(frames=torch.rand(2, 1, 8, 8), keyframes=[torch.rand(1, 3, 8, 8)], key_indices=[0])
    args.update(kwargs)
    frames, keyframes, key_indices = args.pop("frames"), args.pop("keyframes"), args.pop("key_indices")
    with pytest.raises(error, match=match):
        colorize_video(frames, keyframes, key_indices, **args)
