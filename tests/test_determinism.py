"""Repeated backward runs give bitwise-identical gradients, in deterministic mode.

Compiled backends only (``NATIVE_CASES``); Triton through its interpreter is checked at smaller
sizes in ``test_triton_attend.py`` (both of its backward paths)."""

from __future__ import annotations

import pytest
import torch
from conftest import NATIVE_CASES, gen, to_device

import psal


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
@pytest.mark.parametrize("aggregation", ["center", "patch", "patch_mean"])
def test_repeated_backward_is_bitwise_identical(deterministic, backend, device, aggregation):
    g = gen(0)
    # Through Triton's interpreter a smaller map: its gather loops run in Python.
    H, W = (8, 6) if (backend, device) == ("triton", "cpu") else (24, 20)
    q = torch.randn(2, 8, H, W, generator=g)
    k = torch.randn(2, 8, 16, 18, generator=g)
    v = torch.randn(2, 6, 16, 18, generator=g)
    T = torch.tensor(3.0)
    # Heavy collisions: every query pixel points at a few of the same key positions, so many
    # contributions add into one gradient entry, in an order a race would shuffle.
    idx = torch.randint(0, 4, (2, 2, 4, H, W), generator=g) * 37
    grad_out = torch.randn(2, 6, H, W, generator=g)
    q, k, v, T, idx, grad_out = to_device(device, q, k, v, T, idx, grad_out)
    for t in (q, k, v, T):
        t.requires_grad_()
    runs = []
    for _ in range(3):
        out = psal.attend(q, k, v, idx, num_heads=2, temperature=T, aggregation=aggregation, backend=backend)
        runs.append(torch.autograd.grad(out, (q, k, v, T), grad_out))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
