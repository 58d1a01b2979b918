"""Bad input to the search and to the attention functions gets a clear TypeError/ValueError
naming the argument and the shapes: every validation test of the library in one place."""

from __future__ import annotations

import pytest
import torch

import psal

_G = torch.Generator().manual_seed(0)
Q = torch.rand(2, 4, 8, 9, generator=_G)
K = torch.rand(2, 4, 7, 6, generator=_G)
V = torch.rand(2, 3, 7, 6, generator=_G)
IDX = torch.zeros(2, 1, 3, 8, 9, dtype=torch.int64)


def search(**kw):
    args = dict(query=Q, key=K, generator=torch.Generator().manual_seed(1))
    args.update(kw)
    return psal.patchmatch(args.pop("query"), args.pop("key"), **args)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(query=torch.rand(4, 8, 9)), ValueError, r"query must be a 4-D map \(B, C, H, W\) or a 5-D volume .*\(4, 8, 9\)"),
        (
            dict(key=torch.rand(1, 2, 4, 7, 6)),
            ValueError,
            r"query and key must both be maps .* or both volumes .*got query \(2, 4, 8, 9\) and key \(1, 2, 4, 7, 6\)",
        ),
        (dict(query=Q.numpy()), TypeError, r"query must be a torch.Tensor"),
        (dict(key=torch.rand(3, 4, 7, 6)), ValueError, r"same batch size.*\(2, 4, 8, 9\).*\(3, 4, 7, 6\)"),
        (dict(key=torch.rand(2, 3, 7, 6)), ValueError, r"same number of channels.*\(2, 4, 8, 9\).*\(2, 3, 7, 6\)"),
        (dict(num_heads=3), ValueError, r"channels of query \(2, 4, 8, 9\) must be divisible by num_heads=3"),
        (dict(num_heads=0), ValueError, r"num_heads must be >= 1"),
        (dict(patch_size=4), ValueError, r"patch_size must be an odd int >= 1, got 4"),
        (dict(patch_size=0), ValueError, r"patch_size must be an odd int >= 1, got 0"),
        (dict(patch_size=-3), ValueError, r"patch_size must be an odd int >= 1, got -3"),
        (dict(patch_size=3.0), TypeError, r"patch_size must be an odd int"),
        (dict(patch_size=True), TypeError, r"patch_size must be an odd int"),
        (dict(num_neighbors=0), ValueError, r"num_neighbors must be >= 1, got 0"),
        (dict(num_neighbors=43), ValueError, r"num_neighbors=43 is more than the 42 key positions of a 7x6 key map"),
        (dict(num_iters=-1), ValueError, r"num_iters must be >= 0, got -1"),
        (dict(query=Q.long()), TypeError, r"query must have a floating-point dtype, got torch.int64"),
        (dict(key=K.to(torch.uint8)), TypeError, r"key must have a floating-point dtype, got torch.uint8"),
        (
            dict(key_mask=torch.ones(2, 6, 7, dtype=torch.bool)),
            ValueError,
            r"key_mask must have shape \(B, Hk, Wk\) = \(2, 7, 6\), got \(2, 6, 7\)",
        ),
        (dict(key_mask=torch.ones(7, 6, dtype=torch.bool)), ValueError, r"key_mask must have shape .* got \(7, 6\)"),
        (dict(key_mask=torch.ones(2, 7, 6)), TypeError, r"key_mask must have dtype torch.bool"),
        (dict(key_mask=[[True]]), TypeError, r"key_mask must be a bool torch.Tensor"),
        (dict(similarity="cosine"), ValueError, r"similarity must be one of 'l2', 'dot', got 'cosine'"),
        (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'numba', 'triton', 'torch', got 'cuda'"),
        (dict(generator=0), TypeError, r"generator must be a torch.Generator"),
        (dict(init=torch.zeros(1)), TypeError, r"init must have dtype torch.int64, got torch.float32"),
        (dict(init=5), TypeError, r"init must be a psal.KNNField, an indices tensor or None, got int"),
        (dict(positions=[1, 2]), TypeError, r"positions must be a torch.Tensor .* got list"),
        (
            dict(positions=torch.ones(9, 8, dtype=torch.bool)),
            ValueError,
            r"positions mask must have the query's spatial shape \(H, W\) = \(8, 9\), got \(9, 8\)",
        ),
        (
            dict(positions=torch.tensor([1.0, 2.0])),
            TypeError,
            r"positions must be a bool \(H, W\) mask or a 1-D int64 .* torch.float32 with shape \(2\)",
        ),
        (dict(positions=torch.tensor([[1, 2]])), TypeError, r"positions must be .* 1-D int64 .* shape \(1, 2\)"),
        (
            dict(positions=torch.tensor([3, 72])),
            ValueError,
            r"positions must be flat query positions in \[0, 72\) for a 8x9 query, got values in \[3, 72\]",
        ),
        (dict(positions=torch.tensor([-1, 3])), ValueError, r"positions must be flat query positions in \[0, 72\)"),
        (dict(positions=torch.tensor([5, 3, 9])), ValueError, r"positions \(3\) must be strictly ascending"),
        (dict(positions=torch.tensor([3, 3])), ValueError, r"positions \(2\) must be strictly ascending"),
        (
            dict(positions=torch.tensor([3, 9]), init=torch.zeros(2, 1, 3, 8, 9, dtype=torch.int64)),
            ValueError,
            r"init must have shape \(B, heads, k, M\) = \(2, 1, k, 2\) for 2 query positions, got \(2, 1, 3, 8, 9\)",
        ),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=r"^psal\.patchmatch: .*" + pattern):
        search(**kwargs)


