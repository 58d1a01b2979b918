"""Backend choice, for every op: each backend has a ``can_run_*`` predicate that says why it cannot
run a problem (its device and, for Triton, its sizes).

``numba`` runs on CPU tensors, ``triton`` on CUDA tensors (and on CPU tensors through Triton's
interpreter when ``TRITON_INTERPRET=1``, for tests) whose per-map index ranges fit in 32 bits,
``torch`` anywhere.

``backend="auto"`` picks the first backend whose predicate holds, in the order of ``ORDER``, so
the choice is explainable (``available_backends(device)`` lists each verdict) and a problem too
large for one backend falls back to the next instead of failing.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

import torch

from .backends.device import triton_interpreted

logger = logging.getLogger("psal")

BACKENDS = ("auto", "numba", "triton", "torch")
ORDER = ("numba", "triton", "torch")
_TRITON_MIN_CAPABILITY = (7, 5)  # Triton 3's NVIDIA backend (Turing and newer)
# Triton kernels divide positions within a map in int32: k * H * W, the padded map sizes and (for
# the attention, which reads channel-first maps in place) channels times a map must stay below this.
TRITON_MAX_POSITIONS = 2**31


def _fail(reason: str, raise_error: bool) -> bool:
    if raise_error:
        raise ValueError(reason)
    logger.debug(reason)
    return False


def can_run_numba(device: torch.device, positions: int = 0, raise_error: bool = False) -> bool:
    if device.type != "cpu":
        return _fail(f"backend 'numba' runs on CPU tensors only, got tensors on {device}", raise_error)
    try:
        importlib.import_module("numba")
    except ImportError as exc:  # pragma: no cover - numba is a dependency, but may be absent
        return _fail(f"backend 'numba' needs the numba package ({exc}); pip install numba", raise_error)
    return True


def can_run_triton(device: torch.device, positions: int = 0, raise_error: bool = False) -> bool:
    if device.type == "cpu" and not triton_interpreted():
        return _fail(
            "backend 'triton' runs on CUDA tensors (on CPU tensors only through Triton's interpreter, "
            f"TRITON_INTERPRET=1), got tensors on {device}",
            raise_error,
        )
    if device.type not in ("cpu", "cuda"):
        return _fail(f"backend 'triton' runs on CUDA tensors, got tensors on {device}", raise_error)
    if positions >= TRITON_MAX_POSITIONS:
        return _fail(f"backend 'triton' needs k * H * W, the padded map sizes and C * H * W below 2**31, got {positions}", raise_error)
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return _fail(f"backend 'triton' needs the triton package ({exc}); pip install triton", raise_error)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < _TRITON_MIN_CAPABILITY:
            return _fail(
                f"backend 'triton' needs a GPU of compute capability {'.'.join(map(str, _TRITON_MIN_CAPABILITY))} "
                f"or newer, got {major}.{minor} on {device}",
                raise_error,
            )
    return True


def can_run_torch(device: torch.device, positions: int = 0, raise_error: bool = False) -> bool:
    return True


_PREDICATES = {"numba": can_run_numba, "triton": can_run_triton, "torch": can_run_torch}
# The ops each backend runs over sparse query positions (``positions=``).
SPARSE_OPS = {"numba": ("search", "attend"), "triton": ("search", "attend"), "torch": ("search", "attend")}


# The ops each backend runs over space-time volumes (5-D inputs that are not one frame). numba and
# Triton run them on their map kernels (numba reading the volumes' frames, Triton through
# ``backends/tall.py``): square frames of patches (ph == pw) only, and the attention with "center"
# aggregation over dense queries only.
VOLUME_OPS = {"numba": ("search", "attend"), "triton": ("search", "attend"), "torch": ("search", "attend")}
# The backends whose volumes run on their map kernels, with those limits.
_TALL = ("numba", "triton")


def _volume_ok(name: str, op: str, volume, raise_error: bool = False, aggregation: str | None = None, sparse: bool = False) -> bool:
    """``volume``: False for a map, else True or the volume's ``(pt, ph, pw)`` patch."""
    what = {"search": "search", "attend": "attention"}[op]
    if name in _TALL and isinstance(volume, tuple) and volume[1] != volume[2]:
        return _fail(
            f"backend {name!r} has no space-time {what} over non-square frames of patches {volume} yet; use 'torch' or 'auto'", raise_error
        )
    if name in _TALL and volume and op == "attend" and (aggregation != "center" or sparse):
        how = "over sparse positions" if sparse else f"with {aggregation!r} aggregation"
        return _fail(f"backend {name!r} has no space-time attention {how} yet (only 'center', dense); use 'torch' or 'auto'", raise_error)
    if not volume or op in VOLUME_OPS[name]:
        return True
    return _fail(f"backend {name!r} has no space-time {what} (5-D inputs of several frames) yet; use 'torch' or 'auto'", raise_error)


