"""A small trained inpainting network with a PSAL block, and the two models it is compared with.

:class:`InpaintNet` is a U-shaped encoder-decoder (full, half and quarter resolution) with one
mixing block at half resolution, a shallow level where the features still describe small patches:

- ``mixer="psal"``: a :class:`psal.PSALBlock` doing masked self-attention: every position
  attends to the ``k`` best-matching positions whose features are known (``key_mask``: the
  half-resolution pixels with no hole under them), found anywhere in the image by PatchMatch;
- ``mixer="full"``: the same block with dense attention over all known positions
  (:func:`psal.full_attention`), O(N²) time;
- ``mixer="conv"``: the same block with the attention replaced by a 3x3 convolution (grouped so
  that the three models have nearly the same number of parameters): local mixing only.

The input is the image with its hole zeroed and the mask as a fourth channel; the output keeps
the known pixels and fills the hole. Sizes that are not multiples of 4 are padded (replicate) and
cropped back. :func:`load_pretrained` loads the weights shipped with the package
(``psal/weights/inpaint_psal.pt``, trained by ``python -m psal.examples.train_inpainting``).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import full_attention
from ..nn import PSALBlock, PSAttention

__all__ = ["InpaintNet", "MIXERS", "inpaint_with_model", "load_pretrained", "PRETRAINED_PATH"]

MIXERS = ("psal", "conv", "full")
PRETRAINED_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "inpaint_psal.pt")
_FN = "psal.apps.InpaintNet"


class FullAttention(nn.Module):
    """Dense attention over every allowed key patch, with :class:`psal.PSAttention`'s interface
    (a learned temperature, ``forward(query, key, value, key_mask)``).

    ``method="auto"``: :func:`psal.full_attention` (a fused, memory-efficient kernel: O(N) memory,
    O(N²) time). ``method="naive"``: the softmax matrix materialised, as non-local blocks usually
    do (O(N²) memory, kept for the backward): the same result, for memory comparisons.
    """

    def __init__(self, patch_size: int = 3, temperature: float = 1.0, method: str = "auto") -> None:
        super().__init__()
        if method not in ("auto", "naive"):
            raise ValueError(f"FullAttention: method must be 'auto' or 'naive', got {method!r}")
        self.patch_size, self.method = patch_size, method
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """As :class:`psal.PSAttention`'s; ``generator`` is taken and unused (nothing is random)."""
        T = self.log_temperature.exp()
        if self.method == "auto":
            return full_attention(query, key, value, patch_size=self.patch_size, temperature=T, key_mask=key_mask)
        r = self.patch_size // 2
        q = F.unfold(F.pad(query, (r,) * 4, mode="replicate"), self.patch_size)  # (B, D, N)
        k = F.unfold(F.pad(key, (r,) * 4, mode="replicate"), self.patch_size)
        cost = q.square().sum(1)[:, :, None] - 2 * q.transpose(1, 2) @ k + k.square().sum(1)[:, None, :]
        logits = -cost / T  # (B, N, Nk)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.flatten(1)[:, None, :], float("-inf"))
        out = value.flatten(2) @ logits.softmax(-1).transpose(1, 2)  # (B, Cv, N)
        return out.view_as(value)


class ConvMixer(nn.Module):
    """``x + out(GELU(conv3x3(x)))``: the local stand-in for attention, with as many weights."""

    def __init__(self, channels: int, groups: int = 3) -> None:
        super().__init__()
        while channels % groups:
            groups -= 1
        self.mid = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.out(F.gelu(self.mid(x)))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GELU())


