"""Video inpainting (psal.apps.inpaint_video): against the truth of videos made from pictures moved
by known motion, against frame-by-frame picture inpainting on the same video, and its contract
(known pixels kept bit for bit, determinism, windows, progress, bad input)."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

from psal.apps.inpaint import inpaint
from psal.apps.inpaint_video import inpaint_video

pytest.importorskip("skimage")
from psal import images  # noqa: E402


def pan_with_disc(size: int = 64, frames: int = 8, radius: float = 0.12):
    """A camera pan over a photograph (1 row, 2 columns a frame) and a disc-shaped occluder moving
    across it: the video ``(1, 3, T, size, size)`` and its hole ``(T, size, size)``."""
    picture = images.load_bundled("astronaut", 2 * size)[0]
    video = torch.stack([picture[:, 10 + t : 10 + t + size, 5 + 2 * t : 5 + 2 * t + size] for t in range(frames)], 1)[None]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    hole = torch.stack([(yy - size * 0.5) ** 2 + (xx - size * (0.3 + 0.05 * t)) ** 2 < (size * radius) ** 2 for t in range(frames)])
    return video.contiguous(), hole


def hole_psnr(out, truth, hole):
    m = hole[None, None].expand_as(out)
    return float(10 * torch.log10(1 / ((out - truth)[m] ** 2).mean()))


def flicker(out, truth, hole):
    """Mean |change of the fill from frame to frame - change of the truth| inside the hole."""
    d = (out[:, :, 1:] - out[:, :, :-1]) - (truth[:, :, 1:] - truth[:, :, :-1])
    m = (hole[1:] | hole[:-1])[None, None].expand_as(d)
    return float(d.abs()[m].mean())


def test_fills_a_moving_hole_from_the_other_frames():
    """The background behind a moving disc is visible in other frames: the space-time fill finds
    it (measured 28 dB in the hole) where each frame alone must invent it (14 dB), and it
    flickers far less (0.008 against 0.13)."""
    video, hole = pan_with_disc()
    noisy = video.clone()
    noisy[hole[None, None].expand_as(video)] = 0.5  # what is under the hole must not matter
    out = inpaint_video(noisy, hole, generator=gen(0))
    assert out.shape == video.shape and out.dtype == video.dtype
    keep = ~hole[None, None].expand_as(video)
    assert torch.equal(out[keep], noisy[keep]), "known pixels must be the input's, bit for bit"
    assert bool(((out >= 0) & (out <= 1)).all())
    frames = torch.stack([inpaint(noisy[:, :, t], hole[t], generator=gen(0))[0] for t in range(video.shape[2])], 1)[None]
    ours, theirs = hole_psnr(out, video, hole), hole_psnr(frames, video, hole)
    assert ours > 24 and ours > theirs + 5, (ours, theirs)
    assert flicker(out, video, hole) < 0.5 * flicker(frames, video, hole)


def test_deterministic_and_windowed():
    """The same seed gives the same fill; a video longer than its window is filled window by
    window, each starting on the previous one's last frames, and still from the other frames."""
    video, hole = pan_with_disc(48, 10)
    a = inpaint_video(video, hole, generator=gen(1), window=6, overlap=2, num_iters=3)
    b = inpaint_video(video, hole, generator=gen(1), window=6, overlap=2, num_iters=3)
    assert torch.equal(a, b)
    keep = ~hole[None, None].expand_as(video)
    assert torch.equal(a[keep], video[keep])
    assert hole_psnr(a, video, hole) > 20


def test_out_and_in_place_give_the_same_fill():
    """``out=`` a tensor of the video's shape, or the video itself (filled in place, as the command
    line does with the frames it read, through a transposed view): the same fill as a new
    tensor, bit for bit, and the input is left as it was when ``out`` is another tensor."""
    video, hole = pan_with_disc(40, 6)
    want = inpaint_video(video, hole, generator=gen(3), num_iters=2)
    before = video.clone()
    into = torch.empty_like(video)
    assert inpaint_video(video, hole, generator=gen(3), num_iters=2, out=into) is into
    assert torch.equal(into, want) and torch.equal(video, before)
    frames = video[0].transpose(0, 1).contiguous()  # (T, C, H, W), as psal.videos reads them
    view = frames.transpose(0, 1)[None]
    inpaint_video(view, hole, generator=gen(3), num_iters=2, out=view)
    assert torch.equal(frames.transpose(0, 1)[None], want)


def test_progress_counts_up_to_its_total():
    video, hole = pan_with_disc(32, 6)
    calls = []
    inpaint_video(video, hole, generator=gen(2), window=4, overlap=1, num_iters=2, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    totals = {t for _, t in calls}
    assert len(totals) == 1 and done == sorted(done) and done[-1] == totals.pop()


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(video=torch.rand(3, 4, 16, 16)), ValueError, r"video must have shape \(1, C, T, H, W\), got \(3, 4, 16, 16\)"),
        (
            dict(mask=torch.zeros(4, 16, 15, dtype=torch.bool)),
            ValueError,
            r"\(T, H, W\) = \(4, 16, 16\) of video \(1, 3, 4, 16, 16\), got \(4, 16, 15\)",
        ),
        (dict(mask=torch.zeros(4, 16, 16)), TypeError, r"mask must have dtype torch.bool"),
        (dict(mask=torch.zeros(4, 16, 16, dtype=torch.bool)), ValueError, r"mask \(4, 16, 16\) is empty"),
        (dict(mask=torch.ones(4, 16, 16, dtype=torch.bool)), ValueError, r"covers the whole video"),
        (dict(patch_size=(3, 4, 5)), ValueError, r"patch_size .* odd ints >= 1, got \(3, 4, 5\)"),
        (dict(window=4, overlap=4), ValueError, r"overlap must be smaller than window, got overlap=4, window=4"),
        (dict(video=torch.zeros(1, 3, 4, 16, 16, dtype=torch.int64)), TypeError, r"video must be floating point"),
        (
            dict(out=torch.zeros(1, 3, 4, 16, 15)),
            ValueError,
            r"out must be a tensor of the video's shape \(1, 3, 4, 16, 16\).*got \(1, 3, 4, 16, 15\)",
        ),
        (
            dict(out=torch.zeros(1, 3, 4, 16, 16, dtype=torch.float64)),
            ValueError,
            r"dtype torch.float32 .* got \(1, 3, 4, 16, 16\) torch.float64",
        ),
    ],
)
def test_bad_input_is_refused_with_the_shapes(kwargs, error, pattern):
    hole = torch.zeros(4, 16, 16, dtype=torch.bool)
    hole[:, 5:9, 5:9] = True
    args = dict(video=torch.rand(1, 3, 4, 16, 16), mask=hole) | kwargs
    with pytest.raises(error, match=pattern):
        inpaint_video(args.pop("video"), args.pop("mask"), **args)