def test_mask_with_too_few_allowed_positions():
    mask = torch.ones(2, 7, 6, dtype=torch.bool)
    mask[1] = False
    mask[1, 0, :2] = True
    with pytest.raises(
        ValueError, match=r"num_neighbors=3 is more than the 2 positions that key_mask \(2, 7, 6\) allows in batch element 1"
    ):
        search(key_mask=mask)


def test_bad_warm_start():
    good = search(num_iters=0)
    with pytest.raises(ValueError, match=r"init.indices must have shape \(B, heads, k, H, W\) = \(2, 1, k, 8, 9\), got \(2, 1, 3, 9, 8\)"):
        search(init=psal.KNNField(good.indices.transpose(3, 4), good.costs))
    with pytest.raises(ValueError, match=r"init.indices must hold flat key positions in \[0, 42\).*got values in \[\d+, 42\]"):
        bad = good.indices.clone()
        bad[1, 0, 2, 7, 8] = 42
        search(init=psal.KNNField(bad, good.costs))
    with pytest.raises(TypeError, match=r"init.indices must have dtype torch.int64"):
        search(init=psal.KNNField(good.indices.int(), good.costs))
    with pytest.raises(ValueError, match=r"init must have shape \(B, heads, k, H, W\) = \(2, 1, k, 8, 9\), got \(2, 3, 8, 9\)"):
        search(init=good.indices[:, 0])


def test_bare_indices_warm_start_like_a_field():
    good = search(num_iters=1)
    from_field = search(num_iters=0, init=good)
    from_indices = search(num_iters=0, init=good.indices)
    assert torch.equal(from_field.indices, from_indices.indices) and torch.equal(from_field.costs, from_indices.costs)


def test_mixed_devices_are_refused():
    meta = torch.empty(2, 4, 7, 6, device="meta")
    with pytest.raises(ValueError, match=r"query and key must be on one device, got query on cpu and key on meta"):
        search(key=meta)
    with pytest.raises(ValueError, match=r"key_mask must be on the inputs' device cpu"):
        search(key_mask=torch.ones(2, 7, 6, dtype=torch.bool, device="meta"))


def test_numba_backend_refuses_other_devices():
    meta = torch.empty(2, 4, 8, 9, device="meta")
    with pytest.raises(ValueError, match=r"backend 'numba' runs on CPU tensors only, got tensors on meta"):
        psal.patchmatch(meta, meta, backend="numba")


