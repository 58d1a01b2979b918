"""Bad input to the attention functions gets a clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import psal

_G = torch.Generator().manual_seed(0)
Q = torch.rand(2, 4, 8, 9, generator=_G)
K = torch.rand(2, 4, 7, 6, generator=_G)
V = torch.rand(2, 3, 7, 6, generator=_G)
IDX = torch.zeros(2, 1, 3, 8, 9, dtype=torch.int64)


def attend(**kw):
    args = dict(query=Q, key=K, value=V, indices=IDX)
    args.update(kw)
    return psal.attend(args.pop("query"), args.pop("key"), args.pop("value"), args.pop("indices"), **args)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(value=torch.rand(2, 3, 6, 7)), ValueError, r"value must have the key's batch and spatial size \(B, Cv, Hk, Wk\) = \(2, Cv, 7, 6\), got value \(2, 3, 6, 7\)"),
        (dict(value=torch.rand(1, 3, 7, 6)), ValueError, r"value must have the key's batch and spatial size .* got value \(1, 3, 7, 6\)"),
        (dict(value=torch.rand(3, 7, 6)), ValueError, r"value must be a 4-D tensor \(B, C, H, W\), got shape \(3, 7, 6\)"),
        (dict(value=V.double()), TypeError, r"query, key and value must share one dtype, got query torch.float32, key torch.float32, value torch.float64"),
        (dict(value=V.long()), TypeError, r"value must have a floating-point dtype"),
        (dict(value=torch.rand(2, 3, 7, 6), num_heads=2, query=torch.rand(2, 4, 8, 9), key=torch.rand(2, 4, 7, 6), indices=torch.zeros(2, 2, 3, 8, 9, dtype=torch.int64)), ValueError, r"channels of value \(2, 3, 7, 6\) must be divisible by num_heads=2"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1), ValueError, r"temperature must be a finite number > 0, got -1"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number > 0, got inf"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number > 0, got nan"),
        (dict(temperature="hot"), TypeError, r"temperature must be a positive number or a tensor, got str"),
        (dict(temperature=torch.ones(2)), TypeError, r"temperature must be a number or a one-element floating tensor, got a torch.float32 tensor of shape \(2\)"),
        (dict(aggregation="mean"), ValueError, r"aggregation must be one of 'center', 'patch', 'patch_mean', got 'mean'"),
        (dict(similarity="cosine"), ValueError, r"similarity must be one of 'l2', 'dot', got 'cosine'"),
        (dict(indices=torch.zeros(2, 3, 8, 9, dtype=torch.int64)), ValueError, r"indices must have shape \(B, heads, k, H, W\) = \(2, 1, k, 8, 9\), got \(2, 3, 8, 9\)"),
        (dict(indices=torch.zeros(2, 1, 3, 9, 8, dtype=torch.int64)), ValueError, r"indices must have shape .* got \(2, 1, 3, 9, 8\)"),
        (dict(indices=IDX.int()), TypeError, r"indices must have dtype torch.int64, got torch.int32"),
        (dict(indices=IDX + 42), ValueError, r"indices must hold flat key positions in \[0, 42\) for a 7x6 key map, got values in \[42, 42\]"),
        (dict(indices=IDX - 1), ValueError, r"indices must hold flat key positions in \[0, 42\).*got values in \[-1, -1\]"),
        (dict(patch_size=2), ValueError, r"patch_size must be an odd int >= 1, got 2"),
        (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'numba', 'triton', 'torch', got 'cuda'"),
    ],
)
def test_attend_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=r"^psal\.attend: .*" + pattern):
        attend(**kwargs)


def test_ps_attention_validates_search_and_attention_arguments():
    with pytest.raises(ValueError, match=r"^psal\.ps_attention: num_neighbors=43 is more than the 42 key positions"):
        psal.ps_attention(Q, K, V, num_neighbors=43)
    with pytest.raises(ValueError, match=r"^psal\.ps_attention: value must have the key's batch and spatial size"):
        psal.ps_attention(Q, K, torch.rand(2, 3, 8, 9))
    with pytest.raises(ValueError, match=r"^psal\.ps_attention: aggregation must be one of"):
        psal.ps_attention(Q, K, V, aggregation="max")
    with pytest.raises(ValueError, match=r"^psal\.ps_attention: temperature must be a finite number > 0"):
        psal.ps_attention(Q, K, V, temperature=0)


def test_full_attention_bad_arguments():
    with pytest.raises(ValueError, match=r"^psal\.full_attention: method must be one of 'auto', 'sdpa', 'chunked', got 'flash'"):
        psal.full_attention(Q, K, V, method="flash")
    with pytest.raises(ValueError, match=r"method='sdpa' cannot compute aggregation='patch'"):
        psal.full_attention(Q, K, V, method="sdpa", aggregation="patch")
    mask = torch.ones(2, 7, 6, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"^psal\.full_attention: key_mask \(2, 7, 6\) allows no key position in batch element 1"):
        psal.full_attention(Q, K, V, key_mask=mask)


def test_value_on_another_device():
    with pytest.raises(ValueError, match=r"value must be on the query's device cpu, got meta"):
        attend(value=torch.empty(2, 3, 7, 6, device="meta"))


def test_numba_is_refused_off_cpu_before_any_op_runs():
    # On meta tensors the ops would run their fake kernels and return silently empty results.
    meta = torch.empty(1, 2, 4, 4, device="meta")
    idx = torch.zeros(1, 1, 1, 4, 4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"^psal\.patchmatch: backend 'numba' runs on CPU tensors only, got tensors on meta"):
        psal.patchmatch(meta, meta, backend="numba")
    with pytest.raises(ValueError, match=r"^psal\.attend: backend 'numba' runs on CPU tensors only"):
        psal.attend(meta, meta, meta, idx, backend="numba")
    with pytest.raises(ValueError, match=r"^psal\.attend: backend 'triton' runs on CUDA tensors, got tensors on meta"):
        psal.attend(meta, meta, meta, idx, backend="triton")


def test_full_attention_of_an_empty_batch_keeps_the_graph():
    q = torch.rand(0, 2, 4, 4, requires_grad=True)
    out = psal.full_attention(q, q, q)
    assert out.shape == (0, 2, 4, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape
