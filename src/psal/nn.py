"""Modules: :class:`PSAttention` (the layer) and :class:`PSALBlock` (a non-local residual block)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import _checks as checks
from ._dispatch import BACKENDS
from .functional import ps_attention
from .types import KNNField


class PSAttention(nn.Module):
    """Patch-based stochastic attention as a layer: :func:`psal.ps_attention` with fixed options.

    Args:
        patch_size, num_neighbors, num_iters, aggregation, similarity, num_heads, backend: as in
            :func:`psal.ps_attention`.
        temperature: the softmax temperature ``T > 0``.
        learn_temperature: learn ``T`` (kept positive as ``exp`` of a parameter ``log_temperature``).
        warm_start: in training mode, start each call's search from the previous call's field when
            the shapes match (the result is never worse than that field). Off by default, because
            it makes an output depend on earlier calls. Not meant for ``torch.compile``.
        seed: the search's random draws come from this layer's own generator, seeded with it
            (``self.generator``, which may also be replaced); ``None``: from torch's global
            generator (``torch.manual_seed``). A ``generator=`` passed to ``forward`` wins.

    Shapes:
        ``forward(query, key=None, value=None, key_mask=None, generator=None)``: query ``(B, C, H, W)``, key
        ``(B, C, Hk, Wk)`` (default: the query, self-attention), value ``(B, Cv, Hk, Wk)``
        (default: the key), key_mask ``(B, Hk, Wk)`` bool -> ``(B, Cv, H, W)``, in the inputs'
        dtype (float16/bfloat16 computed in float32). Videos and volumes: ``(B, C, T, H, W)``
        and ``(B, C, Tk, Hk, Wk)``, key_mask ``(B, Tk, Hk, Wk)`` -> ``(B, Cv, T, H, W)``, with
        ``patch_size`` an odd int (a cube) or a ``(pt, ph, pw)`` triple.

    Raises:
        TypeError, ValueError: on a bad option here, or bad input to ``forward``, naming the
            argument and the shapes passed.

    Example:
        >>> layer = psal.PSAttention(patch_size=3, num_neighbors=4)
        >>> layer(torch.rand(2, 16, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int, int] = 3,
        num_neighbors: int = 3,
        num_iters: int = 5,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        aggregation: str = "center",
        similarity: str = "l2",
        num_heads: int = 1,
        warm_start: bool = False,
        backend: str = "auto",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        fn = "psal.PSAttention"
        # An int (a square patch, or a cube for videos) or a (pt, ph, pw) triple for videos only.
        self.patch_size = checks.check_patch_size(fn, patch_size, volume=isinstance(patch_size, (tuple, list)))
        self.num_neighbors = checks.check_int(fn, "num_neighbors", num_neighbors, 1)
        self.num_iters = checks.check_int(fn, "num_iters", num_iters, 0)
        checks.check_temperature(fn, temperature, torch.empty(0))
        self.aggregation = checks.check_aggregation(fn, aggregation)
        self.similarity = checks.check_similarity(fn, similarity)
        self.num_heads = checks.check_int(fn, "num_heads", num_heads, 1)
        self.backend = checks.check_choice(fn, "backend", backend, BACKENDS)
        self.warm_start = bool(warm_start)
        self.learn_temperature = bool(learn_temperature)
        if self.learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.temperature = float(temperature)
        self._field: KNNField | None = None
        self._field_key: tuple | None = None
        # Not a buffer: a generator is state of the run, not of the model, and stays on the CPU
        # (the seed it draws is passed to the kernels, whatever the device).
        self.generator = None if seed is None else torch.Generator().manual_seed(checks.check_int(fn, "seed", seed, 0))

    @property
    def current_temperature(self) -> float | torch.Tensor:
        """``T`` as used by ``forward``: a tensor when learned, else a float."""
        return self.log_temperature.exp() if self.learn_temperature else self.temperature

    def _init_field(self, query: torch.Tensor, key: torch.Tensor) -> KNNField | None:
        if not (self.warm_start and self.training) or self._field is None:
            return None
        if self._field_key != (tuple(query.shape), tuple(key.shape), query.device):
            return None
        return self._field

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        out, field = ps_attention(
            query,
            key,
            value,
            patch_size=self.patch_size,
            num_neighbors=self.num_neighbors,
            num_iters=self.num_iters,
            temperature=self.current_temperature,
            aggregation=self.aggregation,
            key_mask=key_mask,
            similarity=self.similarity,
            num_heads=self.num_heads,
            init=self._init_field(query, key),
            generator=self.generator if generator is None else generator,
            return_field=True,
            backend=self.backend,
        )
        if self.warm_start and self.training:
            self._field = field
            self._field_key = (tuple(query.shape), tuple(key.shape), query.device)
        return out

    def extra_repr(self) -> str:
        T = "learned" if self.learn_temperature else self.temperature
        return (
            f"patch_size={self.patch_size}, num_neighbors={self.num_neighbors}, num_iters={self.num_iters}, "
            f"temperature={T}, aggregation={self.aggregation!r}, similarity={self.similarity!r}, "
            f"num_heads={self.num_heads}"
        )


class PSALBlock(nn.Module):
    """A non-local residual block around :class:`PSAttention`.

    ``x + out(attention(q(x), k(c), v(c)))`` with 1x1 convolutions ``q``, ``k``, ``v``
    (``channels -> inner_channels``) and ``out`` (``inner_channels -> channels``), and ``c`` the
    context (``x`` itself for self-attention). ``out`` starts at zero, so a block inserted into a
    trained network starts as the identity.

    Args:
        channels: channels of ``x`` (and of the context).
        inner_channels: channels of query, key and value (default: ``channels``); divisible by
            ``num_heads``.
        shared_query_key: one projection for query and key (``self.key is self.query``), as in
            Reformer's shared-QK attention. The l2 search then compares like with like from the
            first step: with two random projections, the ``k`` matches found at initialisation
            are unrelated to the right ones and the block may never learn where to look (see
            ``python -m psal.examples.nonlocal_copy``). Recommended when training from scratch.
        **attention_options: passed to :class:`PSAttention`.

    Shapes:
        ``forward(x, context=None, key_mask=None, generator=None)``: x ``(B, channels, H, W)``, context
        ``(B, channels, Hk, Wk)``, key_mask ``(B, Hk, Wk)`` bool -> ``(B, channels, H, W)``; or
        videos ``(B, channels, T, H, W)``, ``(B, channels, Tk, Hk, Wk)``, ``(B, Tk, Hk, Wk)`` (the
        1x1 projections are the same weights, applied per voxel).

    Raises:
        TypeError, ValueError: on a bad option (``inner_channels`` not divisible by ``num_heads``
            among them), or an ``x`` or ``context`` that is not ``(B, channels, H, W)`` or
            ``(B, channels, T, H, W)`` (both maps or both videos).

    Example:
        >>> block = psal.PSALBlock(16, num_neighbors=4)
        >>> x = torch.rand(2, 16, 24, 24)
        >>> torch.equal(block(x), x)  # identity at initialisation
        True
    """

    def __init__(self, channels: int, inner_channels: int | None = None, shared_query_key: bool = False, **attention_options: Any) -> None:
        super().__init__()
        fn = "psal.PSALBlock"
        self.channels = checks.check_int(fn, "channels", channels, 1)
        inner = channels if inner_channels is None else checks.check_int(fn, "inner_channels", inner_channels, 1)
        heads = attention_options.get("num_heads", 1)
        if isinstance(heads, int) and inner % heads:
            raise ValueError(f"{fn}: inner_channels={inner} must be divisible by num_heads={heads}")
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = self.query if shared_query_key else nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)
        self.attention = PSAttention(**attention_options)

    def _check(self, name: str, t: object) -> None:
        fn = "psal.PSALBlock"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (4, 5) or t.shape[1] != self.channels:
            raise ValueError(
                f"{fn}: {name} must have shape (B, {self.channels}, H, W) or (B, {self.channels}, T, H, W), got {tuple(t.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self._check("x", x)
        if context is None:
            context = x
        else:
            self._check("context", context)
            if context.dim() != x.dim():
                raise ValueError(
                    f"psal.PSALBlock: x and context must both be maps or both videos, got x {tuple(x.shape)} and context {tuple(context.shape)}"
                )
        q, k, v = _pointwise(self.query, x), _pointwise(self.key, context), _pointwise(self.value, context)
        y = self.attention(q, k, v, key_mask=key_mask, generator=generator)
        return x + _pointwise(self.out, y)


def _pointwise(conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of a map, or of a video ``(B, C, T, H, W)`` seen as the map
    ``(B, C, T * H, W)`` (a view; the same weights at every voxel)."""
    if t.dim() == 4:
        return conv(t)
    return conv(t.flatten(2, 3)).unflatten(2, t.shape[2:4])
