"""Video files and folders of frames, for ``psal inpaint VIDEO MASK -o OUT``: read a video as one
tensor, read its mask, and write the result without ever leaving half of it behind.

A video is a file (``.mp4 .avi .mov .mkv .webm``, through PyAV: install the ``video`` extra) or a
folder of pictures, one per frame, in sorted file-name order (PNG, JPEG, TIFF, BMP or WebP,
through Pillow). Every problem with an input is a :class:`ValueError` of one line that names it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from fractions import Fraction

import torch

from psal.images import _need, _pillow_image, grayscale, write_atomically

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# The pictures of a folder of frames (and of a one-picture mask); other files are skipped.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# The frame rate of a folder of frames, which has none of its own.
FOLDER_FPS = 25.0

# Muxer, and encoders in order of preference, for each video suffix.
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
_ENCODERS = {
    ".mp4": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".avi": ("mpeg4", "mjpeg"),
    ".webm": ("libvpx-vp9", "libvpx"),
}
# Encoder options: high quality (x264's CRF 18 is "visually lossless"; MPEG-4 Part 2 and MJPEG
# held to fine quantisers, since their default bit rate is far too low; VP9 in constant quality).
_OPTIONS = {
    "libx264": {"crf": "18", "preset": "medium"},
    "mpeg4": {"qmin": "1", "qmax": "3"},
    "mjpeg": {"qmin": "1", "qmax": "3"},
    "libvpx-vp9": {"crf": "30", "b": "0", "row-mt": "1"},
    "libvpx": {"crf": "10", "b": "2M"},
}


def _av():
    return _need("av", "video")


def is_video_path(path) -> bool:
    """Whether ``path`` names a video file by its extension (one of :data:`VIDEO_SUFFIXES`, in any
    case); the file need not exist. A folder of frames is not a video *path*: see :func:`read_video`.
    """
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_SUFFIXES


def _is_picture_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in PICTURE_SUFFIXES


def _size_text(n: float) -> str:
    """Bytes in decimal units with one decimal: ``14.9 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _check_budget(path: str, frames: int, C: int, H: int, W: int, max_bytes: int | None, at_least: bool = False) -> None:
    """Refuse ``frames`` frames of ``C x H x W`` float32 above ``max_bytes``."""
    need = frames * C * H * W * 4
    if max_bytes is not None and need > max_bytes:
        count = f"at least {frames}" if at_least else f"{frames}"
        raise ValueError(
            f"{path}: {W}x{H}, {count} frames would take {_size_text(need)} as float32, more than the {_size_text(max_bytes)} allowed"
        )


def read_video(path, *, gray: bool = False, max_bytes: int | None = None) -> tuple[torch.Tensor, float]:
    """The frames of a video file or of a folder of pictures, and its frame rate.

    A folder's pictures (:data:`PICTURE_SUFFIXES`, in any case) are its frames in sorted file-name
    order (plain string order: number them with zero padding); hidden files and files of other
    extensions are skipped. Alpha channels are dropped, palette, CMYK and 1-bit pictures are
    converted to RGB, and 16-bit pictures are scaled by 65535.

    Args:
        path: a video file (:data:`VIDEO_SUFFIXES`, decoded with PyAV) or a folder of frames.
        gray: one luma channel (ITU-R BT.601 weights, as :func:`psal.images.grayscale`) instead of RGB.
        max_bytes: refuse a video whose float32 frames would take more bytes than this: from the
            frame count and size before any pixel is decoded where the container records the
            count (MP4, MOV, AVI; always for a folder), else as soon as decoding passes it.
            ``None``: no limit.

    Returns:
        ``(frames, fps)``: ``frames`` is float32 ``Tensor[T, C, H, W]`` in ``[0, 1]``, C = 3 (or 1
        with ``gray``); ``fps`` is the stream's average frame rate (:data:`FOLDER_FPS` for a folder).

    Raises:
        ValueError: one line naming ``path``: missing path, unknown extension, unreadable or
            corrupt file, no video stream, no frames, an empty folder, frames of different sizes,
            or more than ``max_bytes``.
        ImportError: PyAV (for a video file) or Pillow is not installed.
    """
    path = os.fspath(path)
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"read_video: max_bytes must be positive or None, got {max_bytes!r}")
    if os.path.isdir(path):
        return _read_folder(path, gray, max_bytes), FOLDER_FPS
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if not is_video_path(path):
        ext = os.path.splitext(path)[1] or "no extension"
        raise ValueError(f"{path}: not a video ({ext}); give a {', '.join(VIDEO_SUFFIXES)} file or a folder of frames")
    return _read_file(path, gray, max_bytes)


