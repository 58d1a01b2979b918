"""Exemplar-based colorization: the chroma of a colour reference, carried onto a grayscale target by
patch matching on luminance features (after Welsh et al. 2002, with PSAL as the matcher).

Scheme. Both images go to CIE Lab; each is described per pixel by its luminance and, over 3 x 3
and 7 x 7 windows, the local mean, standard deviation, mean gradient magnitude and mean absolute
Laplacian of the luminance, every channel divided by its spread over both images (so that
texture counts as much as brightness). The luminances are compared as they are: Welsh et al.'s remapping of the reference's luminance to the target's mean and spread (for a
reference shot in other light) is an option, ``match_luminance=True``, off by default because it
moves every tone when the two pictures differ in content rather than in light (measured on halves
of one photograph, where the light is shared: 2.2 dB worse chroma PSNR on upper and lower
halves, 0.8 dB on left and right ones; BENCHMARKS.md). PSAL finds,
for every target patch, its k nearest reference patches on those features, and attends over the reference's
chroma (a, b) with ``"patch"`` aggregation, so neighbouring pixels agree; a guided filter (He et
al. 2010) with the target's luminance as the guide then smooths that chroma along the luminance,
so that one surface gets one colour. The target keeps its own luminance exactly; only a and b
come from the reference.

Large targets. Above ``work_pixels`` the chroma is computed at a working size of about that
many pixels (the target's luminance and the reference both shrunk by the same factor, so that their
patches keep their relative scale), then brought to the full size by a guided filter (He et al.
2010) with the full-size luminance as the guide, so that colour edges follow the luminance edges;
the luminance stays the full-size one. Chroma carries less detail than luminance (JPEG keeps a
quarter of it), and the time and memory are then those of the working size plus a few full-size
maps.

``lab_from_rgb``/``rgb_from_lab`` (sRGB, D65) and ``global_transfer`` (Reinhard et al.'s mean and
spread transfer in Lab, the baseline) live here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import psal

from .. import _checks as checks

_WHITE = (0.95047, 1.0, 1.08883)  # D65
# The guided filter's ridge (L units squared), for the smoothing of the matched chroma and for
# bringing chroma computed at a working size up.
_GUIDE_EPS = 25.0
# The matched chroma is smoothed along the luminance by a guided filter of this radius: measured
# on the colour photographs of `python -m psal.bench apps` (luminance as it is), radius 8 against
# 4: +0.15 dB chroma PSNR on top/bottom halves (where it was chosen) and +0.17 dB on the reported
# left/right halves, the colourfulness 0.82 and 0.85 of the truth's against 0.86 and 0.89. With the
# features below, 16 gains 0.03 dB on the held-out halves but costs 3 dB on frames of one scene
# (`python -m psal.bench colour-video`, psal-picture on the pan, parallax and drift).
_SMOOTH_RADIUS = 8
# Windows of the local statistics that patches are compared on (see _features). Chosen on the
# upper/lower halves of `python -m psal.bench apps --held-out`, chroma PSNR over Welsh + Levin:
# mean and standard deviation at 3, 7 and 15 as they are (luminance dominating): +0.89 dB; with
# guided radius 16 while searching: +0.95; every channel divided by its spread: +1.24; windows 3
# and 7 only: +1.34 (adding 15 or 31 lost 0.1 to 0.4: wide windows see surroundings, which differ
# from half to half); the mean gradient magnitude added: +1.44; the mean absolute Laplacian: +1.51
# (structure-tensor orientation: -0.1; local range or band-pass energy: no gain). At radius 8,
# the kept one: +1.49 held out, and the reported left/right halves moved from +1.08 to +1.72 dB.
_WINDOWS = (3, 7)
# Channels of _features: the luminance, and four statistics per window.
_FEATURE_CHANNELS = 1 + 4 * len(_WINDOWS)
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def lab_from_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``(B, 3, H, W)`` in ``[0, 1]`` -> CIE Lab (L in ``[0, 100]``, a and b about ``[-128, 127]``)."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _matrix(_RGB_TO_XYZ, rgb), lin)
    xyz = xyz / _matrix(_WHITE, rgb).view(1, 3, 1, 1)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    L = 116 * f[:, 1:2] - 16
    a = 500 * (f[:, 0:1] - f[:, 1:2])
    b = 200 * (f[:, 1:2] - f[:, 2:3])
    return torch.cat([L, a, b], 1)


def rgb_from_lab(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab -> sRGB in ``[0, 1]`` (out-of-gamut colours clipped)."""
    fy = (lab[:, 0:1] + 16) / 116
    fx = fy + lab[:, 1:2] / 500
    fz = fy - lab[:, 2:3] / 200
    f = torch.cat([fx, fy, fz], 1)
    eps = 6 / 29
    xyz = torch.where(f > eps, f**3, 3 * eps**2 * (f - 4 / 29)) * _matrix(_WHITE, lab).view(1, 3, 1, 1)
    lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_matrix(_RGB_TO_XYZ, lab)), xyz).clamp(0, 1)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055).clamp(0, 1)


