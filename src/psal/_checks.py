"""Input validation: the one place where arguments are checked.

Every public function validates here and passes plain, trusted values down to the backends, which
check nothing. Errors are ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
value or shape); each message names the function, the argument and what was passed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

SIMILARITIES = ("l2", "dot")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(fn: str, name: str, value, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_patch_size(fn: str, patch_size) -> int:
    if not _is_int(patch_size):
        raise TypeError(
            f"{fn}: patch_size must be an odd int >= 1, got {type(patch_size).__name__} {patch_size!r}"
        )
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"{fn}: patch_size must be an odd int >= 1, got {patch_size}")
    return int(patch_size)


def check_similarity(fn: str, similarity) -> str:
    if similarity not in SIMILARITIES:
        raise ValueError(
            f"{fn}: similarity must be one of {', '.join(map(repr, SIMILARITIES))}, got {similarity!r}"
        )
    return similarity


@dataclass(frozen=True)
class MapShapes:
    """Sizes read off a validated query/key pair."""

    batch: int
    channels: int
    height: int
    width: int
    key_height: int
    key_width: int
    num_heads: int

    @property
    def num_keys(self) -> int:
        return self.key_height * self.key_width


def _check_feature_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{fn}: {name} must be a 4-D tensor (B, C, H, W), got shape {_shape(t)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must have a floating-point dtype, got {t.dtype} with shape {_shape(t)}")


def check_query_key(fn: str, query, key, num_heads) -> MapShapes:
    """Check a query ``(B, C, H, W)`` and key ``(B, C, Hk, Wk)`` pair and the head count."""
    _check_feature_tensor(fn, "query", query)
    _check_feature_tensor(fn, "key", key)
    if query.device != key.device:
        raise ValueError(f"{fn}: query and key must be on one device, got query on {query.device} and key on {key.device}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(
            f"{fn}: query and key must have the same batch size, got query {_shape(query)} and key {_shape(key)}"
        )
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"{fn}: query and key must have the same number of channels, got query {_shape(query)} and key {_shape(key)}"
        )
    num_heads = check_int(fn, "num_heads", num_heads, 1)
    if query.shape[1] % num_heads != 0:
        raise ValueError(
            f"{fn}: the channels of query {_shape(query)} must be divisible by num_heads={num_heads}"
        )
    B, C, H, W = query.shape
    return MapShapes(B, C, H, W, key.shape[2], key.shape[3], num_heads)


def check_key_mask(fn: str, key_mask, shapes: MapShapes, device: torch.device):
    """Return the mask as given (bool, ``(B, Hk, Wk)``) or ``None``."""
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"{fn}: key_mask must be a bool torch.Tensor or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        raise TypeError(f"{fn}: key_mask must have dtype torch.bool (True = may be matched), got {key_mask.dtype}")
    expected = (shapes.batch, shapes.key_height, shapes.key_width)
    if tuple(key_mask.shape) != expected:
        raise ValueError(
            f"{fn}: key_mask must have shape (B, Hk, Wk) = {expected}, got {_shape(key_mask)}"
        )
    if key_mask.device != device:
        raise ValueError(f"{fn}: key_mask must be on the inputs' device {device}, got {key_mask.device}")
    return key_mask


def check_num_neighbors(fn: str, num_neighbors, key_mask, shapes: MapShapes) -> int:
    """``num_neighbors`` must be >= 1 and at most the number of allowed keys of every batch element."""
    k = check_int(fn, "num_neighbors", num_neighbors, 1)
    if k > shapes.num_keys:
        raise ValueError(
            f"{fn}: num_neighbors={k} is more than the {shapes.num_keys} key positions of a "
            f"{shapes.key_height}x{shapes.key_width} key map"
        )
    if key_mask is not None and shapes.batch > 0:
        # One explicit sync, at the boundary, only when a mask is given.
        allowed = key_mask.flatten(1).sum(1)
        fewest = int(allowed.min())
        if k > fewest:
            b = int(allowed.argmin())
            raise ValueError(
                f"{fn}: num_neighbors={k} is more than the {fewest} positions that key_mask "
                f"{_shape(key_mask)} allows in batch element {b}"
            )
    return k


def check_field_indices(fn: str, name: str, indices, shapes: MapShapes, device: torch.device, k=None):
    """Indices ``(B, heads, k, H, W)``, int64, flat key positions in ``[0, Hk * Wk)``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{fn}: {name} must have dtype torch.int64, got {indices.dtype}")
    B, h, H, W = shapes.batch, shapes.num_heads, shapes.height, shapes.width
    if (
        indices.dim() != 5
        or tuple(indices.shape[:2]) != (B, h)
        or tuple(indices.shape[3:]) != (H, W)
        or indices.shape[2] < 1
        or (k is not None and indices.shape[2] != k)
    ):
        want = f"(B, heads, {'k' if k is None else k}, H, W) = ({B}, {h}, {'k' if k is None else k}, {H}, {W})"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {_shape(indices)}")
    if indices.device != device:
        raise ValueError(f"{fn}: {name} must be on the inputs' device {device}, got {indices.device}")
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= shapes.num_keys:
            raise ValueError(
                f"{fn}: {name} must hold flat key positions in [0, {shapes.num_keys}) for a "
                f"{shapes.key_height}x{shapes.key_width} key map, got values in [{lo}, {hi}]"
            )
    return indices


def check_init(fn: str, init, shapes: MapShapes, device: torch.device):
    """A warm-start field: a ``KNNField`` (or any object with ``indices``) or ``None``."""
    if init is None:
        return None
    indices = getattr(init, "indices", None)
    if isinstance(init, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError(f"{fn}: init must be a psal.KNNField or None, got {type(init).__name__}")
    return check_field_indices(fn, "init.indices", indices, shapes, device)


def check_generator(fn: str, generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator
