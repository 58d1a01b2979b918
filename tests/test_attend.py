"""`psal.attend`: exact against an independent oracle, float64 gradcheck, dtypes and edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CASES, gen, naive_attention, random_indices, to_device

import psal

AGGREGATIONS = ["center", "patch", "patch_mean"]


def _inputs(B=2, C=4, Cv=3, H=4, W=5, Hk=3, Wk=4, dtype=torch.float64, seed=0):
    g = gen(seed)
    q = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    k = torch.randn(B, C, Hk, Wk, generator=g, dtype=dtype)
    v = torch.randn(B, Cv, Hk, Wk, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation, similarity, p", list(itertools.product(AGGREGATIONS, ["l2", "dot"], [1, 3, 5])))
def test_matches_the_naive_oracle(backend, device, aggregation, similarity, p):
    q, k, v = _inputs(H=5, W=4, Hk=4, Wk=6)
    idx = random_indices(2, 1, 3, 5, 4, 24, seed=p)
    T = 2.5
    args = to_device(device, q, k, v, idx)
    out = psal.attend(*args, patch_size=p, temperature=T, aggregation=aggregation, similarity=similarity, backend=backend)
    want = naive_attention(q, k, v, idx[:, 0], T, p, aggregation, similarity)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend, device", CASES)
def test_heads_are_independent_attentions(backend, device):
    q, k, v = _inputs(C=6, Cv=4)
    idx = random_indices(2, 2, 3, 4, 5, 12, seed=3)
    out = psal.attend(*to_device(device, q, k, v, idx), num_heads=2, aggregation="patch", temperature=0.7, backend=backend).cpu()
    for h in range(2):
        want = naive_attention(q[:, 3 * h : 3 * h + 3], k[:, 3 * h : 3 * h + 3], v[:, 2 * h : 2 * h + 2], idx[:, h], 0.7, 3, "patch")
        torch.testing.assert_close(out[:, 2 * h : 2 * h + 2], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend, device", CASES)
def test_hand_computed_center_case(backend, device):
    # 1x1 query, 1x2 key, p = 1: costs (q - k)^2 = 1 and 4, weights softmax(-1, -4).
    q = torch.tensor([[[[0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[10.0, 20.0]]]], dtype=torch.float64)
    idx = torch.tensor([0, 1]).view(1, 1, 2, 1, 1)
    out = psal.attend(*to_device(device, q, k, v, idx), patch_size=1, backend=backend)
    e1, e4 = torch.exp(torch.tensor(-1.0, dtype=torch.float64)), torch.exp(torch.tensor(-4.0, dtype=torch.float64))
    torch.testing.assert_close(out.cpu().view(()), (10 * e1 + 20 * e4) / (e1 + e4))


def _gradcheck(backend, device, aggregation, similarity, p, heads, fast=True, mask=None):
    q, k, v = _inputs(C=2 * heads, Cv=2 * heads, H=4, W=3, Hk=3, Wk=5)
    q, k, v, mask = to_device(device, q, k, v, mask)
    if mask is None:
        idx = random_indices(2, heads, 3, 4, 3, 15, seed=p + heads).to(device)
    else:
        idx = psal.exact_knn(q, k, patch_size=p, num_neighbors=3, key_mask=mask, num_heads=heads, similarity=similarity).indices
    T = torch.tensor(1.3, dtype=torch.float64, device=device)
    args = [t.requires_grad_() for t in (q, k, v, T)]

    def f(q, k, v, T):
        return psal.attend(
            q, k, v, idx, patch_size=p, temperature=T, aggregation=aggregation, similarity=similarity, num_heads=heads, backend=backend
        )

    # On CUDA the key and value gradients are summed by atomics (outside deterministic mode), in
    # an order that changes the last bits from one backward to the next.
    nondet_tol = 0.0 if device == "cpu" else 1e-10
    assert torch.autograd.gradcheck(f, args, fast_mode=fast, nondet_tol=nondet_tol)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation, similarity, heads", list(itertools.product(AGGREGATIONS, ["l2", "dot"], [1, 2])))
def test_gradcheck(backend, device, aggregation, similarity, heads):
    if backend == "triton" and device == "cpu" and (heads == 2 or similarity == "dot"):
        # About 12 s each through the interpreter. Heads are folded into the batch above the
        # backends: two heads are two more maps, which the interpreted case already has (B = 2).
        # The dot cost's gradients are checked against float64 references in
        # test_triton_attend.py (atomic path, both similarities), and here on GPUs.
        pytest.skip("Triton's interpreter: l2 with one head here; heads fold into the batch, dot in test_triton_attend.py")
    _gradcheck(backend, device, aggregation, similarity, 3, heads)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck_full_jacobian_with_a_mask(backend, device, aggregation):
    if backend == "triton" and device == "cpu":
        pytest.skip("one backward per output element: minutes through Triton's interpreter (fast gradcheck covers it)")
    mask = torch.rand(2, 3, 5, generator=gen(9)) > 0.4
    mask[:, 0, :3] = True
    _gradcheck(backend, device, aggregation, "l2", 3, 1, fast=False, mask=mask)


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation, similarity, p", [("patch", "l2", 1), ("patch_mean", "dot", 5)])
def test_gradcheck_patch_size_one_and_five(backend, device, aggregation, similarity, p):
    if backend == "triton" and device == "cpu" and p == 5:
        # 35 s through the interpreter; the patch loops are run-time loops, checked here at p = 1
        # and 3, and against float64 references in test_triton_attend.py.
        pytest.skip("Triton's interpreter: p = 5 costs 35 s; p = 1 and 3 run the same loops")
    _gradcheck(backend, device, aggregation, similarity, p, 1)


def test_backward_holds_no_patch_copies_of_the_features():
    # The saved tensors of one attend call are its inputs, output and one statistic per pixel.
    q, k, v = _inputs(C=8, Cv=4, H=6, W=6, Hk=6, Wk=6, dtype=torch.float32)
    q.requires_grad_()
    idx = random_indices(2, 1, 4, 6, 6, 36, seed=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        psal.attend(q, k, v, idx, patch_size=5, aggregation="patch", backend="torch")
    inputs = q.numel() + k.numel() + v.numel() + idx.numel() + 1  # + the temperature
    out_and_stat = 2 * 4 * 6 * 6 + 2 * 6 * 6
    assert sum(saved) == inputs + out_and_stat, saved


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(backend, device, dtype):
    q, k, v, idx = to_device(device, *_inputs(dtype=torch.float32), random_indices(2, 1, 3, 4, 5, 12, seed=1))
    q16, k16, v16 = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = psal.attend(q16, k16, v16, idx, aggregation="patch", backend=backend)
    assert out.dtype == dtype
    want = psal.attend(*(t.to(dtype).float() for t in (q, k, v)), idx, aggregation="patch", backend=backend)
    torch.testing.assert_close(out.float(), want.to(dtype).float())
    out.float().sum().backward()
    assert q16.grad.dtype == dtype and k16.grad.dtype == dtype and v16.grad.dtype == dtype


@pytest.mark.parametrize("backend, device", CASES)
def test_non_contiguous_inputs(backend, device):
    q, k, v, idx = to_device(device, *_inputs(H=5, W=4, Hk=4, Wk=6), random_indices(2, 1, 3, 5, 4, 24, seed=2))
    qt, kt, vt = (t.transpose(2, 3) for t in (q, k, v))
    idx_t = idx.transpose(3, 4)
    assert not qt.is_contiguous() and not idx_t.is_contiguous()
    out = psal.attend(qt, kt, vt, idx_t, aggregation="patch_mean", backend=backend)
    want = psal.attend(qt.contiguous(), kt.contiguous(), vt.contiguous(), idx_t.contiguous(), aggregation="patch_mean", backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", CASES)
def test_empty_batch_and_one_pixel(backend, device):
    q, k, v = to_device(device, *_inputs(B=0))
    idx = torch.zeros(0, 1, 3, 4, 5, dtype=torch.int64, device=device)
    q.requires_grad_()
    out = psal.attend(q, k, v, idx, backend=backend)
    assert out.shape == (0, 3, 4, 5) and out.device.type == device
    out.sum().backward()
    assert q.grad.shape == q.shape
    q, k, v = to_device(device, *_inputs(H=1, W=1, Hk=1, Wk=1))
    out = psal.attend(q, k, v, torch.zeros(2, 1, 1, 1, 1, dtype=torch.int64, device=device), aggregation="patch", backend=backend)
    torch.testing.assert_close(out, v)  # one key: every weight is 1


@pytest.mark.parametrize("backend, device", CASES)
def test_nan_in_a_value_stays_local(backend, device):
    q, k, v = _inputs()
    v[0, :, 0, 0] = float("nan")
    q, k, v = to_device(device, q, k, v)
    idx = torch.full((2, 1, 1, 4, 5), 1, dtype=torch.int64, device=device)  # nobody reads key position 0
    out = psal.attend(q, k, v, idx, patch_size=1, aggregation="center", backend=backend)
    assert torch.isfinite(out).all()
    idx[0, 0, 0, 2, 2] = 0
    out = psal.attend(q, k, v, idx, patch_size=1, aggregation="center", backend=backend)
    assert torch.isnan(out[0, :, 2, 2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("aggregation", ["patch", "patch_mean"])
def test_votes_off_the_map_read_nothing(backend, device, aggregation):
    # Pixels of the first row and column match key (1, 1), all others key (3, 3) of a 6x6 key:
    # value (0, 0) is then read only by votes that would land off the query map (offset (-1, -1)
    # of the first row and column), so a NaN there must reach neither the output nor a gradient.
    q, k, v = _inputs(H=4, W=5, Hk=6, Wk=6)
    v[:, :, 0, 0] = float("nan")
    q, k, v = to_device(device, q, k, v)
    idx = torch.full((2, 1, 2, 4, 5), 3 * 6 + 3, dtype=torch.int64, device=device)
    idx[..., 0, :] = 1 * 6 + 1
    idx[..., :, 0] = 1 * 6 + 1
    for t in (q, k, v):
        t.requires_grad_()
    out = psal.attend(q, k, v, idx, aggregation=aggregation, backend=backend)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.isfinite(v.grad[:, :, 1:, 1:]).all()


@pytest.mark.parametrize("backend, device", CASES)
def test_patch_softmax_is_stable_for_large_scores(backend, device):
    # Costs in the tens of thousands over T = 0.01: exp underflows everywhere unless the softmax
    # over each pixel's votes is shifted by their max.
    q, k, v = _inputs(C=3, Cv=2, H=6, W=6, Hk=4, Wk=4)
    idx = torch.randint(0, 16, (2, 1, 4, 6, 6), generator=gen(3))
    out = psal.attend(*to_device(device, q * 30, k * 30, v, idx), temperature=0.01, aggregation="patch", backend=backend).cpu()
    assert torch.isfinite(out).all()
    want = naive_attention(q * 30, k * 30, v, idx[:, 0], 0.01, 3, "patch")
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
