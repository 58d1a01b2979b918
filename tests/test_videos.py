"""psal.videos: round trips through every kind of output, masks in all three forms, one readable
line for every kind of bad input, and outputs that are complete or absent, never half-written."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from psal import videos
from psal.images import grayscale
from psal.videos import VIDEO_SUFFIXES, is_video_path, read_mask_frames, read_video, write_video

Image = pytest.importorskip("PIL.Image")

T, H, W = 10, 36, 52
# Mean absolute error, per channel value in [0, 1], allowed for a lossy round trip of _clip(): the
# codecs' own error on it is about 0.012 (most of it yuv420p's halved colour resolution).
LOSSY = 0.03


def _clip(frames: int = T, size=(H, W), channels: int = 3) -> torch.Tensor:
    """A smooth synthetic video, float32 ``[frames, channels, H, W]`` in [0, 1]: a colour gradient
    drifting right under a soft disc that moves along a diagonal."""
    h, w = size
    y = torch.linspace(0, 1, h).view(h, 1)
    x = torch.linspace(0, 1, w).view(1, w)
    out = []
    for t in range(frames):
        s = t / max(1, frames - 1)
        disc = torch.sigmoid((0.22 - ((x - 0.2 - 0.6 * s) ** 2 + (y - 0.3 - 0.4 * s) ** 2).sqrt()) * 40)
        r = (0.15 + 0.7 * ((x + 0.3 * s) % 1.0)) * (1 - disc) + 0.9 * disc
        g = (0.2 + 0.6 * y).expand(h, w) * (1 - disc) + 0.3 * disc
        b = (0.5 + 0.3 * torch.sin(6 * x + 4 * y + 3 * s)) * (1 - disc) + 0.1 * disc
        out.append(torch.stack([r, g, b]))
    clip = torch.stack(out).clamp(0, 1).float()
    return grayscale(clip) if channels == 1 else clip


def _q(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to 8 bits, as a PNG keeps it. In float64: ``x * 255`` in float32 moves a few
    values of a float32 ``x`` across a rounding tie (7 of the 56,160 of _clip())."""
    return ((x.double() * 255).round() / 255).float()


def _save(path, array) -> None:
    Image.fromarray(array).save(path)