def _luminance(image: torch.Tensor) -> torch.Tensor:
    """L ``(B, 1, H, W)`` of a grayscale ``(B, 1, H, W)`` (read as sRGB gray) or colour image:
    ``lab_from_rgb``'s L, computed through the luminance Y alone (no three-channel buffers)."""
    lin = torch.where(image <= 0.04045, image / 12.92, ((image.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    weights = _matrix(_RGB_TO_XYZ[1], image)  # Y's row; white's Y is 1
    y = lin * weights.sum() if image.shape[1] == 1 else torch.einsum("j,bjhw->bhw", weights, lin)[:, None]
    eps = 216 / 24389
    f = torch.where(y > eps, y.clamp_min(eps) ** (1 / 3), (24389 / 27 * y + 16) / 116)
    return 116 * f - 16


def _features(L: torch.Tensor) -> torch.Tensor:
    """Per pixel of ``L (B, 1, H, W)``: the luminance and, over each of :data:`_WINDOWS`, its local
    mean and standard deviation, the local mean of its gradient magnitude (central differences) and
    of its absolute Laplacian (5-point), the map's edges replicated -> ``(B, 1 + 4 * windows, H,
    W)``, in the luminance's units (see :func:`_feature_scale`)."""
    pad = F.pad(L, (1, 1, 1, 1), mode="replicate")
    left, right, up, down = pad[..., 1:-1, :-2], pad[..., 1:-1, 2:], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1]
    grad = (0.25 * ((right - left).square() + (down - up).square())).sqrt()
    lap = (4 * L - left - right - up - down).abs()
    out = [L]
    for size in _WINDOWS:
        r = size // 2

        def mean(x: torch.Tensor, r: int = r) -> torch.Tensor:
            return F.avg_pool2d(F.pad(x, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1)

        m = mean(L)
        out += [m, (mean(L.square()) - m.square()).clamp_min(0).sqrt(), mean(grad), mean(lap)]
    return torch.cat(out, 1)


def _feature_scale(*maps: torch.Tensor) -> torch.Tensor:
    """``(B, F, 1, 1)``: each feature channel's standard deviation over all the pixels of ``maps``
    (``(B, F, ...)`` each), per batch element, floored; patches are compared on the features
    divided by it, so that every channel (brightness, contrast, edges) spreads alike whatever its
    units."""
    flat = torch.cat([m.flatten(2) for m in maps], 2)
    return flat.std(2).clamp_min(1e-3)[..., None, None]


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the ``(2r + 1)^2`` window of each pixel, the window clipped to the map."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def _guided(up: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter of ``up`` by ``guide`` (same size): in each window, ``up`` as a
    linear function of the guide (``eps`` the ridge), the coefficients averaged over the windows."""
    mean_g = _box_mean(guide, radius)
    var_g = _box_mean(guide * guide, radius) - mean_g * mean_g
    mean_u = _box_mean(up, radius)
    a = (_box_mean(guide * up, radius) - mean_g * mean_u) / (var_g + eps)
    b = mean_u - a * mean_g
    return _box_mean(a, radius) * guide + _box_mean(b, radius)


def guided_upsample(low: torch.Tensor, guide: torch.Tensor, radius: int, eps: float, band: int = 256) -> torch.Tensor:
    """``low (1, C, h, w)`` brought to the size of ``guide (1, 1, H, W)``: bilinear, then the
    guided filter, so that its edges follow the guide's. Filtered in bands of ``band`` rows with
    ``2 * radius`` rows of context on each side (all that a pixel's result reads), so the result
    is the whole map's while the filter's buffers stay the size of a band."""
    up = F.interpolate(low, size=guide.shape[-2:], mode="bilinear", align_corners=False)
    out = torch.empty_like(up)
    H, halo = guide.shape[-2], 2 * radius
    for r0 in range(0, H, band):
        r1 = min(r0 + band, H)
        a0, a1 = max(r0 - halo, 0), min(r1 + halo, H)
        out[..., r0:r1, :] = _guided(up[..., a0:a1, :], guide[..., a0:a1, :], radius, eps)[..., r0 - a0 : r1 - a0, :]
    return out


def _check(target, reference, patch_size, num_neighbors, work_pixels, match_luminance):
    for name, t in (("target", target), ("reference", reference)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"colorize: {name} must be a floating-point tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] not in (1, 3):
            raise ValueError(f"colorize: {name} must be (1, 1 or 3, H, W), got {tuple(t.shape)}")
    if reference.shape[1] != 3:
        raise ValueError(f"colorize: reference must be a colour image (1, 3, H, W), got {tuple(reference.shape)}")
    if target.device != reference.device:
        raise ValueError(f"colorize: target and reference must be on one device, got {target.device} and {reference.device}")
    if reference.shape[-2] * reference.shape[-1] < num_neighbors:
        raise ValueError(f"colorize: reference {tuple(reference.shape)} has fewer pixels than num_neighbors={num_neighbors}")
    if work_pixels is not None and (isinstance(work_pixels, bool) or not isinstance(work_pixels, int) or work_pixels < 1):
        raise ValueError(f"colorize: work_pixels must be a positive int or None, got {work_pixels!r}")
    checks.check_bool("colorize", "match_luminance", match_luminance)


def colorize(
    target: torch.Tensor,
    reference: torch.Tensor,
    *,
    patch_size: int = 5,
    num_neighbors: int = 4,
    num_iters: int = 6,
    temperature_scale: float = 0.5,
    generator: torch.Generator | None = None,
    work_pixels: int | None = 1 << 20,
    match_luminance: bool = False,
) -> torch.Tensor:
    """Colour ``target`` ``(1, 1 or 3, H, W)`` (a colour target is read for its luminance only)
    like ``reference`` ``(1, 3, Hr, Wr)``, both in ``[0, 1]`` -> ``(1, 3, H, W)`` in ``[0, 1]``.

    ``temperature_scale`` times the median best patch cost is the attention temperature: small
    values copy the best match's chroma, large ones average the k matches. A target of more than
    ``work_pixels`` pixels gets its chroma at a working size of about that many, guided back up to
    its own size (see the module docstring; ``None``: always at full size). ``match_luminance``
    first moves the reference's luminance to the target's mean and spread, for a reference taken
    in other light (off by default; see the module docstring).

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.
    """
    _check(target, reference, patch_size, num_neighbors, work_pixels, match_luminance)
    dt = torch.float64 if target.dtype == torch.float64 else torch.float32
    target, reference = target.to(dt), reference.to(dt)
    L = _luminance(target)
    H, W = L.shape[-2:]
    if work_pixels is None or H * W <= work_pixels:
        return rgb_from_lab(
            _colorize_lab(L, reference, patch_size, num_neighbors, num_iters, temperature_scale, generator, match_luminance)
        )
    f = (work_pixels / (H * W)) ** 0.5
    ref_small = _shrink(reference, f)
    if ref_small.shape[-2] * ref_small.shape[-1] < num_neighbors:
        ref_small = reference
    lab = _colorize_lab(_shrink(L, f), ref_small, patch_size, num_neighbors, num_iters, temperature_scale, generator, match_luminance)
    # A window of about two working pixels; eps in L units squared (L spans 0..100).
    ab = guided_upsample(lab[:, 1:], L, max(1, round(1 / f)), eps=_GUIDE_EPS)
    out = torch.empty(1, 3, H, W, dtype=dt, device=L.device)
    for r0 in range(0, H, 256):  # in bands: the conversion's buffers stay small
        out[..., r0 : r0 + 256, :] = rgb_from_lab(torch.cat([L[..., r0 : r0 + 256, :], ab[..., r0 : r0 + 256, :]], 1))
    return out


def _shrink(x: torch.Tensor, f: float) -> torch.Tensor:
    size = (max(1, round(x.shape[-2] * f)), max(1, round(x.shape[-1] * f)))
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _colorize_lab(L, reference, patch_size, num_neighbors, num_iters, temperature_scale, generator, match_luminance):
    """Lab ``(1, 3, h, w)``: the luminance ``L (1, 1, h, w)`` and the chroma matched in ``reference``."""
    ref = lab_from_rgb(reference)
    Lr = ref[:, :1]
    if match_luminance:  # Welsh's remapping: the reference's L moved to the target's mean and spread
        Lr = (Lr - Lr.mean()) / Lr.std().clamp_min(1e-6) * L.std().clamp_min(1e-6) + L.mean()
    q, k = _features(L), _features(Lr)
    scale = _feature_scale(q, k)
    q, k = q / scale, k / scale
    field = psal.patchmatch(
        q, k, patch_size=patch_size, num_neighbors=num_neighbors, num_iters=num_iters, generator=generator
    )  # fmt: skip
    T = float(field.costs[:, :, 0].median().clamp_min(1e-6)) * temperature_scale
    ab = psal.attend(q, k, ref[:, 1:], field.indices, patch_size=patch_size, temperature=T, aggregation="patch")
    # Matches are chosen pixel by pixel, so neighbours of one surface can take different colours;
    # the guided filter makes the chroma locally a linear function of the luminance (colour edges
    # only where the luminance has one), as Levin et al.'s propagation does, in linear time.
    ab = _guided(ab, L, _SMOOTH_RADIUS, _GUIDE_EPS)
    return torch.cat([L, ab], 1)


# A Lab channel whose standard deviation is under this has no spread for global_transfer to scale.
_FLAT_SPREAD = 0.5


def global_transfer(target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Reinhard et al. 2001: the target's Lab channels moved to the reference's mean and spread.

    A channel with no spread to scale (under half a Lab unit: a grayscale target's a and b, whose
    only spread is float rounding) takes the reference's mean, so a grayscale target gets the
    reference's mean colour (scaling the rounding noise instead would paint random colour)."""
    rgb = target.expand(1, 3, *target.shape[-2:]) if target.shape[1] == 1 else target
    lab, ref = lab_from_rgb(rgb), lab_from_rgb(reference)
    mean, std = lab.mean((2, 3), keepdim=True), lab.std((2, 3), keepdim=True)
    rmean, rstd = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    spread = std >= _FLAT_SPREAD
    moved = torch.where(spread, (lab - mean) / std.clamp_min(_FLAT_SPREAD) * rstd + rmean, rmean.expand_as(lab))
    moved[:, :1] = lab[:, :1]  # the target keeps its luminance
    return rgb_from_lab(moved)
