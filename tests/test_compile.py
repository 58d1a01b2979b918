"""The ops are registered with torch.library: opcheck passes and torch.compile(fullgraph=True)
takes a model with PSAL without graph breaks, recompilations or changed results."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, MODEL_CASES, gen, to_device

import psal

# Two test files use torch.compile; its first use in a process costs several seconds.


def _attend_args(device, dtype=torch.float64):
    """Folded attend arguments drawn on the CPU, on ``device``; q, k, v and T require grad."""
    g = gen(0)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 3, 6, generator=g, dtype=dtype)
    v = torch.randn(2, 2, 3, 6, generator=g, dtype=dtype)
    T = torch.tensor(1.5, dtype=dtype)
    idx = torch.randint(0, 18, (2, 3, 5, 4), generator=g)
    q, k, v, idx, T = to_device(device, q, k, v, idx, T)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), idx, T.requires_grad_()


def _skip_interpreted(backend, device):
    if backend == "triton" and device == "cpu":
        # opcheck checks the op's registration (schema, fake kernel, autograd, strides), which the
        # op wrapper fixes whatever the backend (it makes outputs contiguous); Triton's kernels
        # are checked by test_triton_*.py, and here on a GPU. About 12 s a call interpreted.
        pytest.skip("the op's registration is backend-independent; Triton's interpreter is checked in test_triton_*.py")


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation", ["center", "patch", "patch_mean"])
def test_opcheck_attend(backend, device, aggregation):
    _skip_interpreted(backend, device)
    q, k, v, idx, T = _attend_args(device)
    torch.library.opcheck(torch.ops.psal.attend.default, (q, k, v, idx, T, [3], aggregation, "l2", backend))
    out, stat = torch.ops.psal.attend(q, k, v, idx, T, [3], aggregation, "dot", backend)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=gen(1)).to(device)
    detached = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(
        torch.ops.psal.attend_backward.default,
        (grad, *detached, idx, T.detach(), out.detach(), stat, [3], aggregation, "dot", backend),
    )


@pytest.mark.parametrize("backend, device", CASES)
def test_opcheck_attend_half_precision(backend, device):
    # The statistic comes out in float32 for half inputs: the fake kernel must say so too.
    q, k, v, idx, _ = (t.detach() for t in _attend_args(device, torch.float32))
    T = torch.tensor(1.5, device=device)
    args = (q.half(), k.half(), v.half(), idx, T, [3], "patch", "l2", backend)
    torch.library.opcheck(torch.ops.psal.attend.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend, device", CASES)
def test_opcheck_patchmatch(backend, device):
    _skip_interpreted(backend, device)
    q, k, _, idx, _ = (t.detach() for t in _attend_args(device, torch.float32))
    mask = torch.ones(2, 18, dtype=torch.bool, device=device)
    mask[0, :5] = False
    seed = torch.tensor([11])  # on the CPU whatever the device, as psal.patchmatch passes it
    torch.library.opcheck(torch.ops.psal.patchmatch.default, (q, k, mask, 3, [3], 2, "l2", idx, seed, backend))
    torch.library.opcheck(torch.ops.psal.patchmatch.default, (q, k, None, 2, [1], 0, "dot", None, seed, backend))


class _Net(torch.nn.Module):
    def __init__(self, aggregation, backend):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = psal.PSALBlock(8, num_neighbors=4, aggregation=aggregation, learn_temperature=True, num_heads=2, backend=backend)
        torch.nn.init.normal_(self.block.out.weight, std=0.5)  # not the identity, so gradients flow through PSAL
        self.head = torch.nn.Conv2d(8, 1, 1)

    def forward(self, x, mask):
        return self.head(self.block(self.inp(x), key_mask=mask))


@pytest.mark.parametrize("backend, device", MODEL_CASES)
@pytest.mark.parametrize("aggregation", ["center", "patch"])
def test_compiled_model_equals_eager(backend, device, aggregation):
    import torch._dynamo
    import torch._inductor.config

    # Inductor draws random numbers its own way; fall back to eager's so both runs get one seed.
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(error_on_recompile=True):
        _compare_compiled_and_eager(backend, device, aggregation)


def _compare_compiled_and_eager(backend, device, aggregation):
    # Named explicitly, numba and triton break the graph: psal checks that their package imports
    # (importlib.import_module), which dynamo does not trace. "auto" picks them without that check.
    if backend == {"cpu": "numba", "cuda": "triton"}[device]:
        backend = "auto"
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _Net(aggregation, backend).to(device)
    compiled = torch.compile(net, fullgraph=True)
    x = torch.rand(2, 3, 12, 10, generator=gen(1)).to(device)
    mask = torch.ones(2, 12, 10, dtype=torch.bool, device=device)
    mask[:, :, :3] = False

    def run(model, x):
        torch.manual_seed(5)
        out = model(x, mask)
        grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
        return out, grads

    for step in range(2):  # the second call must reuse the graph (error_on_recompile)
        xs = x + step
        out_c, grads_c = run(compiled, xs)
        out_e, grads_e = run(net, xs)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()