def _disc_masks(frames: int = T, size=(H, W)) -> torch.Tensor:
    """Bool ``[frames, H, W]``: a disc moving right."""
    h, w = size
    y, x = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    return torch.stack([(x - 10 - 3 * t) ** 2 + (y - h // 2) ** 2 < 64 for t in range(frames)])


def _encode_lossless(path, masks: torch.Tensor, fps: int = 25) -> None:
    """Bool masks as a gray FFV1 video (lossless), written with PyAV directly, not with write_video."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = masks.shape[1:]
        stream.pix_fmt = "gray"
        for m in masks:
            frame = av.VideoFrame.from_ndarray(m.numpy().astype(np.uint8) * 255, format="gray")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


# -- folders of frames ---------------------------------------------------------------------------


def test_folder_round_trip_is_exact_after_8bit_rounding(tmp_path):
    clip = _clip()
    out = tmp_path / "frames"
    write_video(out, clip, 25.0)
    assert sorted(os.listdir(out)) == [f"frame_{i:05d}.png" for i in range(T)]
    got, fps = read_video(out)
    assert got.dtype == torch.float32 and got.shape == (T, 3, H, W)
    assert torch.equal(got, _q(clip))
    assert fps == 25.0


def test_folder_round_trip_of_gray_frames(tmp_path):
    clip = _clip(channels=1)
    write_video(tmp_path / "gray", clip, 25.0)
    assert Image.open(tmp_path / "gray" / "frame_00000.png").mode == "L"
    got, _ = read_video(tmp_path / "gray", gray=True)
    assert got.shape == (T, 1, H, W) and torch.equal(got, _q(clip))
    rgb, _ = read_video(tmp_path / "gray")  # one channel read as RGB: the channel three times
    assert rgb.shape == (T, 3, H, W) and torch.equal(rgb, _q(clip).expand(T, 3, H, W))


def test_write_video_fills_an_existing_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    write_video(tmp_path / "empty", _clip(frames=2), 25.0)
    assert sorted(os.listdir(tmp_path / "empty")) == ["frame_00000.png", "frame_00001.png"]
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no temporary left beside it


def test_folder_frames_are_read_in_name_order_skipping_other_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]
    _save(tmp_path / "b.png", rgb[1])
    _save(tmp_path / "a.bmp", rgb[0])
    _save(tmp_path / "C.TIF", rgb[2])  # upper case: sorts first, and its suffix counts
    _save(tmp_path / ".hidden.png", rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))  # another size: must be skipped
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub.png").mkdir()  # a folder named like a picture is not one
    got, fps = read_video(tmp_path)
    expect = torch.from_numpy(np.stack([rgb[2], rgb[0], rgb[1]])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(got, expect) and fps == 25.0


def test_folder_pictures_of_other_modes_are_converted(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA").save(tmp_path / "0.png")  # alpha dropped, not composited
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "1.png")
    sixteen = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "2.png")  # 16-bit grayscale
    smooth = (_clip(frames=1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "3.jpg", quality=95)
    got, _ = read_video(tmp_path)
    assert got.shape == (4, 3, H, W)
    rgb_t = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(got[0], rgb_t)
    pal = torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(got[1], pal)
    grey16 = torch.from_numpy(sixteen.astype(np.float64) / 65535).float()
    assert torch.allclose(got[2], grey16.expand(3, H, W), atol=1e-6)
    smooth_t = torch.from_numpy(smooth).permute(2, 0, 1).float() / 255
    assert _mae(got[3], smooth_t) < LOSSY  # JPEG: lossy, but the same picture
    assert _mae(got[3], smooth_t.flip(-1)) > 0.1


# -- video files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, fps", [(".mp4", 24.0), (".avi", 25.0), (".mov", 30.0), (".mkv", 29.97), (".webm", 12.5)])
def test_video_file_round_trip(tmp_path, suffix, fps):
    pytest.importorskip("av")
    clip = _clip()
    path = tmp_path / f"clip{suffix}"
    write_video(path, clip, fps)
    assert sorted(os.listdir(tmp_path)) == [path.name]
    got, got_fps = read_video(path)
    assert got.dtype == torch.float32 and got.shape == (T, 3, H, W)
    assert got.min() >= 0 and got.max() <= 1
    assert abs(got_fps - fps) < 0.01
    assert _mae(got, clip) < LOSSY
    # in order: each frame is nearest its own original
    assert _mae(got, clip.flip(0)) > 2 * LOSSY
    per_frame = torch.cdist(got.flatten(1), clip.flatten(1), p=1)
    assert torch.equal(per_frame.argmin(1), torch.arange(T))


def test_video_files_use_the_preferred_codecs(tmp_path):
    av = pytest.importorskip("av")
    wanted = {".mp4": "h264", ".avi": "mpeg4", ".webm": "vp9"}
    for suffix, codec in wanted.items():
        if videos._encoder(av, suffix) != videos._ENCODERS[suffix][0]:
            pytest.skip(f"this PyAV build lacks {videos._ENCODERS[suffix][0]}")
        write_video(tmp_path / f"v{suffix}", _clip(frames=2), 25.0)
        with av.open(str(tmp_path / f"v{suffix}")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == codec
            assert stream.codec_context.pix_fmt == "yuv420p"


def test_missing_encoder_falls_back_to_the_next(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    monkeypatch.setitem(videos._ENCODERS, ".mp4", ("no-such-encoder", "mpeg4"))
    write_video(tmp_path / "v.mp4", _clip(), 25.0)
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    assert _mae(read_video(tmp_path / "v.mp4")[0], _clip()) < LOSSY
    monkeypatch.setitem(videos._ENCODERS, ".mp4", ("no-such-encoder",))
    with pytest.raises(ValueError, match=r"no encoder for \.mp4 \(no-such-encoder\)"):
        write_video(tmp_path / "w.mp4", _clip(), 25.0)
    assert not (tmp_path / "w.mp4").exists()


def test_odd_sizes_are_padded_by_repeating_the_last_row_and_column(tmp_path):
    pytest.importorskip("av")
    clip = _clip(size=(H - 1, W - 1))
    write_video(tmp_path / "odd.mp4", clip, 25.0)
    got, _ = read_video(tmp_path / "odd.mp4")
    assert got.shape == (T, 3, H, W)
    assert _mae(got[..., : H - 1, : W - 1], clip) < LOSSY
    assert _mae(got[..., -1, : W - 1], clip[..., -1, :]) < 2 * LOSSY
    assert _mae(got[..., : H - 1, -1], clip[..., :, -1]) < 2 * LOSSY


def test_gray_reading_of_a_video_file_is_the_luma_of_its_rgb(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "v.mp4", _clip(), 25.0)
    rgb, _ = read_video(tmp_path / "v.mp4")
    gray, fps = read_video(tmp_path / "v.mp4", gray=True)
    assert gray.shape == (T, 1, H, W) and fps == 25.0
    assert torch.allclose(gray, grayscale(rgb), atol=1e-6)


def test_gray_frames_write_to_a_video_file(tmp_path):
    pytest.importorskip("av")
    clip = _clip(channels=1)
    write_video(tmp_path / "g.mkv", clip, 25.0)
    got, _ = read_video(tmp_path / "g.mkv", gray=True)
    assert got.shape == (T, 1, H, W) and _mae(got, clip) < LOSSY


def test_an_existing_video_is_replaced_whole(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "v.mp4"
    write_video(path, _clip(frames=3), 25.0)
    write_video(path, _clip(frames=5), 10.0)
    got, fps = read_video(path)
    assert got.shape[0] == 5 and abs(fps - 10.0) < 0.01
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]


# -- masks ---------------------------------------------------------------------------------------


def test_mask_from_one_picture_holds_for_every_frame_and_ignores_alpha(tmp_path):
    luma = np.zeros((H, W), np.uint8)
    luma[5:15, 10:30] = 255
    luma[20, :] = 127  # 0.498: not a hole
    luma[21, :] = 128  # 0.502: a hole
    rgba = np.stack([luma, luma, luma, np.zeros_like(luma)], 2)  # fully transparent: alpha ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    mask = read_mask_frames(tmp_path / "mask.png", T, (H, W))
    expect = torch.from_numpy(luma > 127.5)
    assert mask.dtype == torch.bool and mask.shape == (T, H, W)
    assert all(torch.equal(m, expect) for m in mask)
    assert expect[21].all() and not expect[20].any()


def test_mask_threshold_is_on_luminance(tmp_path):
    picture = np.zeros((H, W, 3), np.uint8)
    picture[:, : W // 2] = (255, 0, 0)  # red: luma 0.299, not a hole
    picture[:, W // 2 :] = (0, 255, 0)  # green: luma 0.587, a hole
    _save(tmp_path / "m.png", picture)
    mask = read_mask_frames(tmp_path / "m.png", 2, (H, W))
    assert not mask[..., : W // 2].any() and mask[..., W // 2 :].all()


def test_mask_from_a_folder_of_frames(tmp_path):
    masks = _disc_masks()
    for i, m in enumerate(masks):
        _save(tmp_path / f"m{i:03d}.png", m.numpy().astype(np.uint8) * 255)
    assert torch.equal(read_mask_frames(tmp_path, T, (H, W)), masks)


def test_mask_from_a_lossless_video(tmp_path):
    masks = _disc_masks()
    _encode_lossless(tmp_path / "m.mkv", masks)
    got = read_mask_frames(tmp_path / "m.mkv", T, (H, W))
    assert got.dtype == torch.bool and torch.equal(got, masks)


def test_mask_from_a_video_written_by_write_video(tmp_path):
    pytest.importorskip("av")
    masks = _disc_masks()
    write_video(tmp_path / "m.mp4", masks[:, None].float(), 25.0)
    got = read_mask_frames(tmp_path / "m.mp4", T, (H, W))
    assert float((got == masks).float().mean()) > 0.995


def test_mask_of_the_wrong_frame_count_or_size_is_refused(tmp_path):
    masks = _disc_masks()
    for i, m in enumerate(masks):
        _save(tmp_path / f"m{i:03d}.png", m.numpy().astype(np.uint8) * 255)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: the mask has 10 frames, the video has 12$"):
        read_mask_frames(tmp_path, 12, (H, W))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: the mask's frames are 52x36, the video's are 52x40$"):
        read_mask_frames(tmp_path, T, (40, W))
    one = tmp_path / "m000.png"
    with pytest.raises(ValueError, match=rf"^{one}: the mask is 52x36, the video's frames are 50x36$"):
        read_mask_frames(one, T, (H, 50))


def test_mask_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.png: no such file or folder"):
        read_mask_frames(tmp_path / "nothing.png", T, (H, W))
    with pytest.raises(ValueError, match=r"nothing\.mp4: no such file or folder"):
        read_mask_frames(tmp_path / "nothing.mp4", T, (H, W))
    (tmp_path / "m.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"m\.gif: not a mask \(\.gif\)"):
        read_mask_frames(tmp_path / "m.gif", T, (H, W))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable picture"):
        read_mask_frames(tmp_path / "broken.png", T, (H, W))


# -- bad inputs ----------------------------------------------------------------------------------


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_missing_path(tmp_path):
    for name in ("gone.mp4", "gone"):
        with pytest.raises(ValueError) as e:
            read_video(tmp_path / name)
        assert _one_line(e) == f"{tmp_path / name}: no such file or folder"


def test_corrupt_video_file(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "x.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        read_video(path)
    assert _one_line(e).startswith(f"{path}: not a readable video (")


def test_truncated_video_file(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "v.avi", _clip(), 25.0)
    data = (tmp_path / "v.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    # what survives of a cut AVI is either decoded (fewer frames) or refused in one line
    try:
        frames, _ = read_video(tmp_path / "cut.avi")
    except ValueError as exc:
        assert str(exc).startswith(f"{tmp_path / 'cut.avi'}: ") and "\n" not in str(exc)
    else:
        assert 0 < frames.shape[0] < T


def test_unknown_extension(tmp_path):
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError) as e:
        read_video(tmp_path / "clip.gif")
    assert _one_line(e).startswith(f"{tmp_path / 'clip.gif'}: not a video (.gif); give a .mp4, .avi")


def test_empty_folder_and_folder_without_pictures(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    _save(tmp_path / "other" / ".hidden.png", np.zeros((4, 4), np.uint8))
    for name in ("empty", "other"):
        with pytest.raises(ValueError) as e:
            read_video(tmp_path / name)
        assert _one_line(e).startswith(f"{tmp_path / name}: no frames in the folder")


def test_folder_of_mixed_sizes_names_the_first_that_differs(tmp_path):
    _save(tmp_path / "f0.png", np.zeros((H, W, 3), np.uint8))
    _save(tmp_path / "f1.png", np.zeros((H, W, 3), np.uint8))
    _save(tmp_path / "f2.png", np.zeros((H, W + 2, 3), np.uint8))
    _save(tmp_path / "f3.png", np.zeros((H + 2, W, 3), np.uint8))
    with pytest.raises(ValueError) as e:
        read_video(tmp_path)
    assert _one_line(e) == f"{tmp_path}: f2.png is 54x36, but f0.png is 52x36"


def test_unreadable_picture_in_a_folder(tmp_path):
    _save(tmp_path / "f0.png", np.zeros((H, W, 3), np.uint8))
    (tmp_path / "f1.png").write_bytes(b"not a picture at all")
    with pytest.raises(ValueError) as e:
        read_video(tmp_path)
    assert _one_line(e).startswith(f"{tmp_path / 'f1.png'}: not a readable picture (")


def test_file_without_a_video_stream(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(ValueError) as e:
        read_video(path)
    assert _one_line(e) == f"{path}: no video stream"


def test_video_stream_without_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "none.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 16
        packet = av.Packet(b"\x00\x00\x01\xb6")  # a frame start code and nothing after it: decodes to no frame
        packet.stream, packet.pts, packet.dts, packet.time_base = stream, 0, 0, Fraction(1, 25)
        container.mux(packet)
    with pytest.raises(ValueError) as e:
        read_video(path)
    assert _one_line(e) == f"{path}: the video has no frames"


# -- max_bytes -----------------------------------------------------------------------------------


def test_max_bytes_from_the_frame_count_of_the_container(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "v.mp4", _clip(), 25.0)
    need = T * 3 * H * W * 4  # 224,640 bytes
    with pytest.raises(ValueError) as e:
        read_video(tmp_path / "v.mp4", max_bytes=100_000)
    # the whole count, known before decoding (not "at least")
    assert _one_line(e) == f"{tmp_path / 'v.mp4'}: 52x36, 10 frames would take 224.6 kB as float32, more than the 100.0 kB allowed"
    assert read_video(tmp_path / "v.mp4", max_bytes=need)[0].shape == (T, 3, H, W)  # exactly at the limit: allowed
    with pytest.raises(ValueError, match=r"10 frames would take 74\.9 kB"):  # gray: one channel
        read_video(tmp_path / "v.mp4", gray=True, max_bytes=need // 3 - 1)


def test_max_bytes_stops_decoding_where_the_count_is_unknown(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "v.webm", _clip(), 25.0)  # WebM does not record its frame count
    frame = 3 * H * W * 4
    with pytest.raises(ValueError) as e:
        read_video(tmp_path / "v.webm", max_bytes=3 * frame + frame // 2)
    assert _one_line(e).startswith(f"{tmp_path / 'v.webm'}: 52x36, at least 4 frames would take 89.9 kB as float32")


def test_max_bytes_of_a_folder_is_checked_before_any_picture_is_decoded(tmp_path):
    clip = _clip()
    write_video(tmp_path / "f", clip, 25.0)
    # the last frame's pixels are cut off: decoding it would fail, the headers still read
    last = tmp_path / "f" / "frame_00009.png"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        read_video(tmp_path / "f", max_bytes=200_000)
    assert _one_line(e) == f"{tmp_path / 'f'}: 52x36, 10 frames would take 224.6 kB as float32, more than the 200.0 kB allowed"
    with pytest.raises(ValueError, match="not a readable picture"):
        read_video(tmp_path / "f")


def test_the_size_in_the_message_uses_decimal_units():
    assert videos._size_text(1920 * 1080 * 3 * 4 * 600) == "14.9 GB"
    assert videos._size_text(8e9) == "8.0 GB"
    assert videos._size_text(999) == "999 bytes"
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        read_video("anything", max_bytes=0)


# -- writing: refusals and atomicity -------------------------------------------------------------


def test_a_non_empty_output_folder_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError) as e:
        write_video(out, _clip(frames=2), 25.0)
    assert _one_line(e).startswith(f"{out}: the folder is not empty")
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_bad_outputs_and_arguments_are_refused(tmp_path):
    clip = _clip(frames=2)
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "file", clip, 25.0, "exists and is not a folder"),
        (tmp_path / "out.png", clip, 25.0, "a picture's name"),
        (tmp_path / "no" / "such" / "v.mp4", clip, 25.0, "does not exist"),
        (tmp_path / "v.mp4", clip[0], 25.0, r"frames must be a float Tensor\[T, C, H, W\]"),
        (tmp_path / "v.mp4", clip[:, :2], 25.0, "C = 1 or 3"),
        (tmp_path / "v.mp4", (clip * 255).to(torch.uint8), 25.0, "torch.uint8"),
        (tmp_path / "v.mp4", clip[:0], 25.0, "no frames to write"),
        (tmp_path / "v.mp4", clip, 0.0, "fps must be a positive number"),
        (tmp_path / "v.mp4", clip, float("nan"), "fps must be a positive number"),
    ]
    for path, frames, fps, message in cases:
        with pytest.raises(ValueError, match=message):
            write_video(path, frames, fps)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        write_video(tmp_path / "dir.mp4", clip, 25.0)
    assert sorted(os.listdir(tmp_path)) == ["dir.mp4", "file"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".webm"])
def test_a_video_file_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch, suffix, error):
    pytest.importorskip("av")
    convert = videos._frame_uint8
    done = []

    def fail_at_frame_3(frames, i):
        if i == 3:
            raise error("stop")
        done.append(i)
        return convert(frames, i)

    monkeypatch.setattr(videos, "_frame_uint8", fail_at_frame_3)
    with pytest.raises(error, match="stop"):
        write_video(tmp_path / f"v{suffix}", _clip(), 25.0)
    assert done == [0, 1, 2]  # it failed mid-write, not before
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_previous_video(tmp_path, monkeypatch):
    pytest.importorskip("av")
    path = tmp_path / "v.mp4"
    write_video(path, _clip(frames=4), 25.0)
    before = path.read_bytes()

    def fail(frames, i):
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(videos, "_frame_uint8", fail)
    with pytest.raises(RuntimeError):
        write_video(path, _clip(), 25.0)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["v.mp4"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_folder_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch, error):
    convert = videos._pillow_image
    calls = []

    def fail_at_frame_3(*args):
        if len(calls) == 3:
            raise error("stop")
        calls.append(1)
        return convert(*args)

    monkeypatch.setattr(videos, "_pillow_image", fail_at_frame_3)
    with pytest.raises(error, match="stop"):
        write_video(tmp_path / "frames", _clip(), 25.0)
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []


def test_an_interrupted_write_into_an_empty_folder_leaves_it_empty(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()

    def fail(*args):
        raise RuntimeError("stop")

    monkeypatch.setattr(videos, "_pillow_image", fail)
    with pytest.raises(RuntimeError):
        write_video(tmp_path / "out", _clip(), 25.0)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


# -- names ---------------------------------------------------------------------------------------


def test_is_video_path():
    assert VIDEO_SUFFIXES == (".mp4", ".avi", ".mov", ".mkv", ".webm")
    for name in ("a.mp4", "b.AVI", "dir/c.Mov", "d.mkv", "e.webm"):
        assert is_video_path(name), name
    for name in ("frames", "a.png", "mp4", "a.mp4.txt", ".mp4x"):
        assert not is_video_path(name), name