def _to_channels(frame: torch.Tensor, gray: bool) -> torch.Tensor:
    """``Tensor[1, C, H, W]`` with C = 1 or 3 -> C = 1 if ``gray`` else 3."""
    if gray and frame.shape[1] == 3:
        return grayscale(frame)
    if not gray and frame.shape[1] == 1:
        return frame.expand(1, 3, *frame.shape[-2:])
    return frame


def _picture_tensor(img) -> torch.Tensor:
    """An open Pillow image as float32 ``Tensor[1, C, H, W]`` in ``[0, 1]``, C = 1 or 3."""
    np = _need("numpy", "video")
    mode = img.mode
    if mode.startswith("I"):  # 16-bit ("I;16", "I;16B", ...) and 32-bit integer grayscale
        array = (np.asarray(img, dtype=np.float64) / 65535.0).clip(0, 1)
    elif mode == "F":
        array = np.asarray(img, dtype=np.float64).clip(0, 1)
    elif mode in ("1", "L", "LA"):
        array = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    else:  # RGB, RGBA (alpha dropped), palette (through RGBA: a transparent palette entry warns otherwise), CMYK, YCbCr, ...
        if mode in ("P", "PA"):
            img = img.convert("RGBA")
        array = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    t = torch.from_numpy(array).float()
    if t.dim() == 2:
        t = t[..., None]
    return t.permute(2, 0, 1)[None]


def _frame_names(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and _is_picture_name(n) and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise ValueError(f"{path}: no frames in the folder (pictures named {', '.join(PICTURE_SUFFIXES)})")
    return names


def _open_picture(file: str):
    Image = _need("PIL.Image", "video")
    try:
        return Image.open(file)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        raise ValueError(f"{file}: not a readable picture ({exc})") from None


def _read_folder(path: str, gray: bool, max_bytes: int | None) -> torch.Tensor:
    """The frames of a folder of pictures; sizes and the byte budget checked from the headers first."""
    files = [os.path.join(path, n) for n in _frame_names(path)]
    W, H = None, None
    for file in files:  # Pillow reads headers only until load()
        with _open_picture(file) as img:
            if W is None:
                (W, H), first = img.size, file
            elif img.size != (W, H):
                raise ValueError(
                    f"{path}: {os.path.basename(file)} is {img.size[0]}x{img.size[1]}, but {os.path.basename(first)} is {W}x{H}"
                )
    if W is None or H is None:  # _frame_names refuses a folder without pictures
        raise ValueError(f"{path}: no picture frames in this folder")
    C = 1 if gray else 3
    _check_budget(path, len(files), C, H, W, max_bytes)
    out = torch.empty(len(files), C, H, W)
    for i, file in enumerate(files):
        with _open_picture(file) as img:
            try:
                img.load()
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"{file}: not a readable picture ({exc})") from None
            out[i] = _to_channels(_picture_tensor(img), gray)[0]
    return out


