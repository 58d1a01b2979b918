"""Bad input gets a clear TypeError/ValueError naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

import psal

_G = torch.Generator().manual_seed(0)
Q = torch.rand(2, 4, 8, 9, generator=_G)
K = torch.rand(2, 4, 7, 6, generator=_G)


def search(**kw):
    args = dict(query=Q, key=K, generator=torch.Generator().manual_seed(1))
    args.update(kw)
    return psal.patchmatch(args.pop("query"), args.pop("key"), **args)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(query=torch.rand(4, 8, 9)), ValueError, r"query must be a 4-D tensor .*\(4, 8, 9\)"),
        (dict(key=torch.rand(1, 2, 4, 7, 6)), ValueError, r"key must be a 4-D tensor .*\(1, 2, 4, 7, 6\)"),
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
        (dict(key_mask=torch.ones(2, 6, 7, dtype=torch.bool)), ValueError, r"key_mask must have shape \(B, Hk, Wk\) = \(2, 7, 6\), got \(2, 6, 7\)"),
        (dict(key_mask=torch.ones(7, 6, dtype=torch.bool)), ValueError, r"key_mask must have shape .* got \(7, 6\)"),
        (dict(key_mask=torch.ones(2, 7, 6)), TypeError, r"key_mask must have dtype torch.bool"),
        (dict(key_mask=[[True]]), TypeError, r"key_mask must be a bool torch.Tensor"),
        (dict(similarity="cosine"), ValueError, r"similarity must be one of 'l2', 'dot', got 'cosine'"),
        (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'numba', 'triton', 'torch', got 'cuda'"),
        (dict(generator=0), TypeError, r"generator must be a torch.Generator"),
        (dict(init=torch.zeros(1)), TypeError, r"init must be a psal.KNNField"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=r"^psal\.patchmatch: .*" + pattern):
        search(**kwargs)


def test_mask_with_too_few_allowed_positions():
    mask = torch.ones(2, 7, 6, dtype=torch.bool)
    mask[1] = False
    mask[1, 0, :2] = True
    with pytest.raises(ValueError, match=r"num_neighbors=3 is more than the 2 positions that key_mask \(2, 7, 6\) allows in batch element 1"):
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