def _sparse_ok(name: str, op: str, sparse: bool, raise_error: bool = False) -> bool:
    if not sparse or op in SPARSE_OPS[name]:
        return True
    what = {"search": "search", "attend": "attention"}[op]
    return _fail(f"backend {name!r} has no sparse-query {what} (positions=) yet; use 'torch' or 'auto'", raise_error)


def positions(num_neighbors: int, H: int, W: int, Hk: int, Wk: int, patch_size: int, searched: int | None = None, channels: int = 1) -> int:
    """The largest per-map position count of a problem (matches ``k * L`` of the ``L`` searched
    pixels, all ``H * W`` by default; padded maps; with ``channels``, the elements of a map):
    what the size limits of a backend are checked against."""
    r = patch_size // 2
    L = H * W if searched is None else searched
    return max(num_neighbors * L, (H + 2 * r) * (W + 2 * r), (Hk + 2 * r) * (Wk + 2 * r), channels * max(H * W, Hk * Wk))


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """``{backend: None if it can run, else the reason it cannot}`` for tensors on ``device``,
    in the order ``backend="auto"`` tries them (numba, triton, torch).

    >>> psal.available_backends("cpu")["torch"] is None
    True
    """
    device = torch.device(device)
    out: dict[str, str | None] = {}
    for name in ORDER:
        try:
            _PREDICATES[name](device, raise_error=True)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def explain_search_backend(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Deprecated: the former name of :func:`available_backends`."""
    warnings.warn("psal.explain_search_backend is deprecated; use psal.available_backends", DeprecationWarning, stacklevel=2)
    return available_backends(device)


# Sparse attention backwards that run on another backend: numba's and Triton's sparse forward
# kernels pair with the pure-PyTorch sparse backward (the statistic that the forward returns means
# the same in all three).
SPARSE_BACKWARD = {"numba": "torch", "triton": "torch"}


def _module(name: str, op: str, sparse: bool = False) -> ModuleType:
    if op == "attend_backward":
        name, op = (SPARSE_BACKWARD.get(name, name) if sparse else name), "attend"
    return importlib.import_module(f"psal.backends.{name}.{op}")


def choose(
    fn: str,
    op: str,
    backend: str,
    device: torch.device,
    positions: int = 0,
    sparse: bool = False,
    volume: bool | tuple = False,
    aggregation: str | None = None,
) -> ModuleType:
    """The module that implements ``op`` (``"search"``: ``patchmatch``; ``"attend"``:
    ``attend_forward``; ``"attend_backward"``: ``attend_backward``, of the backend chosen for the
    forward, or of :data:`SPARSE_BACKWARD`'s) with ``backend`` for a problem on ``device`` of
    ``positions`` (see :func:`positions`), over ``sparse`` query positions or not, on a
    space-time ``volume`` or not. ``"auto"``: the
    first backend of ``ORDER`` that can run it (never the Triton interpreter, which is for tests)."""
    module = op
    op = "attend" if op == "attend_backward" else op
    if backend == "auto":
        for name in ORDER:
            if name == "triton" and device.type == "cpu":
                continue
            if (
                _PREDICATES[name](device, positions)
                and _sparse_ok(name, op, sparse)
                and _volume_ok(name, op, volume, False, aggregation, sparse)
            ):
                missing = "numba" if device.type == "cpu" else "triton"
                fallback = (
                    positions >= TRITON_MAX_POSITIONS
                    or (sparse and op not in SPARSE_OPS[missing])
                    or (bool(volume) and not _volume_ok(missing, op, volume, False, aggregation, sparse))
                )
                if name == "torch" and device.type in ("cpu", "cuda") and not fallback:
                    warnings.warn(
                        f"psal: {missing} is not installed, so {device.type.upper()} tensors run on the "
                        f"much slower pure-PyTorch backend; pip install {missing}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return _module(name, module, sparse)
        raise ValueError(f"{fn}: no backend can run on {device}: {available_backends(device)}")
    if backend not in _PREDICATES:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    require(fn, backend, device, positions)
    try:
        _sparse_ok(backend, op, sparse, raise_error=True)
        _volume_ok(backend, op, volume, True, aggregation, sparse)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    return _module(backend, module, sparse)


def require(fn: str, backend: str, device: torch.device, positions: int = 0) -> None:
    """Raises ``ValueError`` naming ``fn`` when the named ``backend`` cannot run on ``device``."""
    try:
        _PREDICATES[backend](device, positions, raise_error=True)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
