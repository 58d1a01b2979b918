"""Image helpers for demos, benchmarks and tests: bundled images, image files, PSNR, and the one
atomic file writer that every image, report and checkpoint goes through.

The bundled images are scikit-image's (they load without a network); install the ``demo`` extra.
"""

from __future__ import annotations

import importlib
import os
import tempfile

import torch
import torch.nn.functional as F

BUNDLED = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")
# More of scikit-image's pictures that load without a network (no pooch download).
MORE_PICTURES = ("hubble_deep_field", "immunohistochemistry", "retina", "coins", "moon", "cell", "cat", "colorwheel")
# Photographs that other packages ship (offline too): scikit-learn's two and matplotlib's portrait.
OTHER_PICTURES = {"china": "sklearn", "flower": "sklearn", "grace_hopper": "matplotlib"}


def _need(module: str, extra: str = "demo"):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"psal needs {module} for this: pip install 'psal[{extra}]' ({exc})") from None


def to_tensor(array) -> torch.Tensor:
    """``uint8 (H, W)`` or ``(H, W, C)`` array -> ``Tensor[1, C, H, W]`` float32 in ``[0, 1]``."""
    t = torch.tensor(array)  # a copy: the array may be read-only
    if t.dim() == 2:
        t = t[..., None]
    return t.permute(2, 0, 1)[None].float().div(255.0)


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """Area-style resize of ``Tensor[B, C, H, W]`` to ``size = (H', W')`` with antialiasing."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` RGB -> ``Tensor[B, 1, H, W]``: ITU-R BT.601 luma weights (0.299,
    0.587, 0.114), on the image's device and in its dtype."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * w).sum(1, keepdim=True)


def _other_picture(name: str):
    """The ``uint8 (H, W, 3)`` array of one of :data:`OTHER_PICTURES`."""
    if OTHER_PICTURES[name] == "sklearn":
        return _need("sklearn.datasets", "bench").load_sample_image(f"{name}.jpg")
    cbook, Image, np = _need("matplotlib.cbook", "bench"), _need("PIL.Image"), _need("numpy")
    with cbook.get_sample_data(f"{name}.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def load_bundled(name: str, size=None, gray: bool = False, longest: int | None = None) -> torch.Tensor:
    """A sample picture as ``Tensor[1, 3, H, W]`` (``[1, 1, H, W]`` if ``gray``) in ``[0, 1]``.

    Args:
        name: one of :data:`BUNDLED` or :data:`MORE_PICTURES` (scikit-image's), or of
            :data:`OTHER_PICTURES` (scikit-learn's or matplotlib's, when that package is installed).
        size: ``int`` for a square or ``(H, W)``; ``None`` keeps the original size.
        longest: with ``size=None``, shrink (never enlarge) so that the longer side is at most this.
    """
    names = BUNDLED + MORE_PICTURES + tuple(OTHER_PICTURES)
    if name not in names:
        raise ValueError(f"load_bundled: name must be one of {', '.join(names)}, got {name!r}")
    if size is not None and longest is not None:
        raise ValueError(f"load_bundled: give size or longest, not both (got size={size!r}, longest={longest!r})")
    array = _other_picture(name) if name in OTHER_PICTURES else getattr(_need("skimage.data"), name)()
    image = to_tensor(array)[:, :3]  # an alpha channel is dropped
    if gray and image.shape[1] == 3:
        image = grayscale(image)
    elif not gray and image.shape[1] == 1:
        image = image.expand(1, 3, *image.shape[-2:]).contiguous()
    if longest is not None and max(image.shape[-2:]) > longest:
        scale = longest / max(image.shape[-2:])
        size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    if size is not None:
        image = resize(image, (size, size) if isinstance(size, int) else size)
    return image


def save_png(image: torch.Tensor, path) -> None:
    """Write ``Tensor[1, C, H, W]`` (or ``[C, H, W]``) in ``[0, 1]`` as PNG, atomically."""
    save_image(image, path)


def save_image(image: torch.Tensor, path, format: str = "PNG", bits: int = 8, **options) -> None:
    """Write ``Tensor[1, C, H, W]`` (or ``[C, H, W]``) in ``[0, 1]`` as an image file in Pillow's
    ``format`` (``options`` go to Pillow's ``save``), atomically.

    ``bits``: 8, or 16 for a one-channel image in PNG or TIFF (Pillow writes 16-bit grayscale
    only); other 16-bit requests are written with 8 bits. The file is written beside its
    destination and renamed into place, so an existing file is never left half-written.
    """
    picture = _pillow_image(image, format, bits, "save_image")
    write_atomically(path, lambda f: picture.save(f, format=format, **options))


def encode_image(image: torch.Tensor, format: str = "PNG", bits: int = 8, **options) -> bytes:
    """The bytes of the file that :func:`save_image` writes for the same arguments."""
    import io

    picture = _pillow_image(image, format, bits, "encode_image")
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return buffer.getvalue()


def _pillow_image(image: torch.Tensor, format: str, bits: int, fn: str):
    """``image`` rounded to 8 (or 16, see :func:`save_image`) bits per channel, as a Pillow image."""
    Image = _need("PIL.Image")
    np = _need("numpy")
    if bits not in (8, 16):
        raise ValueError(f"{fn}: bits must be 8 or 16, got {bits!r}")
    if image.dim() == 4:
        image = image[0]
    sixteen = bits == 16 and image.shape[0] == 1 and format in ("PNG", "TIFF")
    top, dtype = (65535, np.uint16) if sixteen else (255, np.uint8)
    array = image.detach().double().clamp(0, 1).mul(top).round().permute(1, 2, 0).cpu().numpy().astype(dtype)
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def write_atomically(path, write) -> None:
    """``write(binary_file)`` into a temporary file beside ``path``, then renamed over it: an
    existing file is never left half-written, and a failed write leaves no temporary behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(path)[1], prefix=".psal-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in ``[0, 1]``."""
    mse = (a.float() - b.float()).square().mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


def side_by_side(pictures, height: int = 256, gap: int = 4) -> torch.Tensor:
    """Pictures ``Tensor[1, C, H, W]`` resized to one height and laid in a row on white."""
    rows = []
    for pic in pictures:
        pic = pic.expand(1, 3, *pic.shape[-2:]) if pic.shape[1] == 1 else pic
        width = max(1, round(pic.shape[-1] * height / pic.shape[-2]))
        rows.append(resize(pic, (height, width)))
        rows.append(torch.ones(1, 3, height, gap))
    return torch.cat(rows[:-1], dim=3)


def write_json(path, data) -> None:
    """``data`` as indented JSON at ``path``, atomically (see :func:`write_atomically`)."""
    import json

    text = json.dumps(data, indent=1, default=str).encode()
    write_atomically(path, lambda f: f.write(text))