def _read_file(path: str, gray: bool, max_bytes: int | None) -> tuple[torch.Tensor, float]:
    """The frames of a video file, decoded with PyAV."""
    av = _av()
    np = _need("numpy", "video")
    C = 1 if gray else 3
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{path}: not a readable video ({exc})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else FOLDER_FPS
        W, H = stream.codec_context.width, stream.codec_context.height
        if stream.frames > 0 and W > 0 and H > 0:
            _check_budget(path, stream.frames, C, H, W, max_bytes)
        decoded: list = []  # uint8 (H, W, 3) arrays: a quarter of the float32 result
        try:
            for frame in container.decode(stream):
                if not decoded:
                    W, H = frame.width, frame.height
                elif (frame.width, frame.height) != (W, H):
                    raise ValueError(f"{path}: frame {len(decoded)} is {frame.width}x{frame.height}, but frame 0 is {W}x{H}")
                decoded.append(frame.to_ndarray(format="rgb24"))
                _check_budget(path, len(decoded), C, H, W, max_bytes, at_least=True)
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"{path}: not a readable video, after {len(decoded)} frames ({exc})") from None
    if not decoded:
        raise ValueError(f"{path}: the video has no frames")
    out = torch.empty(len(decoded), C, H, W)
    for i, array in enumerate(decoded):
        rgb = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float().div_(255.0)
        out[i] = _to_channels(rgb, gray)[0]
        decoded[i] = None  # free as we go
    return out, fps


def read_mask_frames(path, num_frames: int, size) -> torch.Tensor:
    """The hole mask of a video: a video file, a folder of mask frames, or one picture that
    holds for every frame.

    Args:
        path: a video file, a folder of pictures (as :func:`read_video` reads them), or one picture
            (:data:`PICTURE_SUFFIXES`).
        num_frames: the number of frames of the video, which a video or folder mask must have.
        size: ``(H, W)`` of the video's frames, which the mask must have.

    Returns:
        bool ``Tensor[num_frames, H, W]``: True where the mask's luminance is above 0.5 (a hole);
        an alpha channel is ignored.

    Raises:
        ValueError: one line naming ``path``: the errors of :func:`read_video`, a mask whose
            frame count is not ``num_frames``, or whose size is not ``size``.
    """
    path = os.fspath(path)
    H, W = (int(s) for s in size)
    if num_frames < 1:
        raise ValueError(f"read_mask_frames: num_frames must be at least 1, got {num_frames!r}")
    if not os.path.isdir(path) and _is_picture_name(path):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")
        with _open_picture(path) as img:
            if img.size != (W, H):
                raise ValueError(f"{path}: the mask is {img.size[0]}x{img.size[1]}, the video's frames are {W}x{H}")
            try:
                img.load()
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"{path}: not a readable picture ({exc})") from None
            mask = _to_channels(_picture_tensor(img), gray=True)[0, 0] > 0.5
        return mask.expand(num_frames, H, W).contiguous()
    if os.path.isfile(path) and not is_video_path(path):
        ext = os.path.splitext(path)[1] or "no extension"
        raise ValueError(f"{path}: not a mask ({ext}); give a picture, a video ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
    frames, _ = read_video(path, gray=True)
    T, _, h, w = frames.shape
    if (h, w) != (H, W):
        raise ValueError(f"{path}: the mask's frames are {w}x{h}, the video's are {W}x{H}")
    if T != num_frames:
        raise ValueError(f"{path}: the mask has {T} frames, the video has {num_frames}")
    return frames[:, 0] > 0.5


def _frame_uint8(frames: torch.Tensor, i: int):
    """Frame ``i`` of ``Tensor[T, C, H, W]`` as a uint8 ``(H, W, 3)`` array (gray repeated)."""
    frame = frames[i].detach().to("cpu", torch.float64).clamp(0, 1).mul(255).round().to(torch.uint8)
    if frame.shape[0] == 1:
        frame = frame.expand(3, -1, -1)
    return frame.permute(1, 2, 0).contiguous().numpy()


def _check_frames(path: str, frames, fps) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] not in (1, 3) or not frames.is_floating_point():
        what = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"write_video: frames must be a float Tensor[T, C, H, W] with C = 1 or 3, got {what}")
    if frames.shape[0] == 0 or frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError(f"write_video: no frames to write to {path} (shape {tuple(frames.shape)})")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"write_video: fps must be a positive number, got {fps!r}")


