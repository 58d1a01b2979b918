"""The tensor-level work of the ``psal`` commands, shared by the command line (:mod:`psal.cli.main`)
and the local service (:mod:`psal.serve`): one code path and one set of defaults, so that the same
pictures and seed give the same result, byte for byte, whichever of the two runs them.

Each task takes pictures as ``Tensor[1, C, H, W]`` in ``[0, 1]`` (as :mod:`psal.tasks.files` reads
them), a :class:`torch.device` and a seed, and returns its result on that device. ``progress``,
where given, is called as ``progress(done, total)`` (or with a third argument, the training loss,
for the network upscaler). Problems with the pictures themselves are :class:`InputError` one-liners
that name them as the caller says (a file path for the command, a field name for the service);
problems with the options are the apps' own ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import inspect
import os

import torch

from .files import BYTES_PER_PIXEL, InputError, TooLargeError

# psal upscale's default training steps per stage: 49 s for a 256 x 256 picture at x2 on 2 CPU
# cores, 2.6 min at x4 (BENCHMARKS.md, issue 17).
UPSCALE_STEPS = 500


# Working memory per pixel of the result of upscale_image, in units of BYTES_PER_PIXEL: the
# network's prediction holds a few 64-channel float32 maps of the full result (measured: about
# 1,000 bytes a result pixel at 1 MP), the patch method about BYTES_PER_PIXEL.
_UPSCALE_WEIGHT = {"network": 2.5, "patch": 1.0}


def check_upscale_fits(height: int, width: int, scale: int, method: str, max_pixels: int | None, name: str = "image") -> None:
    """Refuse (:class:`TooLargeError`) a picture whose enlargement by ``scale`` with ``method`` needs more
    than ``max_pixels`` pixels' worth of working memory (``BYTES_PER_PIXEL`` each; ``None``: no
    limit). The command line passes what the memory available allows, the service its limit."""
    need = round(height * width * scale**2 * _UPSCALE_WEIGHT.get(method, 1.0))
    if max_pixels is not None and need > max_pixels:
        raise TooLargeError(
            f"{name}: {width}x{height} enlarged {scale}x by the {method} method needs the memory of {need} pixels, "
            f"more than the {max_pixels} allowed here; resize it first"
        )


def memory_pixels() -> int | None:
    """How many pixels the memory available now allows, at ``BYTES_PER_PIXEL`` each (``None``
    where it cannot be read)."""
    from .files import available_memory

    free = available_memory()
    return None if free is None else max(1, free // BYTES_PER_PIXEL)


def device_from_name(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: unknown device {name!r}; use cpu, cuda or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def default(task, option: str):
    """The default of ``option`` of one of the tasks below (the command line shows the same)."""
    return inspect.signature(task).parameters[option].default


def same_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grayscale beside colour: the grayscale one is repeated over three channels."""
    if a.shape[1] == b.shape[1]:
        return a, b
    return a.expand(1, 3, *a.shape[-2:]), b.expand(1, 3, *b.shape[-2:])


def hole_from_mask(mask: torch.Tensor, image: torch.Tensor, mask_name: str = "mask", image_name: str = "image") -> torch.Tensor:
    """The pixels to fill, ``Tensor[1, 1, H, W]`` bool: where ``mask`` is white (or light: mean
    over its channels above one half). Refused unless the mask has the image's size and marks some
    pixels but not all of them."""
    if mask.shape[-2:] != image.shape[-2:]:
        raise InputError(
            f"{mask_name} is {mask.shape[-1]}x{mask.shape[-2]}, {image_name} is {image.shape[-1]}x{image.shape[-2]}; "
            "they must be the same size"
        )
    hole = mask.mean(1, keepdim=True) > 0.5
    if not hole.any():
        raise InputError(f"{mask_name} has no white pixel: nothing to fill")
    if hole.all():
        raise InputError(f"{mask_name} is white everywhere: no known pixel to copy from")
    return hole


def check_reference(reference: torch.Tensor, name: str = "reference") -> None:
    """Colorize takes its colours from ``reference``: it must be a colour picture."""
    if reference.shape[1] != 3:
        raise InputError(f"{name} is grayscale; colorize needs a colour reference")


