"""The inpainting peers of the benchmarks, each as ``fill(image, hole) -> image``.

``image``: ``Tensor[1, 3, H, W]`` float in ``[0, 1]``; ``hole``: ``Tensor[1, 1, H, W]`` bool, True on
the pixels to fill. Every peer gets the picture in 8 bits, as its users give it; its output comes
back as it is, known pixels included (the benchmark reports how far they moved). Peers are
optional packages of the ``bench`` extra, never dependencies of ``import psal``; :func:`available`
lists those that import here.

- ``pypatchmatch``: PyPatchMatch's ``patch_match.inpaint`` (Barnes et al. 2009 with Wexler's EM),
  ``patch_size=4`` (its patches are ``2 * patch_size + 1`` wide: 9 x 9), its random seed fixed: of
  2, 3, 4 and 5, the strongest on the held-out cases of ``python -m psal.bench apps --held-out``
  (hole PSNR 21.86, 21.88, 21.97, 21.87 dB; patch-SWD 2.49, 2.61, 2.33, 2.60).
- ``resynthesizer``: Harrison's Resynthesizer (GIMP's "heal selection" engine) with the plug-in's
  parameters: ``matchContextType=1``, ``mapWeight=0``, ``sensitivityToOutliers=0.117``,
  ``patchSize=16``, ``maxProbeCount=500``, no tiling; the whole known picture is the corpus (the
  GIMP plug-in samples a band around the selection, 50 pixels by default).
- ``opencv-fsr-fast``, ``opencv-fsr-best``: OpenCV ``xphoto.inpaint`` frequency-selective
  reconstruction (Genser et al. 2018; smooth fills, strong on PSNR). Its mask marks the *known*
  pixels, and ``dst`` must start as the picture (it is not filled where FSR leaves it; known pixels
  come back within 1/255). BEST takes
  about 90 s per 256 x 256 picture on 2 cores, FAST about 3 s.
- ``opencv-telea``: ``cv2.inpaint`` with Telea's fast marching (radius 3).
- ``biharmonic``: scikit-image's biharmonic inpainting.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].permute(1, 2, 0).double().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _from_uint8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255


def _hole_uint8(hole: torch.Tensor) -> np.ndarray:
    return hole[0, 0].numpy().astype(np.uint8) * 255


def pypatchmatch(image, hole):
    from patchmatch import patch_match

    patch_match.set_random_seed(0)
    return _from_uint8(patch_match.inpaint(_to_uint8(image), mask=_hole_uint8(hole), patch_size=4))


def resynthesizer(image, hole):
    import resynthesizer as rs
    from PIL import Image

    params = rs.TImageSynthParameters()
    params.isMakeSeamlesslyTileableHorizontally = 0
    params.isMakeSeamlesslyTileableVertically = 0
    params.matchContextType = 1
    params.mapWeight = 0.0
    params.sensitivityToOutliers = 0.117
    params.patchSize = 16
    params.maxProbeCount = 500
    out = rs.resynthesize(Image.fromarray(_to_uint8(image)), Image.fromarray(_hole_uint8(hole)), params)
    return _from_uint8(np.asarray(out.convert("RGB")))


def _fsr(kind):
    def fill(image, hole):
        import cv2

        bgr = _to_uint8(image)[..., ::-1].copy()
        dst = bgr.copy()  # FSR does not write every pixel of dst
        known = (~hole[0, 0]).numpy().astype(np.uint8) * 255
        cv2.xphoto.inpaint(bgr, known, dst, getattr(cv2.xphoto, kind))
        return _from_uint8(dst[..., ::-1])

    return fill


def telea(image, hole):
    import cv2

    bgr = _to_uint8(image)[..., ::-1].copy()
    return _from_uint8(cv2.inpaint(bgr, _hole_uint8(hole), 3, cv2.INPAINT_TELEA)[..., ::-1])


def biharmonic(image, hole):
    from skimage.restoration import inpaint_biharmonic

    arr = image[0].permute(1, 2, 0).numpy().astype(np.float64)
    out = inpaint_biharmonic(arr, hole[0, 0].numpy(), channel_axis=-1)
    return torch.from_numpy(out).permute(2, 0, 1)[None].float().clamp(0, 1)


INPAINT = {
    "pypatchmatch": (pypatchmatch, "patchmatch.patch_match"),
    "resynthesizer": (resynthesizer, "resynthesizer"),
    "opencv-fsr-fast": (_fsr("INPAINT_FSR_FAST"), "cv2.xphoto"),
    "opencv-fsr-best": (_fsr("INPAINT_FSR_BEST"), "cv2.xphoto"),
    "opencv-telea": (telea, "cv2"),
    "biharmonic": (biharmonic, "skimage.restoration"),
}
# What the benchmark runs unless told otherwise (FSR_BEST is 30x slower than FSR_FAST).
DEFAULT_INPAINT = ("pypatchmatch", "resynthesizer", "opencv-fsr-fast", "opencv-telea")


def available(name: str) -> bool:
    """Whether the peer ``name`` of :data:`INPAINT` imports here (its import may also fail for
    reasons of its own, such as a missing shared library)."""
    try:
        importlib.import_module(INPAINT[name][1])
    except Exception:
        return False
    return True