class InpaintNet(nn.Module):
    """Encoder-decoder for inpainting with one mixing block at half resolution.

    Args:
        mixer: ``"psal"``, ``"conv"`` or ``"full"`` (see the module docstring).
        width: channels at full resolution (twice at half, four times at quarter resolution).
        num_neighbors, patch_size: of the attention (``"psal"`` and ``"full"``).
        full_method: ``"auto"`` or ``"naive"``, see :class:`FullAttention` (``"full"`` only).

    Shapes:
        ``forward(image, hole)``: image ``(B, 3, H, W)`` in ``[0, 1]``, hole ``(B, 1, H, W)``
        bool (True = to fill) -> ``(B, 3, H, W)``, equal to ``image`` outside the hole.
    """

    def __init__(
        self, mixer: str = "psal", width: int = 24, num_neighbors: int = 4, patch_size: int = 3, full_method: str = "auto"
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"{_FN}: mixer must be one of {', '.join(MIXERS)}, got {mixer!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{_FN}: width must be an int >= 1, got {width!r}")
        self.mixer_kind, self.width = mixer, width
        w = width
        self.enc1 = nn.Sequential(_conv(4, w), _conv(w, w))
        self.enc2 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.mixer: nn.Module
        if mixer == "conv":
            self.mixer = ConvMixer(2 * w)
        else:
            self.mixer = PSALBlock(
                2 * w, shared_query_key=True, patch_size=patch_size, num_neighbors=num_neighbors, learn_temperature=True
            )  # fmt: skip
            if mixer == "full":
                self.mixer.attention = FullAttention(patch_size, method=full_method)  # type: ignore[assignment]  # same call shape
        self.dec2 = nn.Sequential(_conv(4 * w + 2 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec1 = nn.Sequential(_conv(2 * w + w, w), _conv(w, w))
        self.head = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        _check(image, hole)
        H, W = image.shape[-2:]
        ph, pw = (-H) % 4, (-W) % 4
        m = hole.to(image.dtype)
        x = torch.cat([image * (1 - m), m], 1)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            m = F.pad(m, (0, pw, 0, ph), mode="replicate")
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        # Known half-resolution positions: no hole pixel under them.
        known = F.max_pool2d(m, 2)[:, 0] == 0
        if self.mixer_kind == "conv":
            e2 = self.mixer(e2)
        else:
            # An image whose hole covers every position lets the block attend anywhere.
            known = known | ~known.flatten(1).any(1)[:, None, None]
            e2 = self.mixer(e2, key_mask=known)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        out = torch.sigmoid(self.head(d1))[..., :H, :W]
        return torch.where(hole, out, image)


def _check(image, hole):
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"{_FN}: image must be a floating-point tensor, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{_FN}: image must have shape (B, 3, H, W), got {tuple(image.shape)}")
    if not isinstance(hole, torch.Tensor) or hole.dtype != torch.bool:
        raise TypeError(f"{_FN}: hole must be a bool tensor (True = to fill), got {getattr(hole, 'dtype', type(hole).__name__)}")
    if hole.shape != (image.shape[0], 1, *image.shape[-2:]):
        raise ValueError(
            f"{_FN}: hole must have shape (B, 1, H, W) = {(image.shape[0], 1, *image.shape[-2:])} "
            f"for image {tuple(image.shape)}, got {tuple(hole.shape)}"
        )


def load_pretrained(path: str | None = None, map_location: str | torch.device = "cpu") -> InpaintNet:
    """The shipped PSAL inpainting model (or the checkpoint at ``path``), in eval mode.

    Reads either a bare ``state_dict`` with its ``config`` or a training checkpoint of
    ``python -m psal.examples.train_inpainting``, with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no file at ``path``. What ``torch.load`` and ``load_state_dict``
            raise for a file that is not such a checkpoint (a ``KeyError`` without its
            ``config``, a ``RuntimeError`` for weights of another shape).
    """
    path = PRETRAINED_PATH if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no weights at {path!r}")
    saved = torch.load(path, map_location=map_location, weights_only=True)
    config = saved["config"]
    model = InpaintNet(config["mixer"], width=config["width"], num_neighbors=config["num_neighbors"])
    model.load_state_dict(saved["model"])
    return model.eval()


@torch.no_grad()
def inpaint_with_model(image: torch.Tensor, hole: torch.Tensor, model: InpaintNet | None = None, seed: int | None = None) -> torch.Tensor:
    """Fill ``hole`` of ``image`` (``(1, C, H, W)``, C = 1 or 3) with a trained :class:`InpaintNet`
    (default: :func:`load_pretrained`); known pixels are returned bitwise unchanged. ``seed``: the
    PSAL layers' searches draw from their own generators, seeded with it (else from theirs as
    they are, or torch's global one).

    Raises:
        TypeError, ValueError: on an image or hole of another shape, dtype or device, naming them.
    """
    if model is None:
        model = load_pretrained(map_location=image.device)
    if seed is not None:
        for m in model.modules():
            if isinstance(m, PSAttention):
                m.generator = torch.Generator().manual_seed(seed)
    hole = hole.reshape(image.shape[0], 1, *image.shape[-2:])
    rgb = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
    param = next(model.parameters())
    out = model(rgb.to(param), hole.to(param.device)).to(image)
    hole = hole.to(image.device)
    if image.shape[1] == 1:
        out = out.mean(1, keepdim=True)
    return torch.where(hole, out, image)


def hole_l1(out: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The training loss: mean absolute error over the hole's pixels (all channels)."""
    h = hole.expand_as(out).to(out.dtype)
    return ((out - target).abs() * h).sum() / h.sum().clamp_min(1)