@pytest.mark.parametrize("fn", [psal.exact_knn, psal.patch_costs])
def test_oracles_validate_too(fn):
    name = fn.__name__
    args = (Q, K) if fn is psal.exact_knn else (Q, K, torch.zeros(2, 1, 1, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"psal.{name}: patch_size must be an odd int >= 1, got 2"):
        fn(*args, patch_size=2)
    with pytest.raises(ValueError, match=rf"psal.{name}: similarity must be one of"):
        fn(*args, similarity="l1")


def test_patch_costs_index_checks():
    with pytest.raises(ValueError, match=r"indices must hold flat key positions in \[0, 42\).*got values in \[-1, -1\]"):
        psal.patch_costs(Q, K, torch.full((2, 1, 2, 8, 9), -1))
    with pytest.raises(ValueError, match=r"indices must have shape"):
        psal.patch_costs(Q, K, torch.zeros(2, 2, 8, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Attention: attend, ps_attention, full_attention.


def attend(**kw):
    args = dict(query=Q, key=K, value=V, indices=IDX)
    args.update(kw)
    return psal.attend(args.pop("query"), args.pop("key"), args.pop("value"), args.pop("indices"), **args)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (
            dict(value=torch.rand(2, 3, 6, 7)),
            ValueError,
            r"value must have the key's batch and spatial size \(B, Cv, Hk, Wk\) = \(2, Cv, 7, 6\), got value \(2, 3, 6, 7\)",
        ),
        (dict(value=torch.rand(1, 3, 7, 6)), ValueError, r"value must have the key's batch and spatial size .* got value \(1, 3, 7, 6\)"),
        (
            dict(value=torch.rand(3, 7, 6)),
            ValueError,
            r"value must be a 4-D map \(B, C, H, W\) or a 5-D volume \(B, C, T, H, W\), got shape \(3, 7, 6\)",
        ),
        (
            dict(value=V.double()),
            TypeError,
            r"query, key and value must share one dtype, got query torch.float32, key torch.float32, value torch.float64",
        ),
        (dict(value=V.long()), TypeError, r"value must have a floating-point dtype"),
        (
            dict(
                value=torch.rand(2, 3, 7, 6),
                num_heads=2,
                query=torch.rand(2, 4, 8, 9),
                key=torch.rand(2, 4, 7, 6),
                indices=torch.zeros(2, 2, 3, 8, 9, dtype=torch.int64),
            ),
            ValueError,
            r"channels of value \(2, 3, 7, 6\) must be divisible by num_heads=2",
        ),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1), ValueError, r"temperature must be a finite number > 0, got -1"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be a finite number > 0, got inf"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be a finite number > 0, got nan"),
        (dict(temperature="hot"), TypeError, r"temperature must be a positive number or a tensor, got str"),
        (
            dict(temperature=torch.ones(2)),
            TypeError,
            r"temperature must be a number or a one-element floating tensor, got a torch.float32 tensor of shape \(2\)",
        ),
        (dict(aggregation="mean"), ValueError, r"aggregation must be one of 'center', 'patch', 'patch_mean', got 'mean'"),
        (dict(similarity="cosine"), ValueError, r"similarity must be one of 'l2', 'dot', got 'cosine'"),
        (
            dict(indices=torch.zeros(2, 3, 8, 9, dtype=torch.int64)),
            ValueError,
            r"indices must have shape \(B, heads, k, H, W\) = \(2, 1, k, 8, 9\), got \(2, 3, 8, 9\)",
        ),
        (dict(indices=torch.zeros(2, 1, 3, 9, 8, dtype=torch.int64)), ValueError, r"indices must have shape .* got \(2, 1, 3, 9, 8\)"),
        (dict(indices=IDX.float()), TypeError, r"indices must have dtype torch.int64 or torch.int32, got torch.float32"),
        (
            dict(indices=IDX + 42),
            ValueError,
            r"indices must hold flat key positions in \[0, 42\) for a 7x6 key map, got values in \[42, 42\]",
        ),
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
