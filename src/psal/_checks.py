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
AGGREGATIONS = ("center", "patch", "patch_mean")


def is_real_number(x: object) -> bool:
    """A real number that is not a bool (numpy's scalars included). A function, not an inline
    ``isinstance``: mypy reads ``isinstance(x, numbers.Real)`` as never true of a float and would
    skip what follows as unreachable."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def data_checks_enabled(t: torch.Tensor) -> bool:
    """Checks that read tensor values (one device sync each) run in eager mode, on real tensors.

    Under ``torch.compile`` they would break the graph, and meta tensors have no values; shapes,
    dtypes and devices are still checked there.
    """
    return not torch.compiler.is_compiling() and t.device.type != "meta"


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


def check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_patch_size(fn: str, patch_size, volume: bool = False):
    """An odd int ``p >= 1`` (a map's square patch); for a volume also a ``(pt, ph, pw)`` triple
    of odd ints. Returns the int for a map and the triple for a volume (an int is a cube)."""
    if volume and isinstance(patch_size, (tuple, list)):
        if len(patch_size) != 3 or not all(_is_int(p) for p in patch_size):
            raise TypeError(f"{fn}: patch_size must be an odd int or a (pt, ph, pw) triple of odd ints, got {patch_size!r}")
        if any(p < 1 or p % 2 == 0 for p in patch_size):
            raise ValueError(f"{fn}: patch_size must be an odd int or a (pt, ph, pw) triple of odd ints >= 1, got {tuple(patch_size)}")
        return tuple(int(p) for p in patch_size)
    if not _is_int(patch_size):
        what = "an odd int >= 1 or a (pt, ph, pw) triple" if volume else "an odd int >= 1 (a triple only for 5-D inputs)"
        raise TypeError(f"{fn}: patch_size must be {what}, got {type(patch_size).__name__} {patch_size!r}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"{fn}: patch_size must be an odd int >= 1, got {patch_size}")
    return (int(patch_size),) * 3 if volume else int(patch_size)


def check_choice(fn: str, name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_aggregation(fn: str, aggregation) -> str:
    return check_choice(fn, "aggregation", aggregation, AGGREGATIONS)


def check_similarity(fn: str, similarity) -> str:
    return check_choice(fn, "similarity", similarity, SIMILARITIES)


@dataclass(frozen=True)
class MapShapes:
    """Sizes read off a validated query/key pair: maps ``(B, C, H, W)``, or space-time volumes
    ``(B, C, T, H, W)`` (``volume``; ``frames`` and ``key_frames`` are 1 for maps)."""

    batch: int
    channels: int
    height: int
    width: int
    key_height: int
    key_width: int
    num_heads: int
    frames: int = 1
    key_frames: int = 1
    volume: bool = False

    @property
    def num_keys(self) -> int:
        return self.key_frames * self.key_height * self.key_width

    @property
    def num_queries(self) -> int:
        return self.frames * self.height * self.width

    @property
    def spatial(self) -> tuple:
        """The query's spatial shape: ``(H, W)`` or ``(T, H, W)``."""
        return (self.frames, self.height, self.width) if self.volume else (self.height, self.width)

    @property
    def key_spatial(self) -> tuple:
        return (self.key_frames, self.key_height, self.key_width) if self.volume else (self.key_height, self.key_width)

    @property
    def key_size(self) -> str:
        """The key for messages: ``"HkxWk key map"`` or ``"TkxHkxWk key volume"``."""
        return "x".join(str(n) for n in self.key_spatial) + (" key volume" if self.volume else " key map")


_LAYOUTS = {4: "(B, C, H, W)", 5: "(B, C, T, H, W)"}


def _check_feature_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in _LAYOUTS:
        raise ValueError(f"{fn}: {name} must be a 4-D map (B, C, H, W) or a 5-D volume (B, C, T, H, W), got shape {_shape(t)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must have a floating-point dtype, got {t.dtype} with shape {_shape(t)}")


def check_query_key(fn: str, query, key, num_heads) -> MapShapes:
    """Check a query ``(B, C, H, W)`` and key ``(B, C, Hk, Wk)`` pair and the head count."""
    _check_feature_tensor(fn, "query", query)
    _check_feature_tensor(fn, "key", key)
    if query.dim() != key.dim():
        raise ValueError(
            f"{fn}: query and key must both be maps (B, C, H, W) or both volumes (B, C, T, H, W), "
            f"got query {_shape(query)} and key {_shape(key)}"
        )
    if query.device != key.device:
        raise ValueError(f"{fn}: query and key must be on one device, got query on {query.device} and key on {key.device}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"{fn}: query and key must have the same batch size, got query {_shape(query)} and key {_shape(key)}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"{fn}: query and key must have the same number of channels, got query {_shape(query)} and key {_shape(key)}")
    num_heads = check_int(fn, "num_heads", num_heads, 1)
    if query.shape[1] % num_heads != 0:
        raise ValueError(f"{fn}: the channels of query {_shape(query)} must be divisible by num_heads={num_heads}")
    B, C = query.shape[:2]
    H, W, Hk, Wk = query.shape[-2], query.shape[-1], key.shape[-2], key.shape[-1]
    if query.dim() == 5:
        return MapShapes(B, C, H, W, Hk, Wk, num_heads, query.shape[2], key.shape[2], True)
    return MapShapes(B, C, H, W, Hk, Wk, num_heads)


def check_key_mask(fn: str, key_mask, shapes: MapShapes, device: torch.device):
    """Return the mask as given (bool, ``(B, Hk, Wk)``, or ``(B, Tk, Hk, Wk)`` for volumes) or ``None``."""
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"{fn}: key_mask must be a bool torch.Tensor or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        raise TypeError(f"{fn}: key_mask must have dtype torch.bool (True = may be matched), got {key_mask.dtype}")
    expected = (shapes.batch, *shapes.key_spatial)
    if tuple(key_mask.shape) != expected:
        names = "(B, Tk, Hk, Wk)" if shapes.volume else "(B, Hk, Wk)"
        raise ValueError(f"{fn}: key_mask must have shape {names} = {expected}, got {_shape(key_mask)}")
    if key_mask.device != device:
        raise ValueError(f"{fn}: key_mask must be on the inputs' device {device}, got {key_mask.device}")
    return key_mask


def check_num_neighbors(fn: str, num_neighbors, key_mask, shapes: MapShapes) -> int:
    """``num_neighbors`` must be >= 1 and at most the number of allowed keys of every batch element."""
    k = check_int(fn, "num_neighbors", num_neighbors, 1)
    if k > shapes.num_keys:
        raise ValueError(f"{fn}: num_neighbors={k} is more than the {shapes.num_keys} key positions of a {shapes.key_size}")
    if key_mask is not None and shapes.batch > 0 and data_checks_enabled(key_mask):
        # One explicit sync, at the boundary, only when a mask is given.
        allowed = key_mask.flatten(1).sum(1)
        fewest = int(allowed.min())
        if k > fewest:
            b = int(allowed.argmin())
            raise ValueError(
                f"{fn}: num_neighbors={k} is more than the {fewest} positions that key_mask {_shape(key_mask)} allows in batch element {b}"
            )
    return k


def check_mask_allows_a_key(fn: str, key_mask, shapes: MapShapes) -> None:
    """Every batch element must allow at least one key position (one sync, eager only)."""
    if key_mask is None or shapes.batch == 0 or not data_checks_enabled(key_mask):
        return
    allowed = key_mask.flatten(1).any(1)
    if not bool(allowed.all()):
        b = int((~allowed).nonzero()[0, 0])
        raise ValueError(f"{fn}: key_mask {_shape(key_mask)} allows no key position in batch element {b}")


def check_field_indices(
    fn: str, name: str, indices, shapes: MapShapes, device: torch.device, k=None, positions=None, dtypes=(torch.int64,)
):
    """Indices ``(B, heads, k, H, W)`` (``(B, heads, k, T, H, W)`` for volumes, ``(B, heads, k,
    M)`` with ``M`` sparse query ``positions``), of one of ``dtypes`` (int64; the attention also
    takes int32), flat key positions in ``[0, Nk)``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype {allowed}, got {indices.dtype}")
    B, h = shapes.batch, shapes.num_heads
    spatial = shapes.spatial if positions is None else (positions.numel(),)
    if (
        indices.dim() != 3 + len(spatial)
        or tuple(indices.shape[:2]) != (B, h)
        or tuple(indices.shape[3:]) != spatial
        or indices.shape[2] < 1
        or (k is not None and indices.shape[2] != k)
    ):
        kk = "k" if k is None else k
        if positions is None:
            names = "T, H, W" if shapes.volume else "H, W"
            want = f"(B, heads, {kk}, {names}) = ({B}, {h}, {kk}, {', '.join(map(str, spatial))})"
        else:
            want = f"(B, heads, {kk}, M) = ({B}, {h}, {kk}, {spatial[0]}) for {spatial[0]} query positions"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {_shape(indices)}")
    if indices.device != device:
        raise ValueError(f"{fn}: {name} must be on the inputs' device {device}, got {indices.device}")
    if indices.numel() > 0 and data_checks_enabled(indices):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= shapes.num_keys:
            raise ValueError(
                f"{fn}: {name} must hold flat key positions in [0, {shapes.num_keys}) for a {shapes.key_size}, got values in [{lo}, {hi}]"
            )
    return indices


def check_positions(fn: str, positions, shapes: MapShapes, device: torch.device):
    """Sparse query positions: ``None``, a bool mask of the query pixels to compute (``(H, W)``,
    or ``(T, H, W)`` for volumes), or their flat indices (``row * W + col``, ``t * H * W + row *
    W + col``) as a strictly ascending 1-D int64 tensor. Returns the indices (``(M,)`` int64 on
    ``device``) or ``None``."""
    if positions is None:
        return None
    names = "(T, H, W)" if shapes.volume else "(H, W)"
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{fn}: positions must be a torch.Tensor (bool {names} or int64 (M,)) or None, got {type(positions).__name__}")
    L, size = shapes.num_queries, "x".join(str(n) for n in shapes.spatial)
    if positions.device != device:
        raise ValueError(f"{fn}: positions must be on the inputs' device {device}, got {positions.device}")
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != shapes.spatial:
            raise ValueError(
                f"{fn}: a bool positions mask must have the query's spatial shape {names} = {shapes.spatial}, got {_shape(positions)}"
            )
        return positions.flatten().nonzero().squeeze(1)
    if positions.dtype != torch.int64 or positions.dim() != 1:
        raise TypeError(
            f"{fn}: positions must be a bool {names} mask or a 1-D int64 tensor of flat query positions, "
            f"got {positions.dtype} with shape {_shape(positions)}"
        )
    if positions.numel() > 0 and data_checks_enabled(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= L:
            raise ValueError(f"{fn}: positions must be flat query positions in [0, {L}) for a {size} query, got values in [{lo}, {hi}]")
        if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise ValueError(f"{fn}: positions {_shape(positions)} must be strictly ascending (sorted, no repeats)")
    return positions


def check_init(fn: str, init, shapes: MapShapes, device: torch.device, positions=None):
    """A warm start: a ``KNNField`` (or any object with ``indices``), its indices tensor, or ``None``."""
    if init is None:
        return None
    if isinstance(init, torch.Tensor):
        return check_field_indices(fn, "init", init, shapes, device, positions=positions)
    indices = getattr(init, "indices", None)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{fn}: init must be a psal.KNNField, an indices tensor or None, got {type(init).__name__}")
    return check_field_indices(fn, "init.indices", indices, shapes, device, positions=positions)


def check_generator(fn: str, generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_value(fn: str, value, shapes: MapShapes, query: torch.Tensor) -> int:
    """A value ``(B, Cv, Hk, Wk)`` (``(B, Cv, Tk, Hk, Wk)`` for volumes) on the query's device,
    same dtype; returns ``Cv``."""
    _check_feature_tensor(fn, "value", value)
    want = (shapes.batch, *shapes.key_spatial)
    if (value.shape[0], *value.shape[2:]) != want:
        names = "(B, Cv, Tk, Hk, Wk)" if shapes.volume else "(B, Cv, Hk, Wk)"
        sizes = ", ".join(str(n) for n in shapes.key_spatial)
        raise ValueError(
            f"{fn}: value must have the key's batch and spatial size {names} = ({want[0]}, Cv, {sizes}), got value {_shape(value)}"
        )
    if value.device != query.device:
        raise ValueError(f"{fn}: value must be on the query's device {query.device}, got {value.device}")
    if value.shape[1] % shapes.num_heads != 0:
        raise ValueError(f"{fn}: the channels of value {_shape(value)} must be divisible by num_heads={shapes.num_heads}")
    return value.shape[1]


def check_same_dtype(fn: str, **tensors) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {dt}" for name, dt in dtypes.items())
        raise TypeError(f"{fn}: query, key and value must share one dtype, got {listed}")


def check_temperature(fn: str, temperature, query: torch.Tensor) -> torch.Tensor:
    """A positive number, or a one-element floating tensor (learnable): a 0-dim tensor on the
    query's device. A tensor's value is not checked, since that would need a device sync."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.dtype.is_floating_point or temperature.numel() != 1:
            raise TypeError(
                f"{fn}: temperature must be a number or a one-element floating tensor, got a "
                f"{temperature.dtype} tensor of shape {_shape(temperature)}"
            )
        return temperature.reshape(()).to(query.device)
    if not is_real_number(temperature):
        raise TypeError(f"{fn}: temperature must be a positive number or a tensor, got {type(temperature).__name__}")
    if not float(temperature) > 0 or temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature}")
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return torch.tensor(float(temperature), dtype=dtype, device=query.device)


def check_backend(fn: str, backend, choices, device: torch.device) -> str:
    """A known backend name; one that cannot run on ``device`` is refused here, by name."""
    from ._dispatch import require

    backend = check_choice(fn, "backend", backend, choices)
    # Under torch.compile the check (imports) cannot be traced; the op checks again when it runs.
    if backend != "auto" and not torch.compiler.is_compiling():
        require(fn, backend, device)
    return backend
