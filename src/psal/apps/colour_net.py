"""A small trained colour network: a gray frame coloured from a colour reference frame through PSAL
cross-attention (the experiment of the PSAL authors' code history), and its two twins.

:class:`ColourNet` works in CIE Lab at full resolution:

- matching features, learnt: one small convolutional encoder (shared, siamese) maps the target's
  luminance and the reference's to ``features`` channels; the query is the target's, the key the
  reference's. With ``hand_features`` (the default) the encoder also reads the zero-shot
  colorizer's luminance statistics (``psal.apps.colorize._features``, each channel divided by
  its spread over the pair); they are added in a second stage of training, to a network trained
  without them (trained with them from the start, it learnt to match far worse);
- the value: the reference's chroma (a, b) and ``values - 2`` learnt channels of the reference's
  Lab;
- what the reference brings to each target pixel (its key features and value), by the mixer,
  one of :data:`MIXERS`, the only part in which the three models differ:

  - ``"psal"``: :class:`psal.PSAttention` (``patch_size``, ``num_neighbors``, a learnt
    temperature): every target pixel attends to the ``k`` reference patches that match it best,
    found anywhere in the reference by PatchMatch;
  - ``"full"``: dense attention over every reference patch (:func:`psal.full_attention`, O(N²)
    time), at the resolution it fits: query, key and value averaged over ``full_stride`` x
    ``full_stride`` blocks, the result brought back up bilinearly;
  - ``"conv"``: no matching: the reference's features and value *at the same position* as the
    target pixel (the reference concatenated, as a convolutional network takes it);

- then, with the same weights' shapes for all three: convolutions over the target's features and
  what was brought mix them (``mixed = value + mix(...)``), and a refinement fixes what the
  matches get wrong (``ab = mixed[:2] + refine(...)``). The models have the same parameters but
  for the attention's learnt temperature.

The target keeps its luminance; only a and b are predicted (Lab units). A reference of another
size than the target is resized to it for the ``"conv"`` twin only (it reads by position).
:func:`load_pretrained` reads the weights shipped with the package
(``psal/weights/colour_psal.pt``, trained by ``python -m psal.examples.train_colorization``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import full_attention
from ..nn import PSAttention
from .colorize import _FEATURE_CHANNELS, _feature_scale, _features, _luminance, lab_from_rgb, rgb_from_lab

__all__ = ["ColourNet", "MIXERS", "PRETRAINED_PATH", "colorize_with_model", "load_pretrained", "with_hand_features"]

MIXERS = ("psal", "conv", "full")
PRETRAINED_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "colour_psal.pt")
_FN = "psal.apps.ColourNet"
# Lab units per unit of the network's chroma channels.
_AB_SCALE = 100.0
# The zero-shot colorizer's luminance statistics that ``hand_features`` adds to the encoder's input.
HAND_FEATURES = _FEATURE_CHANNELS


def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU())


class ColourNet(nn.Module):
    """Colour a gray target from a colour reference (see the module docstring).

    Args:
        mixer: ``"psal"``, ``"conv"`` or ``"full"``.
        width: channels of the hidden convolutions.
        features: channels of the matching features (query and key).
        values: channels of the value (the reference's a and b, and ``values - 2`` learnt).
        patch_size, num_neighbors: of the attention (``"psal"`` and ``"full"``).
        hand_features: the encoder also reads the zero-shot colorizer's luminance statistics of
            the pair (False: the luminance only).

    Shapes:
        ``forward(target, reference)``: target ``(B, 1 or 3, H, W)`` in ``[0, 1]`` (read for its
        luminance), reference ``(B, 3, Hr, Wr)`` in ``[0, 1]`` -> the target's chroma
        ``(B, 2, H, W)`` in Lab units.
    """

    def __init__(
        self,
        mixer: str = "psal",
        width: int = 24,
        features: int = 16,
        values: int = 8,
        patch_size: int = 5,
        num_neighbors: int = 4,
        full_stride: int = 2,
        hand_features: bool = True,
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"{_FN}: mixer must be one of {', '.join(MIXERS)}, got {mixer!r}")
        for name, v, low in (("width", width, 1), ("features", features, 1), ("values", values, 3)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{_FN}: {name} must be an int >= {low}, got {v!r}")
        self.mixer_kind = mixer
        self.config: dict[str, Any] = dict(
            mixer=mixer, width=width, features=features, values=values, patch_size=patch_size, num_neighbors=num_neighbors,
            full_stride=full_stride, hand_features=hand_features,
        )  # fmt: skip
        self.features, self.full_stride = features, full_stride
        self.hand_features = hand_features
        self.encode = nn.Sequential(
            _conv(1 + HAND_FEATURES * hand_features, width), _conv(width, width), nn.Conv2d(width, features, 3, padding=1)
        )
        self.value = nn.Sequential(_conv(3, width), nn.Conv2d(width, values - 2, 3, padding=1))
        self.attention: PSAttention | None = None
        if mixer == "psal":
            self.attention = PSAttention(patch_size=patch_size, num_neighbors=num_neighbors, learn_temperature=True, temperature=1.0)
        elif mixer == "full":
            self.log_temperature = nn.Parameter(torch.tensor(0.0))
        self.mix = nn.Sequential(_conv(2 * features + values, width), _conv(width, width), nn.Conv2d(width, values, 3, padding=1))
        self.patch_size = patch_size
        self.refine = nn.Sequential(_conv(1 + features + values, width), _conv(width, width), nn.Conv2d(width, 2, 3, padding=1))

    def forward(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        _check(target, reference)
        L = _luminance(target) / 100
        ref = lab_from_rgb(reference)
        if self.mixer_kind == "conv" and ref.shape[-2:] != L.shape[-2:]:
            ref = F.interpolate(ref, size=L.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        Lr, ab_r = ref[:, :1] / 100, ref[:, 1:] / _AB_SCALE
        if self.hand_features:
            fq, fk = _features(L * 100), _features(Lr * 100)
            scale = _feature_scale(fq, fk)
            q, k = self.encode(torch.cat([L, fq / scale], 1)), self.encode(torch.cat([Lr, fk / scale], 1))
        else:
            q, k = self.encode(L), self.encode(Lr)
        v = torch.cat([k, ab_r, self.value(torch.cat([Lr, ab_r], 1))], 1)  # what a match brings
        if self.attention is not None:
            brought = self.attention(q, k, v)
        elif self.mixer_kind == "full":
            s = self.full_stride
            low = [F.avg_pool2d(x, s, ceil_mode=True) if s > 1 else x for x in (q, k, v)]
            brought = full_attention(*low, patch_size=self.patch_size, temperature=self.log_temperature.exp())
            if s > 1:
                brought = F.interpolate(brought, size=q.shape[-2:], mode="bilinear", align_corners=False)
        else:
            brought = v  # the reference at the same position
        mixed = brought[:, self.features :] + self.mix(torch.cat([q, brought], 1))
        ab = mixed[:, :2] + self.refine(torch.cat([L, q, mixed], 1))
        return ab * _AB_SCALE


def _check(target, reference) -> None:
    for name, t, channels in (("target", target, (1, 3)), ("reference", reference, (3,))):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{_FN}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 4 or t.shape[1] not in channels:
            want = "(B, 1 or 3, H, W)" if len(channels) == 2 else "(B, 3, H, W)"
            raise ValueError(f"{_FN}: {name} must have shape {want}, got {tuple(t.shape)}")
    if target.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{_FN}: target and reference must have the same batch size, got {tuple(target.shape)} and {tuple(reference.shape)}"
        )


def with_hand_features(model: ColourNet) -> ColourNet:
    """A copy of ``model`` (trained without ``hand_features``) that reads them, computing what
    ``model`` computes: every weight copied, the encoder's first convolution given zero weights
    for the new input channels (the second stage of ``python -m psal.examples.train_colorization``)."""
    if model.hand_features:
        raise ValueError(f"with_hand_features: the model reads them already ({model.config})")
    out = ColourNet(**(model.config | {"hand_features": True}))
    state = dict(model.state_dict())
    w = state["encode.0.0.weight"]
    state["encode.0.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], HAND_FEATURES, *w.shape[2:])], 1)
    out.load_state_dict(state)
    return out


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_pretrained(path: str | None = None, map_location: str | torch.device = "cpu") -> ColourNet:
    """The shipped PSAL colour network (or the checkpoint at ``path``), in eval mode: a bare
    ``state_dict`` with its ``config``, or a training checkpoint of
    ``python -m psal.examples.train_colorization`` (``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: no file at ``path``; what ``torch.load`` and ``load_state_dict`` raise
        for a file that is not such a checkpoint.
    """
    path = PRETRAINED_PATH if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no weights at {path!r}")
    saved = torch.load(path, map_location=map_location, weights_only=True)
    model = ColourNet(**{"hand_features": False} | saved["config"])  # a config from before the option: without
    model.load_state_dict(saved["model"])
    return model.eval()


@torch.no_grad()
def colorize_with_model(
    target: torch.Tensor, reference: torch.Tensor, model: ColourNet | None = None, seed: int | None = None
) -> torch.Tensor:
    """``target`` ``(1, 1 or 3, H, W)`` coloured from ``reference`` ``(1, 3, Hr, Wr)`` by a trained
    :class:`ColourNet` (default: :func:`load_pretrained`) -> ``(1, 3, H, W)`` in ``[0, 1]``; the
    target keeps its luminance. ``seed`` seeds the PSAL layer's search."""
    if model is None:
        model = load_pretrained(map_location=target.device)
    if seed is not None and isinstance(model.attention, PSAttention):
        model.attention.generator = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    ab = model(target.to(param), reference.to(param))
    L = _luminance(target.to(param))
    return rgb_from_lab(torch.cat([L, ab], 1)).to(target.dtype)


def mse_ab(pred: torch.Tensor, truth_ab: torch.Tensor) -> torch.Tensor:
    """The training loss: mean squared error of the chroma, in units of ``_AB_SCALE`` Lab."""
    return (pred - truth_ab).div(_AB_SCALE).square().mean()


def chroma_psnr_ab(pred: torch.Tensor, truth_ab: torch.Tensor) -> float:
    """Chroma PSNR (range 256, as ``apps.metrics.chroma_psnr``) of predicted and true a, b."""
    return float(10 * math.log10(256.0**2 / max(float((pred - truth_ab).square().mean()), 1e-12)))
