"""`psal.PSAttention` and `psal.PSALBlock`."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, gen, to_device

import psal


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_self_attention_defaults_to_key_and_value_of_the_query(backend, device):
    layer = psal.PSAttention(num_neighbors=4, aggregation="patch", backend=backend)
    x = torch.rand(2, 6, 12, 11, generator=gen(0)).to(device)
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(0)
    b = psal.ps_attention(x, x, x, num_neighbors=4, aggregation="patch", backend=backend)
    assert a.shape == (2, 6, 12, 11)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_cross_attention_with_other_sizes_and_a_mask(backend, device):
    layer = psal.PSAttention(num_neighbors=2, num_heads=2, similarity="dot", backend=backend)
    q = torch.rand(2, 4, 9, 7, generator=gen(1))
    k = torch.rand(2, 4, 5, 6, generator=gen(2))
    v = torch.rand(2, 6, 5, 6, generator=gen(3))
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[:, 2:, 3:] = True
    q, k, v, mask = to_device(device, q, k, v, mask)
    torch.manual_seed(1)
    out = layer(q, k, v, key_mask=mask)
    assert out.shape == (2, 6, 9, 7)
    # Only allowed keys are attended: a value that is NaN at every masked position leaves no trace.
    v_nan = v.masked_fill(~mask[:, None], float("nan"))
    torch.manual_seed(1)
    torch.testing.assert_close(layer(q, k, v_nan, key_mask=mask), out)


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_explicit_randomness_seed_or_generator(backend, device):
    """A seeded layer draws from its own generator, not torch's global one; a generator passed to
    forward wins; a block passes it on."""
    x = torch.rand(1, 4, 14, 13, generator=gen(0)).to(device)
    opts = dict(num_neighbors=3, num_iters=1, backend=backend)
    a, b = psal.PSAttention(seed=7, **opts), psal.PSAttention(seed=7, **opts)
    torch.manual_seed(0)
    out_a = a(x)
    torch.manual_seed(123)  # the global generator plays no part
    out_b = b(x)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    # the layer's own generator advances: its second call draws other random starts
    second = a(x, generator=gen(5))
    want = psal.ps_attention(x, x, x, **opts, generator=gen(5))
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    assert not torch.equal(psal.PSAttention(seed=8, **opts)(x), out_b)
    block = psal.PSALBlock(4, num_neighbors=3, num_iters=1, backend=backend).to(device)
    block.out.weight.data.copy_(torch.randn(block.out.weight.shape, generator=gen(1)))  # not the identity
    torch.testing.assert_close(block(x, generator=gen(2)), block(x, generator=gen(2)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"psal.PSAttention: seed must be"):
        psal.PSAttention(seed=-1)


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_learned_temperature_gets_a_gradient_and_stays_positive(backend, device):
    layer = psal.PSAttention(learn_temperature=True, temperature=0.5, backend=backend).to(device)
    assert [n for n, _ in layer.named_parameters()] == ["log_temperature"]
    torch.testing.assert_close(layer.current_temperature, torch.tensor(0.5, device=device))
    x = torch.rand(1, 3, 8, 8, generator=gen(0)).to(device).requires_grad_()
    layer(x).square().sum().backward()
    assert layer.log_temperature.grad is not None and layer.log_temperature.grad != 0
    assert "log_temperature" in layer.state_dict()


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_warm_start_reuses_the_field_only_in_training(backend, device):
    x = torch.rand(1, 3, 16, 16, generator=gen(0)).to(device)
    layer = psal.PSAttention(num_neighbors=3, num_iters=0, warm_start=True, backend=backend)
    torch.manual_seed(0)
    layer(x)
    first = layer._field
    assert first is not None
    exact = psal.exact_knn(x, x, num_neighbors=3)
    # With no iterations, a warm-started field is the best of the previous one and a random one:
    # never worse, pixel by pixel, than the previous field.
    for _ in range(3):
        layer(x)
        assert (layer._field.costs[:, :, -1] <= first.costs[:, :, -1] + 1e-5).all()
        first = layer._field
    assert (first.costs >= exact.costs - 1e-5).all()
    layer.eval()
    stored = layer._field
    layer(x)
    assert layer._field is stored  # evaluation neither reads nor writes the stored field
    layer.train()
    layer(torch.rand(1, 3, 12, 16, generator=gen(1)).to(device))  # another shape: a fresh search, no error
    assert layer._field.indices.shape[-2:] == (12, 16)


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_warm_start_off_by_default(backend, device):
    layer = psal.PSAttention(backend=backend)
    layer(torch.rand(1, 3, 8, 8, generator=gen(0)).to(device))
    assert layer._field is None


def _randomize(weight: torch.Tensor, seed: int) -> None:
    """``weight.normal_(generator=gen(seed))``, drawn on the CPU whatever the weight's device."""
    weight.data.copy_(torch.empty(weight.shape, dtype=weight.dtype).normal_(generator=gen(seed)))


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_block_starts_as_identity_and_learns_through_attention(backend, device):
    block = psal.PSALBlock(8, inner_channels=4, num_neighbors=3, backend=backend).to(device)
    x = torch.rand(2, 8, 10, 9, generator=gen(0)).to(device)
    assert torch.equal(block(x), x)
    _randomize(block.out.weight, 1)
    loss = block(x).square().sum()
    loss.backward()
    for name in ("query", "key", "value", "out"):
        grad = getattr(block, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend, device", MODEL_CASES)
def test_block_cross_attention_context(backend, device):
    block = psal.PSALBlock(5, num_neighbors=2, backend=backend).to(device)
    _randomize(block.out.weight, 1)
    x = torch.rand(2, 5, 7, 6, generator=gen(0)).to(device)
    context = torch.rand(2, 5, 9, 4, generator=gen(2)).to(device)
    mask = torch.ones(2, 9, 4, dtype=torch.bool, device=device)
    out = block(x, context=context, key_mask=mask)
    assert out.shape == x.shape and out.device == x.device


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (
            lambda b: b(torch.rand(2, 4, 8, 8)),
            ValueError,
            r"psal.PSALBlock: x must have shape \(B, 5, H, W\) or \(B, 5, T, H, W\), got \(2, 4, 8, 8\)",
        ),
        (lambda b: b(torch.rand(2, 5, 8)), ValueError, r"x must have shape \(B, 5, H, W\) or \(B, 5, T, H, W\), got \(2, 5, 8\)"),
        (lambda b: b(torch.rand(2, 5, 8, 8), context=torch.rand(2, 3, 8, 8)), ValueError, r"context must have shape \(B, 5, H, W\)"),
        (lambda b: b([1.0]), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_block_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(psal.PSALBlock(5))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(patch_size=2), ValueError, r"psal.PSAttention: patch_size must be an odd int"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(aggregation="mean"), ValueError, r"aggregation must be one of 'center', 'patch', 'patch_mean', got 'mean'"),
        (dict(similarity="cos"), ValueError, r"similarity must be one of 'l2', 'dot'"),
        (dict(num_neighbors=0), ValueError, r"num_neighbors must be >= 1"),
        (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'numba', 'triton', 'torch', got 'cuda'"),
    ],
)
def test_layer_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        psal.PSAttention(**kwargs)


def test_block_heads_must_divide_inner_channels():
    with pytest.raises(ValueError, match=r"inner_channels=6 must be divisible by num_heads=4"):
        psal.PSALBlock(6, num_heads=4)