def write_video(path, frames: torch.Tensor, fps: float) -> None:
    """Write frames as a video file or as a folder of PNG frames, atomically.

    A path with a video extension (:data:`VIDEO_SUFFIXES`) is encoded with PyAV, in yuv420p, at
    high quality: ``.mp4``, ``.mov`` and ``.mkv`` with H.264 (libx264, CRF 18; MPEG-4 Part 2 where
    PyAV lacks libx264), tagged BT.709; ``.avi`` with MPEG-4 Part 2 (else MJPEG), BT.601 (AVI has
    no colour tags, and readers assume BT.601); ``.webm`` with VP9 (else VP8). yuv420p needs an
    even width and height: an odd one is padded by repeating the last row or column, so such a
    video reads back one pixel taller or wider. Any other path is a folder, which must not exist
    or be empty, of 8-bit PNG frames ``frame_00000.png``, ``frame_00001.png``, ... (at least five
    digits); ``fps`` is not recorded there.

    The video is written beside ``path`` (a hidden temporary file or folder) and renamed into
    place once complete: on any error, or KeyboardInterrupt, the temporary is removed and nothing
    is left at ``path``.

    Args:
        path: the video file or folder to write.
        frames: float ``Tensor[T, C, H, W]`` in ``[0, 1]`` (clamped), C = 1 (gray) or 3 (RGB).
        fps: frames per second, positive.

    Raises:
        ValueError: bad ``frames`` or ``fps``, a missing parent folder, a picture file name
            (``out.png``: give a folder or a video name), an existing folder that is not empty
            or an existing file where the folder would go.
        ImportError: PyAV (for a video file) or Pillow is not installed.
    """
    path = os.fspath(path)
    _check_frames(path, frames, fps)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: the folder {parent} does not exist")
    if is_video_path(path):
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a folder; give a new file name for the video")
        av = _av()
        write_atomically(path, lambda f: _encode(av, f, os.path.splitext(path)[1].lower(), frames, fps))
    else:
        if _is_picture_name(path):
            raise ValueError(f"{path}: a picture's name; write_video writes a video ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
        _write_folder(path, parent, frames)


def _encoder(av, suffix: str) -> str:
    """The first encoder of :data:`_ENCODERS` that this PyAV build has."""
    for name in _ENCODERS[suffix]:
        try:
            av.Codec(name, "w")
        except Exception:  # av.codec.codec.UnknownCodecError, whose module moves between versions
            continue
        return name
    raise ValueError(f"this PyAV build has no encoder for {suffix} ({' or '.join(_ENCODERS[suffix])})")


def _encode(av, file, suffix: str, frames: torch.Tensor, fps: float) -> None:
    """Encode ``frames`` into the open binary ``file`` as a ``suffix`` video."""
    codec = _encoder(av, suffix)
    T, _, H, W = frames.shape
    pad_h, pad_w = H % 2, W % 2  # yuv420p: even sizes
    bt709 = suffix != ".avi"
    with av.open(file, mode="w", format=_CONTAINERS[suffix]) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = W + pad_w, H + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_OPTIONS[codec])
        cc = stream.codec_context
        cc.color_range = 1  # MPEG ("tv") range: what yuv420p decoders expect
        if bt709:
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709 (sRGB's primaries)
        for i in range(T):
            array = _frame_uint8(frames, i)
            if pad_h or pad_w:
                np = _need("numpy", "video")
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709" if bt709 else "ITU601", dst_color_range="MPEG"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def _write_folder(path: str, parent: str, frames: torch.Tensor) -> None:
    """``frames`` as PNG files in a hidden sibling folder, renamed to ``path`` once all are written."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path}: exists and is not a folder")
        if os.listdir(path):
            raise ValueError(f"{path}: the folder is not empty; give a new or empty folder, so that frames do not mix")
    T = frames.shape[0]
    digits = max(5, len(str(T - 1)))
    tmp = tempfile.mkdtemp(prefix=".psal-", dir=parent)
    try:
        for i in range(T):
            _pillow_image(frames[i], "PNG", 8, "write_video").save(os.path.join(tmp, f"frame_{i:0{digits}d}.png"), format="PNG")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, path)  # POSIX: replaces an empty folder in one step
        except OSError:
            if not os.path.isdir(path) or os.listdir(path):
                raise
            os.rmdir(path)  # Windows will not rename onto a folder
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
