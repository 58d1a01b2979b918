"""Colour a video from colour keyframes, zero-shot: the picture colorizer of :mod:`.colorize`
carried along time.

Scheme. Every frame keeps its own luminance (CIE L); its chroma (a, b) comes from patches that
match it. The keyframes (colour pictures of some frames of the video, brought to the frame size)
are coloured as given. The other frames are coloured in order, outward from the first keyframe:
forward through the rest of the video, then backward to its start. Each frame is matched against
a small library of coloured frames, searched as one space-time volume (patches ``(1, p, p)``, so
the random search covers every frame of the library): the keyframe before it and the one after
it (those that exist: they anchor the colours, so that errors do not add up from frame to frame)
and the frame coloured just before it (the nearest in time: whatever the motion did since the
keyframe, it is there). Patches are compared on the luminance features of :mod:`.colorize`
(luminance, local means, spreads and edge statistics, each divided by its spread over the
keyframes). Colours are not copied from copies: a match in a coloured
frame is followed to the keyframe pixel that frame's pixel took its colour from (each coloured
frame keeps, per pixel, the keyframe source of its best match), so every frame's chroma is a
softmax-weighted mean of keyframe chroma at its ``k`` matches' sources. Copying the previous
frame's chroma instead drained it (each frame a blurred copy of a blurred copy: on the bench's
pan 36.6 dB after one frame, 28.4 after 55, against 32.6 after 55 when colouring each frame from
the keyframe alone; followed to their sources the colours gave 32.4 there). A followed source
is where the previous frame's match pointed, so its small errors would add up from frame to frame;
each frame's followed sources are therefore re-anchored: one PatchMatch iteration in the keyframes
themselves, started from them (``_ANCHOR_ITERS``), keeps each source or moves it to a keyframe
patch nearer the frame's own (on the bench's four videos the last 20 frames gained 1.9 dB; every
third of every video gained but the drift's first, -0.4 dB). The chroma is then smoothed along the frame's luminance by
a narrow guided filter (``_SMOOTH_RADIUS``).

Temporal smoothing. The new chroma is then pulled toward the chroma of the frame coloured just
before it, pixel by pixel, by ``temporal * exp(-(dL / 2)^2)``, ``dL`` the change of luminance at
that pixel between the two frames (L units, 0..100): where the picture stands still the colour
stays (no flicker), where something moved (the luminance changed) the pull vanishes and the
match's colour is kept (no smear behind moving edges).

Large frames are coloured at a working size of about ``work_pixels`` pixels and their chroma
brought up by the guided filter with the full-size luminance as the guide, as for a picture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import psal

from .. import _checks as checks
from .colorize import _GUIDE_EPS, _feature_scale, _features, _guided, _luminance, _shrink, guided_upsample, lab_from_rgb, rgb_from_lab

# The spread of the change of luminance (L units) at which the temporal pull has fallen to e^-1.
_STILL_SPREAD = 2.0
# The guided filter's radius for the followed chroma. A picture's matched chroma is noisy and
# takes radius 8 (colorize._SMOOTH_RADIUS); colours followed to their keyframe are the keyframe's
# own, which wide smoothing only blurs. Measured on the bench's pan and parallax (160 x 120, 60
# frames, one keyframe; chroma PSNR of frames 1-19 / 20-39 / 40-59 and flicker): radius 8: pan
# 34.67 / 34.16 / 32.96 dB, flicker 1.44, parallax 37.71 / 35.43 / 34.33, 0.64; 4: 38.03 / 36.77 /
# 34.42, 1.28 and 40.29 / 36.61 / 34.85, 0.60; 2: 40.68 / 38.12 / 34.79, 1.14 and 42.27 / 37.01 /
# 34.88, 0.57; 1: 42.35 / 38.60 / 34.76, 1.06 and 43.21 / 36.93 / 34.68, 0.57; none: 42.92 / 38.05
# / 34.13, 1.15 and 43.06 / 36.34 / 34.09, 0.62.
_SMOOTH_RADIUS = 1
# PatchMatch iterations that re-anchor the followed sources in the keyframes. Measured on
# `python -m psal.bench colour-video` (mean of 4 videos, chroma PSNR of frames 1-19 / 20-39 /
# 40-59, flicker): none: 41.21 / 36.78 / 35.41 dB, 1.09; 1: 41.85 / 38.04 / 37.32, 1.04;
# 2: 41.75 / 37.96 / 37.28, 1.05; 4: 41.71 / 37.94 / 37.27, 1.06.
_ANCHOR_ITERS = 1


def _check(frames, keyframes, key_indices, num_neighbors, temperature_scale, temporal, work_pixels):
    fn = "colorize_video"
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
        raise TypeError(f"{fn}: frames must be a floating-point tensor, got {type(frames).__name__}")
    if frames.dim() != 4 or frames.shape[1] not in (1, 3) or frames.shape[0] < 1:
        raise ValueError(f"{fn}: frames must be (T, 1 or 3, H, W), got {tuple(frames.shape)}")
    if isinstance(keyframes, torch.Tensor) or not isinstance(keyframes, Sequence) or not keyframes:
        raise TypeError(f"{fn}: keyframes must be a non-empty list of (1, 3, H, W) colour pictures, got {type(keyframes).__name__}")
    for i, key in enumerate(keyframes):
        if not isinstance(key, torch.Tensor) or not key.is_floating_point():
            raise TypeError(f"{fn}: keyframes[{i}] must be a floating-point tensor, got {type(key).__name__}")
        if key.dim() != 4 or key.shape[:2] != (1, 3):
            raise ValueError(f"{fn}: keyframes[{i}] must be a colour picture (1, 3, H, W), got {tuple(key.shape)}")
        if key.device != frames.device:
            raise ValueError(f"{fn}: keyframes[{i}] is on {key.device}, the frames on {frames.device}")
    T = frames.shape[0]
    if not isinstance(key_indices, Sequence) or len(key_indices) != len(keyframes):
        raise ValueError(f"{fn}: key_indices must give one frame per keyframe ({len(keyframes)}), got {key_indices!r}")
    for i in key_indices:
        if not checks._is_int(i) or not 0 <= i < T:
            raise ValueError(f"{fn}: key_indices must be frames of the video, 0 to {T - 1}, got {list(key_indices)}")
    if len(set(key_indices)) != len(key_indices):
        raise ValueError(f"{fn}: key_indices must be distinct, got {list(key_indices)}")
    if frames.shape[-2] * frames.shape[-1] < num_neighbors:
        raise ValueError(f"{fn}: frames of {tuple(frames.shape[-2:])} have fewer pixels than num_neighbors={num_neighbors}")
    if not checks.is_real_number(temperature_scale) or not temperature_scale > 0:
        raise ValueError(f"{fn}: temperature_scale must be a positive number, got {temperature_scale!r}")
    if not checks.is_real_number(temporal) or not 0 <= temporal < 1:
        raise ValueError(f"{fn}: temporal must be a number in [0, 1), got {temporal!r}")
    if work_pixels is not None and (isinstance(work_pixels, bool) or not isinstance(work_pixels, int) or work_pixels < 1):
        raise ValueError(f"{fn}: work_pixels must be a positive int or None, got {work_pixels!r}")


def propagation_order(T: int, key_indices: Sequence[int]) -> list[tuple[int, int]]:
    """The frames to colour, each with the frame coloured just before it: ``(t, previous)``,
    forward from the first keyframe to the end, then backward from it to the start; keyframes are
    not listed (they are coloured as given)."""
    keys = set(key_indices)
    first = min(keys)
    order = [(t, t - 1) for t in range(first + 1, T) if t not in keys]
    order += [(t, t + 1) for t in range(first - 1, -1, -1) if t not in keys]
    return order


def colorize_video(
    frames: torch.Tensor,
    keyframes: Sequence[torch.Tensor],
    key_indices: Sequence[int] = (0,),
    *,
    patch_size: int = 5,
    num_neighbors: int = 4,
    num_iters: int = 6,
    temperature_scale: float = 0.5,
    temporal: float = 0.5,
    work_pixels: int | None = 1 << 20,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Colour ``frames`` ``(T, 1 or 3, H, W)`` in ``[0, 1]`` (colour frames are read for their
    luminance) from the colour ``keyframes`` (``(1, 3, Hk, Wk)`` pictures, any size: brought to
    the frames' size), which show frames ``key_indices`` -> ``(T, 3, H, W)`` in ``[0, 1]``.

    Every frame keeps its luminance; its chroma comes from the keyframes around it and the frame
    coloured before it (module docstring). ``temporal`` in ``[0, 1)`` is the pull toward the
    previous frame's chroma where the luminance did not change (0: none). ``progress(done,
    total)`` is called after each frame.

    Raises:
        TypeError, ValueError: on bad input, naming the argument and the shapes passed.
    """
    _check(frames, keyframes, key_indices, num_neighbors, temperature_scale, temporal, work_pixels)
    dt = torch.float64 if frames.dtype == torch.float64 else torch.float32
    T, _, H, W = frames.shape
    f = 1.0 if work_pixels is None or H * W <= work_pixels else (work_pixels / (H * W)) ** 0.5
    small = (max(1, round(H * f)), max(1, round(W * f)))

    def working(x: torch.Tensor) -> torch.Tensor:
        return _shrink(x, f) if f < 1 else x

    out = torch.empty(T, 3, H, W, dtype=dt, device=frames.device)
    # The keyframes at the working size, stacked: their features, and their chroma flat
    # (slot * h * w + position), where every coloured pixel's colour comes from.
    ordered = sorted(range(len(key_indices)), key=lambda i: key_indices[i])
    slot = {key_indices[i]: s for s, i in enumerate(ordered)}
    labs = []
    for i in ordered:
        key = keyframes[i].to(dt)
        labs.append(lab_from_rgb(F.interpolate(key, size=small, mode="bilinear", antialias=True) if key.shape[-2:] != small else key))
    key_feat = [_features(lab[:, :1]) for lab in labs]
    scale = _feature_scale(*key_feat)  # every frame's features divided by the keyframes' spread
    key_feat = [feat / scale for feat in key_feat]
    key_volume = torch.stack(key_feat, 2)  # (1, F, keyframes, h, w): flat index = slot * h * w + position
    key_ab = torch.cat([lab[:, 1:] for lab in labs], 0).permute(1, 0, 2, 3).reshape(2, -1)  # (2, n * h * w)
    hw = small[0] * small[1]
    # Per coloured frame: its features and the keyframe source of each pixel's best match (what
    # later frames match and follow), and its chroma (for the temporal pull).
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for t, s in slot.items():
        src = s * hw + torch.arange(hw, device=frames.device)
        done[t] = (key_feat[s], src, labs[s][:, 1:])
        _write(out, t, _luminance(frames[t : t + 1].to(dt)), labs[s][:, 1:], f)
    order = propagation_order(T, key_indices)
    total = len(order) + len(slot)
    if progress is not None:
        progress(len(slot), total)
    keys = sorted(slot)
    for step, (t, previous) in enumerate(order):
        L_full = _luminance(frames[t : t + 1].to(dt))
        L = working(L_full)
        before = [k for k in keys if k < t]
        after = [k for k in keys if k > t]
        library = ([before[-1]] if before else []) + ([after[0]] if after else [])
        if previous not in library:
            library.append(previous)
        q = _features(L) / scale
        cost, src = _match(q, [done[k] for k in library], patch_size, num_neighbors, num_iters, generator)
        cost, src = _anchor(q, key_volume, src, patch_size, generator)
        T_ = float(cost[0].median().clamp_min(1e-6)) * temperature_scale
        weights = torch.softmax(-cost / T_, 0)
        ab = (weights[None] * key_ab[:, src]).sum(1).view(1, 2, *small)
        ab = _guided(ab, L, _SMOOTH_RADIUS, _GUIDE_EPS)
        if temporal > 0:
            change = L - done[previous][0][:, :1] * scale[:, :1]  # the previous frame's luminance: its first feature
            pull = temporal * torch.exp(-(change / _STILL_SPREAD).square())
            ab = ab + pull * (done[previous][2] - ab)
        done[t] = (q, src[0], ab)
        # only the frames a later one can still read are kept: the previous one and the keyframes
        if previous not in slot:
            del done[previous]
        _write(out, t, L_full, ab, f)
        if progress is not None:
            progress(len(slot) + step + 1, total)
    return out.to(frames.dtype)