def reconstruct_images(
    query: torch.Tensor,
    source: torch.Tensor,
    *,
    device: torch.device,
    seed: int = 0,
    patch_size: int = 7,
    k: int = 1,
    iters: int = 5,
    aggregation: str = "center",
    temperature_scale: float = 0.1,
    progress=None,
):
    """``(out, field)``: every pixel of ``query`` takes the colour that its ``k`` best-matching
    patches of ``source`` give it (``iters`` PatchMatch iterations, ``progress`` after each);
    ``field`` is the final :class:`psal.KNNField`. A grayscale picture beside a colour one is
    repeated over three channels."""
    import psal

    query, source = same_channels(query, source)
    query, source = query.to(device), source.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    field = psal.patchmatch(query, source, patch_size=patch_size, num_neighbors=k, num_iters=0, generator=gen)
    for i in range(iters):  # one iteration per call, so that progress shows
        field = psal.patchmatch(query, source, patch_size=patch_size, num_neighbors=k, num_iters=1, init=field, generator=gen)
        if progress is not None:
            progress(i + 1, iters)
    # Temperature: a tenth of the median best cost, so that clearly worse matches weigh little.
    temperature = float(field.costs[:, :, 0].median().clamp_min(1e-6)) * temperature_scale
    out = psal.attend(query, source, source, field.indices, patch_size=patch_size, temperature=temperature, aggregation=aggregation)
    return out, field


