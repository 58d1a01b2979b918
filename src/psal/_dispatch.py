"""Backend choice: every backend has a ``can_run_*`` predicate that says why it cannot run.

``backend="auto"`` picks the first backend whose predicate holds, in the order of ``SEARCH_ORDER``,
so the choice is explainable: ``explain_search_backend(device)`` lists each verdict.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch

logger = logging.getLogger("psal")

SEARCH_BACKENDS = ("auto", "numba", "torch")
SEARCH_ORDER = ("numba", "torch")


def _fail(reason: str, raise_error: bool) -> bool:
    if raise_error:
        raise ValueError(reason)
    logger.debug(reason)
    return False


def can_run_numba(device: torch.device, raise_error: bool = False) -> bool:
    if device.type != "cpu":
        return _fail(f"backend 'numba' runs on CPU tensors only, got tensors on {device}", raise_error)
    try:
        importlib.import_module("numba")
    except ImportError as exc:  # pragma: no cover - numba is a dependency, but may be absent
        return _fail(f"backend 'numba' needs the numba package ({exc}); pip install numba", raise_error)
    return True


def can_run_torch(device: torch.device, raise_error: bool = False) -> bool:
    return True


_PREDICATES = {"numba": can_run_numba, "torch": can_run_torch}


# Modules per (operation, backend); each implements the same folded contract.
_MODULES = {
    ("search", "numba"): "numba_cpu",
    ("search", "torch"): "reference",
    ("attend", "numba"): "numba_attend",
    ("attend", "torch"): "reference_attend",
}


def _module(name: str, op: str = "search"):
    return importlib.import_module(f"psal.backends.{_MODULES[op, name]}")


def explain_search_backend(device: torch.device) -> dict:
    """``{backend: None or the reason it cannot run}`` for tensors on ``device``."""
    out = {}
    for name in SEARCH_ORDER:
        try:
            _PREDICATES[name](device, raise_error=True)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def search_backend(fn: str, backend: str, device: torch.device, op: str = "search"):
    """The module that implements ``op`` (``"search"``: ``patchmatch``; ``"attend"``:
    ``attend_forward``/``attend_backward``) for ``backend`` on ``device``."""
    if backend == "auto":
        for name in SEARCH_ORDER:
            if _PREDICATES[name](device):
                if name == "torch" and device.type == "cpu":
                    warnings.warn(
                        "psal: numba is not installed, so the CPU search runs on the much slower "
                        "pure-PyTorch backend; pip install numba",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return _module(name, op)
        raise ValueError(f"{fn}: no backend can run on {device}: {explain_search_backend(device)}")
    if backend not in _PREDICATES:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, SEARCH_BACKENDS))}, got {backend!r}")
    try:
        _PREDICATES[backend](device, raise_error=True)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    return _module(backend, op)
