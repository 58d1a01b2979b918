"""Where kernels run: Triton's interpreter switch and the CUDA device a launch must target.

Below dispatch: the backends and the dispatcher both import from here."""

from __future__ import annotations

import contextlib
import os

import torch


def triton_interpreted() -> bool:
    """Whether Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so it must be set before the first use of
    the Triton backend in a process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