def _match(q, library, patch_size, num_neighbors, num_iters, generator):
    """For the features ``q (1, F, h, w)``: the costs ``(k, h * w)`` of the matches found in the
    library's frames (``(features, sources, chroma)``, searched as one volume with patches
    ``(1, p, p)``), best first, and their keyframe sources ``(k, h * w)``: a match in a keyframe
    is its own source, a match in a coloured frame takes that pixel's source."""
    key = torch.stack([feat for feat, _, _ in library], 2)
    query = q[:, :, None]
    field = psal.patchmatch(query, key, patch_size=(1, patch_size, patch_size), num_neighbors=num_neighbors, num_iters=num_iters,
                            generator=generator)  # fmt: skip
    idx = field.indices.reshape(num_neighbors, -1)
    sources = torch.stack([src for _, src, _ in library])  # (frames, h * w)
    hw = sources.shape[1]
    return field.costs.reshape(num_neighbors, -1).to(q.dtype), sources[idx // hw, idx % hw]


def _anchor(q, key_volume, sources, patch_size, generator):
    """The keyframe ``sources (k, h * w)`` of ``q (1, F, h, w)``'s matches, re-anchored: a
    PatchMatch search of ``q`` in the keyframes ``key_volume (1, F, n, h, w)`` started from them
    (``_ANCHOR_ITERS`` iterations; never worse than where it started) -> its costs and sources,
    best first, both ``(k, h * w)``."""
    k = sources.shape[0]
    h, w = q.shape[-2:]
    field = psal.patchmatch(q[:, :, None], key_volume, patch_size=(1, patch_size, patch_size), num_neighbors=k,
                            num_iters=_ANCHOR_ITERS, init=sources.reshape(1, 1, k, 1, h, w), generator=generator)  # fmt: skip
    return field.costs.reshape(k, -1).to(q.dtype), field.indices.reshape(k, -1)


def _write(out: torch.Tensor, t: int, L_full: torch.Tensor, ab: torch.Tensor, f: float) -> None:
    """Frame ``t`` of ``out``: its full-size luminance with the chroma ``ab`` (brought up by the
    guided filter when it was computed at a working size)."""
    if ab.shape[-2:] != L_full.shape[-2:]:
        ab = guided_upsample(ab, L_full, max(1, round(1 / f)), eps=_GUIDE_EPS)
    out[t] = rgb_from_lab(torch.cat([L_full, ab], 1))[0]