def colorize_image(
    gray: torch.Tensor,
    reference: torch.Tensor,
    *,
    device: torch.device,
    seed: int = 0,
    patch_size: int = 5,
    k: int = 4,
    iters: int = 6,
    temperature_scale: float = 0.5,
    match_luminance: bool = False,
    checkpoint: str | None = None,
    progress=None,
) -> torch.Tensor:
    """``gray`` coloured like ``reference`` (see :func:`psal.apps.colorize.colorize`); its
    luminance is kept (the caller checks the reference with :func:`check_reference`). With
    ``checkpoint`` (a path), the trained colour network there colours it instead
    (:mod:`psal.apps.colour_net`). ``progress`` is called once, at the end."""
    from psal.apps.colorize import colorize

    if checkpoint is not None:
        from psal.apps.colour_net import colorize_with_model

        out = colorize_with_model(gray.to(device), reference.to(device), _colour_model(checkpoint, device), seed=seed)
        if progress is not None:
            progress(1, 1)
        return out
    out = colorize(
        gray.to(device), reference.to(device), patch_size=patch_size, num_neighbors=k, num_iters=iters,
        temperature_scale=temperature_scale, match_luminance=match_luminance,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip
    if progress is not None:
        progress(1, 1)
    return out


def inpaint_image(
    image: torch.Tensor,
    hole: torch.Tensor,
    *,
    device: torch.device,
    seed: int = 0,
    patch_size: int = 5,
    iters: int = 10,
    checkpoint: str | None = None,
    progress=None,
) -> torch.Tensor:
    """``image`` with the pixels of ``hole`` (see :func:`hole_from_mask`) filled: by the zero-shot
    patch method (:func:`psal.apps.inpaint.inpaint`), or with ``checkpoint`` (a path) by one pass
    of that trained network. The other pixels are kept exactly."""
    from psal.apps.inpaint import inpaint

    if checkpoint is not None:
        out = _fill_with_model(checkpoint, image, hole, device, seed)
        if progress is not None:
            progress(1, 1)
        return out
    return inpaint(
        image.to(device), hole.to(device), patch_size=patch_size, num_iters=iters,
        generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
    )  # fmt: skip


def inpaint_video_frames(
    frames: torch.Tensor,
    hole: torch.Tensor,
    *,
    device: torch.device,
    seed: int = 0,
    patch_size: int | tuple[int, int, int] = (3, 5, 5),
    iters: int = 6,
    window: int = 24,
    progress=None,
    in_place: bool = False,
) -> torch.Tensor:
    """``frames`` ``(T, C, H, W)`` with the pixels of ``hole`` ``(T, H, W)`` filled by space-time
    patches (:func:`psal.apps.inpaint_video.inpaint_video`); the other pixels are kept exactly.
    ``in_place``: ``frames`` (on the device) is filled itself, no second copy of the video (the
    command line reads the video for this alone)."""
    from psal.apps.inpaint_video import inpaint_video

    video = frames.to(device).transpose(0, 1)[None]
    out = inpaint_video(
        video, hole.to(device), patch_size=patch_size, num_iters=iters, window=window,
        generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
        out=video if in_place else None,
    )  # fmt: skip
    return out[0].transpose(0, 1).cpu()


def _load_checkpoint(path: str, load, what: str, device: torch.device):
    """``load(path, map_location=device)`` of a trained network's checkpoint; a missing or wrong
    file is one line naming ``what`` the file should have been."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r}: no such file")
    try:
        return load(path, map_location=device)
    except Exception as exc:  # torch.load and load_state_dict raise many kinds on a wrong file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"checkpoint {path!r}: not {what} ({first[:160]})") from None


def _colour_model(path: str, device: torch.device):
    """The colour network of the checkpoint at ``path``, on ``device``."""
    from psal.apps.colour_net import load_pretrained

    return _load_checkpoint(path, load_pretrained, "a colour network of psal", device)


def colorize_video_frames(
    frames: torch.Tensor,
    keyframes: list[torch.Tensor],
    key_indices: list[int],
    *,
    device: torch.device,
    seed: int = 0,
    patch_size: int = 5,
    k: int = 4,
    iters: int = 6,
    temperature_scale: float = 0.5,
    checkpoint: str | None = None,
    progress=None,
) -> torch.Tensor:
    """``frames`` ``(T, C, H, W)`` coloured from the colour pictures ``keyframes``, which show the
    frames ``key_indices`` (:func:`psal.apps.colorize_video.colorize_video`); each frame keeps its
    luminance (the caller checks the keyframes with :func:`check_reference`). With
    ``checkpoint``, the trained colour network there colours every frame from the keyframe
    nearest to it in time (the earlier one on a tie), brought to the frames' size."""
    if checkpoint is not None:
        return _colorize_frames_with_model(frames, keyframes, key_indices, _colour_model(checkpoint, device), device, seed, progress)
    from psal.apps.colorize_video import colorize_video

    out = colorize_video(
        frames.to(device), [key.to(device) for key in keyframes], key_indices, patch_size=patch_size, num_neighbors=k,
        num_iters=iters, temperature_scale=temperature_scale, generator=torch.Generator(device=device).manual_seed(seed),
        progress=progress,
    )  # fmt: skip
    return out.cpu()


def _colorize_frames_with_model(frames, keyframes, key_indices, model, device, seed, progress):
    import torch.nn.functional as F

    from psal.apps.colour_net import colorize_with_model

    T, _, H, W = frames.shape
    keys = [
        (t, key.to(device) if key.shape[-2:] == (H, W) else F.interpolate(key.to(device), size=(H, W), mode="bilinear", antialias=True))
        for t, key in sorted(zip(key_indices, keyframes), key=lambda pair: pair[0])
    ]
    out = torch.empty(T, 3, H, W, dtype=torch.float32)
    for t in range(T):
        _, reference = min(keys, key=lambda pair: (abs(pair[0] - t), pair[0]))
        out[t] = colorize_with_model(frames[t : t + 1].to(device), reference, model, seed=seed)[0].cpu()
        if progress is not None:
            progress(t + 1, T)
    return out


def _fill_with_model(path, image, hole, device, seed):
    """One pass of the inpainting network of the checkpoint at ``path``."""
    from psal.apps.inpaint_net import inpaint_with_model, load_pretrained

    model = _load_checkpoint(path, load_pretrained, "an inpainting checkpoint of psal", device)
    return inpaint_with_model(image.to(device), hole.to(device), model.to(device), seed=seed)


def upscale_image(
    image: torch.Tensor,
    scale: int = 2,
    *,
    device: torch.device,
    seed: int = 0,
    method: str = "network",
    steps: int = UPSCALE_STEPS,
    patch_size: int = 7,
    k: int = 2,
    iters: int = 3,
    strength: float = 0.5,
    progress=None,
) -> torch.Tensor:
    """``image`` enlarged ``scale`` (2, 3 or 4) times: ``method="network"`` trains a small network
    on the picture itself for ``steps`` steps per stage (:func:`psal.apps.internal_sr.internal_upscale`);
    ``"patch"`` borrows detail from its own patches one scale lower (:func:`psal.apps.upscale.upscale`,
    with ``patch_size``, ``k``, ``iters`` and ``strength``)."""
    from psal.apps.internal_sr import internal_upscale
    from psal.apps.upscale import upscale

    if method == "patch":
        return upscale(
            image.to(device), scale, patch_size=patch_size, num_neighbors=k, num_iters=iters, strength=strength,
            generator=torch.Generator(device=device).manual_seed(seed), progress=progress,
        )  # fmt: skip
    if method != "network":
        raise ValueError(f"upscale: method must be 'network' or 'patch', got {method!r}")
    return internal_upscale(image.to(device), scale, steps=steps, seed=seed, progress=progress)
