"""Image files for the commands and the service: read what people have, write without ever leaving
half a file.

Reading accepts 8-bit and 16-bit grayscale, RGB, palette and CMYK images (converted to float in
``[0, 1]``) and opaque RGBA (the alpha channel dropped); a 16-bit grayscale input gives a 16-bit
result where the output format allows it (PNG, TIFF). It refuses, with one line that names the
file: a missing or unreadable file, an image with real transparency, and an image whose working
set would not fit in the memory available. Writing goes to a temporary file beside the
destination, renamed into place only once complete, and never onto one of the inputs.

The local service (``psal serve``) reads uploads and writes its results through the same code:
:func:`decode_image_bits` and :func:`encode_png`, so that a file and its upload give the same bytes.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

# Bytes of working memory a command needs per image pixel, at most (several float32 copies of the
# image, the k-NN field and the attention buffers); the input is refused above what is available.
BYTES_PER_PIXEL = 400
WRITABLE = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".webp": "WEBP"}


class InputError(Exception):
    """A problem with the command's input, said in one line to the user."""


class TooLargeError(InputError):
    """An image larger than the memory (or the server's ``max_pixels``) allows: refused from its
    header, before its pixels are decoded."""


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the CLI
        raise InputError("reading images needs Pillow: pip install pillow") from None
    return Image


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_image(path: str, what: str = "image") -> torch.Tensor:
    """``Tensor[1, C, H, W]`` float32 in ``[0, 1]``, C = 1 (grayscale) or 3."""
    return read_image_bits(path, what)[0]


def read_image_bits(path: str, what: str = "image") -> tuple[torch.Tensor, int]:
    """:func:`read_image` and the file's bits per channel, 8 or 16 (to write the result alike)."""
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r}: no such file")
    return _decode(path, f"{what} {path!r}", _check_memory, explain=True)


def decode_image_bits(data: bytes, what: str = "image", max_pixels: int | None = None) -> tuple[torch.Tensor, int]:
    """:func:`read_image_bits` for the bytes of an image file (an upload): the same kinds are read
    and refused, named ``what`` in the message; above ``max_pixels`` pixels (``None``: no limit)
    :class:`TooLargeError` is raised from the header, before any pixel is decoded."""
    import io

    def check(label, width, height):
        if max_pixels is not None and width * height > max_pixels:
            raise TooLargeError(
                f"{label}: {width}x{height} is {width * height} pixels, more than the {max_pixels} allowed; resize it first"
            )

    if not data:
        raise InputError(f"{what}: empty file")
    return _decode(io.BytesIO(data), what, check, explain=False)


def _decode(source, label: str, check_size, explain: bool) -> tuple[torch.Tensor, int]:
    """The pixels of ``source`` (a path or a binary file) and its bits per channel; every problem
    is a :class:`InputError` starting with ``label``. ``check_size(label, width, height)`` runs on
    the header, before the pixels are decoded. ``explain``: add Pillow's reason to the message of
    an unreadable file (not for in-memory files, whose reason names a Python object)."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 Mpixels; the memory check below decides instead, in one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            check_size(label, *img.size)
            bits = 16 if img.mode.startswith("I") else 8
            img.load()
            array = _to_array(img, label)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise TooLargeError(f"{label}: too large to process ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = f" ({exc})" if explain else " (PNG, JPEG, TIFF, BMP or WebP, for example)"
        raise InputError(f"{label}: not a readable image{reason}") from None
    t = torch.from_numpy(array)
    if t.dim() == 2:
        t = t[..., None]
    return t.permute(2, 0, 1)[None].contiguous(), bits


def _check_memory(label, width: int, height: int) -> None:
    need = width * height * BYTES_PER_PIXEL
    free = available_memory()
    if free is not None and need > free:
        raise TooLargeError(
            f"{label}: {width}x{height} pixels needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available; resize it first"
        )


def _to_array(img, label) -> np.ndarray:
    """The pixels as float32 ``(H, W)`` or ``(H, W, 3)`` in ``[0, 1]``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        return (a / top).clip(0, 1).astype(np.float32)
    if mode == "F":
        raise InputError(f"{label}: floating-point images are not supported; save it as 8- or 16-bit")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha < 255).any():
            raise InputError(f"{label}: has transparent pixels (alpha channel); flatten it onto a background first")
        img = rgba.convert("RGB" if mode != "LA" else "L")
    elif mode in ("1", "L"):
        img = img.convert("L")
    elif mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def check_output(out: str, inputs) -> str:
    """The output path, refused if it is one of the inputs or cannot be written as an image."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in WRITABLE:
        raise InputError(f"output {out!r}: unknown image type {ext or '(no extension)'}; use one of {', '.join(sorted(WRITABLE))}")
    for path in inputs:
        if os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            raise InputError(f"output {out!r} is also an input; choose another path")
        if os.path.abspath(path) == os.path.abspath(out):
            raise InputError(f"output {out!r} is also an input; choose another path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InputError(f"output {out!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output {out!r}: folder {folder!r} is not writable")
    return out


def write_image(image: torch.Tensor, out: str, bits: int = 8) -> None:
    """Write ``Tensor[1, C, H, W]`` in ``[0, 1]`` atomically (temporary file, then rename): 8 bits
    per channel, or 16 for a grayscale PNG or TIFF when ``bits=16``."""
    from psal.images import save_image

    fmt = WRITABLE[os.path.splitext(out)[1].lower()]
    save_image(image, out, fmt, bits=bits, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def encode_png(image: torch.Tensor, bits: int = 8) -> bytes:
    """The bytes of the PNG file that :func:`write_image` writes for ``out=*.png``."""
    from psal.images import encode_image

    return encode_image(image, "PNG", bits=bits)
