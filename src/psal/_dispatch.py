"""Backend choice: every backend has a ``can_run_*`` predicate that says why it cannot run.

``numba`` runs on CPU tensors, ``triton`` on CUDA tensors (and on CPU tensors through Triton's
interpreter when ``TRITON_INTERPRET=1``, for tests), ``torch`` anywhere.

``backend="auto"`` picks the first backend whose predicate holds, in the order of ``SEARCH_ORDER``,
so the choice is explainable: ``available_backends(device)`` lists each verdict.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings

import torch

logger = logging.getLogger("psal")

SEARCH_BACKENDS = ("auto", "numba", "triton", "torch")
SEARCH_ORDER = ("numba", "triton", "torch")
_TRITON_MIN_CAPABILITY = (7, 5)  # Triton 3's NVIDIA backend (Turing and newer)


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


def triton_interpreted() -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so it must be set before the first use of
    the Triton backend in a process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_triton(device: torch.device, raise_error: bool = False) -> bool:
    if device.type == "cpu" and not triton_interpreted():
        return _fail(
            "backend 'triton' runs on CUDA tensors (on CPU tensors only through Triton's interpreter, "
            f"TRITON_INTERPRET=1), got tensors on {device}",
            raise_error,
        )
    if device.type not in ("cpu", "cuda"):
        return _fail(f"backend 'triton' runs on CUDA tensors, got tensors on {device}", raise_error)
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


def can_run_torch(device: torch.device, raise_error: bool = False) -> bool:
    return True


_PREDICATES = {"numba": can_run_numba, "triton": can_run_triton, "torch": can_run_torch}


# Modules per (operation, backend); each implements the same folded contract.
_MODULES = {
    ("search", "numba"): "numba_cpu",
    ("search", "triton"): "triton_search",
    ("search", "torch"): "reference",
    ("attend", "numba"): "numba_attend",
    ("attend", "triton"): "triton_attend",
    ("attend", "torch"): "reference_attend",
}


def _module(name: str, op: str = "search"):
    return importlib.import_module(f"psal.backends.{_MODULES[op, name]}")


def available_backends(device="cpu") -> dict:
    """``{backend: None if it can run, else the reason it cannot}`` for tensors on ``device``,
    in the order ``backend="auto"`` tries them (numba, triton, torch).

    >>> psal.available_backends("cpu")["torch"] is None
    True
    """
    device = torch.device(device)
    out = {}
    for name in SEARCH_ORDER:
        try:
            _PREDICATES[name](device, raise_error=True)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


explain_search_backend = available_backends  # the name of version 0.1.0


def search_backend(fn: str, backend: str, device: torch.device, op: str = "search"):
    """The module that implements ``op`` (``"search"``: ``patchmatch``; ``"attend"``:
    ``attend_forward``/``attend_backward``) for ``backend`` on ``device``."""
    if backend == "auto":
        for name in SEARCH_ORDER:
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is for tests, never a choice
            if _PREDICATES[name](device):
                if name == "torch" and device.type in ("cpu", "cuda"):
                    missing = "numba" if device.type == "cpu" else "triton"
                    warnings.warn(
                        f"psal: {missing} is not installed, so {device.type.upper()} tensors run on the "
                        f"much slower pure-PyTorch backend; pip install {missing}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return _module(name, op)
        raise ValueError(f"{fn}: no backend can run on {device}: {available_backends(device)}")
    if backend not in _PREDICATES:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, SEARCH_BACKENDS))}, got {backend!r}")
    require(fn, backend, device)
    return _module(backend, op)


def require(fn: str, backend: str, device: torch.device) -> None:
    """Raises ``ValueError`` naming ``fn`` when the named ``backend`` cannot run on ``device``."""
    try:
        _PREDICATES[backend](device, raise_error=True)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None


def cuda_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
