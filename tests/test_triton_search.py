"""The Triton search backend (``psal.backends.triton.search``) against independent references.

On a machine with CUDA the kernels run on the GPU; elsewhere they run on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, set before anything defines the kernels), which
executes every program in Python: sizes stay small. The references are ``check_field`` (the
contract, costs recomputed by the pure-PyTorch backend), ``psal.exact_knn`` (brute force) and the
inputs' own structure (crops, single allowed keys).

Both kernel families run here: ``lanes`` (the default; the quality tests) and ``tiles``. They
must return the same field (``test_lanes_and_tiles_give_the_same_field``, the contract test draws
either), so one family's quality is the other's; the lanes kernels' GPU code path (a row of
scalar loads, unrolled) is run through the interpreter too, against the row tiles the
interpreter takes by default.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import check_field, gen, random_key_mask  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import psal  # noqa: E402
from psal.backends.triton import search as triton_search  # noqa: E402
from psal.backends.triton import search_lanes, search_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
FAMILIES = {"lanes": "lanes-pad-32x1", "tiles": "tiles-16x16x2"}


@contextlib.contextmanager
def using(name: str):
    with mock.patch.dict(os.environ, {"PSAL_TRITON_SEARCH": name}):
        yield


def search(query, key, **kwargs):
    kwargs.setdefault("generator", gen(0))
    return psal.patchmatch(query.to(DEVICE), key.to(DEVICE), backend="triton", **kwargs)


def on_cpu(field: psal.KNNField) -> psal.KNNField:
    return psal.KNNField(field.indices.cpu(), field.costs.cpu())


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed)).to(dtype)


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 2))
    C = heads * draw(st.integers(1, 2))
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    Hk, Wk = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    p = draw(st.sampled_from([1, 3, 5, 2 * max(H, W, Hk, Wk) + 1]))
    K = draw(st.integers(1, min(5, Hk * Wk)))
    seed = draw(st.integers(0, 2**31))
    g = gen(seed)
    mask = None
    if draw(st.booleans()):
        mask = random_key_mask(B, Hk, Wk, K, draw(st.sampled_from([0.2, 0.5, 0.9])), g)
    return dict(
        query=torch.randn(B, C, H, W, generator=g),
        key=torch.randn(B, C, Hk, Wk, generator=g),
        patch_size=p,
        num_neighbors=K,
        num_heads=heads,
        key_mask=mask,
        similarity=draw(st.sampled_from(["l2", "dot"])),
        num_iters=draw(st.integers(0, 2)),
        warm=draw(st.integers(0, K)),  # k of a warm start (0: none)
        # Patches read in chunks of 16 values, as on a GPU (the interpreter's default block holds
        # these small patches whole); only for small patches, each chunk costs interpreter time.
        chunked=draw(st.booleans()) and p * p * C <= 100,
        variant=draw(st.sampled_from(["lanes-pad-32x1", "lanes-clamp-32x1", "tiles-16x16x2"])),
        seed=seed,
    )


@settings(max_examples=10)
@given(problem=problems())
def test_field_contract(problem):
    seed, warm, chunked, variant = problem.pop("seed"), problem.pop("warm"), problem.pop("chunked"), problem.pop("variant")
    q, k, mask = problem["query"], problem["key"], problem["key_mask"]
    opts = {name: problem[name] for name in ("patch_size", "num_heads", "similarity")}
    init = None
    if warm:
        init = psal.patchmatch(q, k, num_neighbors=warm, num_iters=0, key_mask=mask, generator=gen(seed + 1), backend="torch", **opts)
        init = psal.KNNField(init.indices.to(DEVICE), init.costs.to(DEVICE))
    config = search_tiles.launch_config
    small_chunks = mock.patch.object(search_tiles, "launch_config", lambda *args: dict(config(*args), CB=16))
    with small_chunks if chunked else contextlib.nullcontext(), using(variant):
        field = search(
            q, k, num_neighbors=problem["num_neighbors"], num_iters=problem["num_iters"],
            key_mask=None if mask is None else mask.to(DEVICE), init=init, generator=gen(seed), **opts,
        )  # fmt: skip
    field = on_cpu(field)
    check_field(field, q, k, **{name: problem[name] for name in ("patch_size", "num_neighbors", "num_heads", "key_mask", "similarity")})
    if init is not None:  # a warm start is never made worse (up to the summation order of costs)
        best, before = field.costs[:, :, 0], init.costs[:, :, 0].cpu()
        assert (best <= before + 1e-4 * (1 + before.abs())).all()


def smooth_noise(seed: int, size: int = 32) -> torch.Tensor:
    x = torch.rand(1, 3, size + 4, size + 4, generator=gen(seed))
    return F.conv2d(x, torch.ones(3, 1, 5, 5) / 25, groups=3).contiguous() * 3


def test_mean_cost_within_two_percent_of_exact():
    """32x32 RGB smooth noise, p = 5, k = 3, default 5 iterations. Measured (interpreter, seeds
    0-2): 1.011, 1.013, 1.016 at worst (torch backend 1.018, 1.022, 1.028; numba 1.011, 1.014,
    1.018). Kernels broken on purpose failed: no propagation 1.17-1.20; propagating only the best
    match of each neighbour 1.026-1.038; random search only around the best match 1.020-1.031;
    no random search 1.23-1.32."""
    q, k = smooth_noise(1), smooth_noise(2)
    exact = psal.exact_knn(q, k, patch_size=5, num_neighbors=3).costs.mean((0, 1, 3, 4))
    field = on_cpu(search(q, k, patch_size=5, num_neighbors=3))
    check_field(field, q, k, patch_size=5, num_neighbors=3)
    ratio = field.costs.mean((0, 1, 3, 4)) / exact
    assert (ratio >= 1 - 1e-4).all() and (ratio <= 1.02).all(), ratio.tolist()


def test_same_seed_same_field_and_seeds_differ():
    q, k = rand(2, 3, 12, 11, seed=5), rand(2, 3, 10, 13, seed=6)
    a = search(q, k, num_iters=1, generator=gen(11))
    b = search(q, k, num_iters=1, generator=gen(11))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.costs, b.costs)
    for iters in (0, 1):
        c = search(q, k, num_iters=iters, generator=gen(12))
        d = search(q, k, num_iters=iters, generator=gen(13))
        assert not torch.equal(c.indices, d.indices)


def assert_nearly_same(a: psal.KNNField, b: psal.KNNField):
    """Fields that differ only in the summation order of the costs: the last bits of a cost, and
    the order of rare near-ties."""
    same = a.indices == b.indices
    assert same.float().mean() > 0.99
    torch.testing.assert_close(a.costs[same], b.costs[same], rtol=1e-5, atol=1e-5)


def test_result_does_not_depend_on_the_block_size(monkeypatch):
    """Tiles: the interpreter's one big block against the GPU's path (patches in chunks of 8
    values, blocks of 16 pixels: several programs per map and some across two maps of 30 pixels).
    Lanes: blocks of 32 pixels (across maps too). Jacobi updates and per-pixel random streams make the fields the
    same, but for the summation order of the costs (the tiles' chunks; a lane sums its own patch
    in order, so the lanes' fields are bitwise equal)."""
    q, k = rand(3, 2, 5, 6, seed=7), rand(3, 2, 8, 7, seed=8)
    mask = rand(3, 8, 7, seed=9) < 0.7
    opts = dict(patch_size=3, num_neighbors=3, num_iters=1, key_mask=mask.to(DEVICE))
    monkeypatch.setenv("PSAL_TRITON_SEARCH", FAMILIES["tiles"])
    whole = search(q, k, generator=gen(4), **opts)
    config = search_tiles.launch_config
    monkeypatch.setattr(search_tiles, "launch_config", lambda *args: dict(config(*args), CB=8, BLOCK=16))
    small = search(q, k, generator=gen(4), **opts)
    check_field(on_cpu(small), q, k, patch_size=3, num_neighbors=3, key_mask=mask)
    assert_nearly_same(whole, small)
    monkeypatch.setenv("PSAL_TRITON_SEARCH", FAMILIES["lanes"])
    lanes = search(q, k, generator=gen(4), **opts)
    lanes_config = search_lanes.config
    monkeypatch.setattr(search_lanes, "config", lambda *args: dict(lanes_config(*args), BLOCK=32))
    lanes_small = search(q, k, generator=gen(4), **opts)
    assert torch.equal(lanes.indices, lanes_small.indices) and torch.equal(lanes.costs, lanes_small.costs)
    assert_nearly_same(lanes, small)


def lanes_and_tiles_problems():
    """Problems for the comparison of the two families: masks, warm starts, sparse queries, both
    similarities, odd sizes, k from 1 to 5, p from 1 to 7, heads."""
    g = gen(71)
    out = []
    for B, C, H, W, Hk, Wk, p, K, sim, masked, warm, sparse in (
        (2, 3, 9, 11, 10, 7, 3, 3, "l2", False, False, False),
        (1, 4, 7, 6, 8, 9, 5, 2, "dot", True, False, False),
        (3, 2, 5, 13, 6, 6, 1, 4, "l2", True, True, False),
        (2, 3, 12, 10, 11, 9, 7, 1, "l2", False, True, True),
        (1, 6, 8, 8, 9, 7, 3, 5, "dot", False, False, True),
    ):
        q, k = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, Hk, Wk, generator=g)
        opts = dict(patch_size=p, num_neighbors=K, similarity=sim, num_iters=2)
        if masked:
            opts["key_mask"] = random_key_mask(B, Hk, Wk, K, 0.5, g)
        if sparse:
            opts["positions"] = torch.randperm(H * W, generator=g)[: H * W // 3].sort().values
        if warm:
            opts["init"] = psal.patchmatch(
                q, k, num_iters=0, generator=gen(3), backend="torch", **{n: v for n, v in opts.items() if n != "num_iters"}
            )
        out.append((q, k, opts))
    return out


def _on(device, opts):
    moved = dict(opts)
    for name in ("key_mask", "positions"):
        if moved.get(name) is not None:
            moved[name] = moved[name].to(device)
    if moved.get("init") is not None:
        moved["init"] = psal.KNNField(moved["init"].indices.to(device), moved["init"].costs.to(device))
    return moved


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_lanes_and_tiles_give_the_same_field(case):
    """The two families draw the same candidates from the same random streams and keep lists the
    same way: their fields agree, indices exactly (but for rare near-ties), costs to rounding."""
    q, k, opts = lanes_and_tiles_problems()[case]
    fields = {}
    for variant in ("tiles-16x16x2", "lanes-pad-32x1", "lanes-clamp-32x1"):
        with using(variant):
            fields[variant] = on_cpu(search(q, k, generator=gen(9), **_on(DEVICE, opts)))
    if opts.get("positions") is None:  # test_sparse.py checks the sparse contract
        check_field(fields["lanes-pad-32x1"], q, k, **{n: opts.get(n) for n in ("patch_size", "num_neighbors", "similarity", "key_mask")})
    assert_nearly_same(fields["tiles-16x16x2"], fields["lanes-pad-32x1"])
    assert_nearly_same(fields["tiles-16x16x2"], fields["lanes-clamp-32x1"])


@pytest.mark.skipif(ON_GPU, reason="on a GPU the unrolled rows are what runs everywhere")
@pytest.mark.parametrize("pad, sim", [(True, "l2"), (False, "dot"), (False, "l2")], ids=["pad-l2", "clamp-dot", "clamp-l2"])
def test_lanes_unrolled_rows_match_the_interpreters_tiles(monkeypatch, pad, sim):
    """The code a GPU runs (a patch row as ``CU * P`` scalar loads, a run-time row loop with the
    early exit after each row, channels in chunks of ``CU``) through the interpreter, against the
    whole-patch tiles the interpreter runs by default: 6 channels in 3 chunks of 2, k = 3, p = 3,
    a mask, a warm start."""
    g = gen(81)
    q, k = torch.randn(2, 6, 7, 6, generator=g), torch.randn(2, 6, 6, 7, generator=g)
    mask = random_key_mask(2, 6, 7, 3, 0.6, g)
    name = f"lanes-{'pad' if pad else 'clamp'}-32x1"
    opts = dict(patch_size=3, num_neighbors=3, similarity=sim, num_iters=1, key_mask=mask)
    warm = psal.patchmatch(q, k, num_iters=0, generator=gen(2), backend="torch", **{n: v for n, v in opts.items() if n != "num_iters"})
    with using(name):
        tiles = on_cpu(search(q, k, init=warm, generator=gen(5), **opts))
        monkeypatch.setattr(search_lanes, "INTERPRETER_TILE", False)
        monkeypatch.setattr(search_lanes, "CU_MAX", 2)
        rows = on_cpu(search(q, k, init=warm, generator=gen(5), **opts))
    check_field(rows, q, k, patch_size=3, num_neighbors=3, similarity=sim, key_mask=mask)
    assert_nearly_same(tiles, rows)


@pytest.mark.parametrize("similarity", ["l2", "dot"])
def test_warm_start_is_never_worse_and_exact_stays_exact(similarity):
    q, k = rand(2, 4, 10, 11, seed=21), rand(2, 4, 9, 12, seed=22)
    opts = dict(patch_size=3, num_heads=2, similarity=similarity)
    rough = search(q, k, num_neighbors=3, num_iters=1, generator=gen(1), **opts)
    warm = search(q, k, num_neighbors=3, num_iters=0, init=rough, generator=gen(2), **opts)
    assert (warm.costs <= rough.costs + 1e-6 * (1 + rough.costs.abs())).all()
    exact = psal.exact_knn(q, k, patch_size=3, num_neighbors=3, num_heads=2, similarity=similarity)
    init = psal.KNNField(exact.indices.to(DEVICE), exact.costs.to(DEVICE))
    again = on_cpu(search(q, k, num_neighbors=3, num_iters=1, init=init, generator=gen(4), **opts))
    torch.testing.assert_close(again.costs, exact.costs, rtol=1e-5, atol=1e-5)


def test_warm_start_drops_masked_and_duplicate_candidates():
    q, k = rand(1, 2, 6, 5, seed=31), rand(1, 2, 4, 4, seed=32)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :] = False  # positions 0..3 barred
    init = torch.zeros(1, 1, 4, 6, 5, dtype=torch.int64)
    init[:, :, 0] = 2  # barred
    init[:, :, 1] = 9
    init[:, :, 2] = 9  # a duplicate
    init[:, :, 3] = 15
    field = on_cpu(
        search(q, k, num_neighbors=3, num_iters=0, key_mask=mask.to(DEVICE), init=psal.KNNField(init.to(DEVICE), init.float().to(DEVICE)))
    )
    check_field(field, q, k, patch_size=3, num_neighbors=3, key_mask=mask)


def test_propagation_crosses_the_whole_column():
    """A 64x1 query cut from a 200x200 noise key, far too large for random search to hit the
    exact match: only the first 4 rows start on it, so the jump-flood steps must carry it down
    the column (6 iterations of steps 8, 4, 2, 1 reach 60 rows further)."""
    H, dy, dx = 64, 70, 120
    key = rand(1, 3, 200, 200, seed=1)
    query = key[:, :, dy : dy + H, dx : dx + 1].clone()
    want = (torch.arange(H) + dy) * 200 + dx
    init = torch.zeros(1, 1, 1, H, 1, dtype=torch.int64)
    init[0, 0, 0, :4, 0] = want[:4]
    init = psal.KNNField(init.to(DEVICE), torch.zeros(1, 1, 1, H, 1, device=DEVICE))
    field = search(query, key, patch_size=1, num_neighbors=1, num_iters=6, init=init)
    found = field.indices[0, 0, 0, :, 0].cpu() == want
    assert found.all(), found.int().tolist()


def test_single_allowed_key_takes_every_query():
    q, k = rand(3, 2, 9, 7, seed=3), rand(3, 2, 6, 8, seed=4)
    mask = torch.zeros(3, 6, 8, dtype=torch.bool)
    spots = [(0, 0), (5, 7), (2, 3)]
    for b, (y, x) in enumerate(spots):
        mask[b, y, x] = True
    field = search(q, k, num_neighbors=1, num_iters=1, key_mask=mask.to(DEVICE))
    for b, (y, x) in enumerate(spots):
        assert (field.indices[b] == y * 8 + x).all()


# numpy, under the interpreter, warns about the NaN it is asked to sum.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_inputs_stay_in_range():
    g = gen(4)
    q, k = torch.randn(2, 3, 8, 9, generator=g), torch.randn(2, 3, 7, 6, generator=g)
    q[0, :, 3:6, 3:6] = float("nan")
    k[1, 1, 2:4, :] = float("inf")
    k[0, 0, 0, 0] = float("-inf")
    for similarity in ("l2", "dot"):
        field = on_cpu(search(q, k, num_neighbors=3, num_iters=1, similarity=similarity))
        idx = field.indices
        assert int(idx.min()) >= 0 and int(idx.max()) < 42
        assert (idx.sort(2).values.diff(dim=2) != 0).all()
        assert not torch.isnan(field.costs).any()
        assert (field.costs[:, :, 1:] >= field.costs[:, :, :-1]).all()  # infinite costs included
    nan = on_cpu(search(torch.full_like(q, float("nan")), k, num_neighbors=3, num_iters=1))
    assert int(nan.indices.max()) < 42 and torch.isinf(nan.costs).all()
    assert (nan.indices.sort(2).values.diff(dim=2) != 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_equals_float32_of_the_rounded_input(dtype):
    q, k = rand(2, 3, 10, 9, seed=41, dtype=dtype), rand(2, 3, 8, 11, seed=42, dtype=dtype)
    low = search(q, k, num_iters=1, generator=gen(5))
    ref = search(q.float(), k.float(), num_iters=1, generator=gen(5))
    assert torch.equal(low.indices, ref.indices) and torch.equal(low.costs, ref.costs)
    assert low.costs.dtype == torch.float32


def test_non_contiguous_inputs_give_the_same_field():
    q = rand(2, 3, 9, 8, seed=43)
    k = rand(2, 8, 7, 3, seed=44).permute(0, 3, 2, 1)  # non-contiguous (2, 3, 7, 8)
    assert not k.is_contiguous()
    a = search(q, k, num_iters=1, generator=gen(5))
    b = search(q, k.contiguous(), num_iters=1, generator=gen(5))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.costs, b.costs)


def test_float64_is_summed_in_float64():
    """Features near 1000 that differ in the 5th decimal: float32 keeps about 3 significant
    digits of their differences, float64 all of them."""
    q = 1000 + 1e-4 * rand(2, 3, 9, 8, seed=51, dtype=torch.float64)
    k = 1000 + 1e-4 * rand(2, 3, 7, 10, seed=52, dtype=torch.float64)
    field = on_cpu(search(q, k, num_iters=1))
    check_field(field, q, k, patch_size=3, num_neighbors=3)
    want = psal.patch_costs(q, k, field.indices, patch_size=3)  # float64, rounded to float32
    torch.testing.assert_close(field.costs, want, rtol=1e-6, atol=0)
    rounded = psal.patch_costs(q.float(), k.float(), field.indices, patch_size=3)
    assert not torch.allclose(rounded, want, rtol=1e-3, atol=0), "the check above would not see float32 sums"


@pytest.mark.parametrize(
    "K, p, size, key_size, iters, limit",
    [(7, 3, (9, 10), (8, 9), 2, 1.05), (2, 1, (9, 8), (7, 6), 5, 1.6), (3, 11, (5, 4), (4, 6), 2, 1.05)],
    ids=["k7", "p1", "p-larger-than-the-maps"],
)
def test_other_k_and_patch_sizes(K, p, size, key_size, iters, limit):
    """Measured mean cost ratios to exact: k = 7: 1.005-1.013; p = 1 on noise (no coherence to
    exploit): 1.37, 1.47 (the torch backend: 1.58, 1.72); p = 11: 1.001-1.003."""
    q, k = rand(2, 2, *size, seed=61), rand(2, 2, *key_size, seed=62)
    field = on_cpu(search(q, k, patch_size=p, num_neighbors=K, num_iters=iters))
    check_field(field, q, k, patch_size=p, num_neighbors=K)
    exact = psal.exact_knn(q, k, patch_size=p, num_neighbors=K).costs.mean((0, 1, 3, 4))
    ratio = field.costs.mean((0, 1, 3, 4)) / exact
    assert (ratio >= 1 - 1e-4).all() and (ratio <= limit).all(), ratio.tolist()


def _compiled(kernels) -> int:
    return sum(len(cache[0]) for kern in kernels for cache in kern.device_caches.values())


@pytest.mark.skipif(not ON_GPU, reason="kernel caches exist only for compiled kernels (CUDA)")
def test_new_sizes_do_not_recompile(monkeypatch):
    """Tiles: sizes, k within one power-of-two bucket, patch sizes with p * p * C above the chunk,
    masks, warm starts and seeds are run-time arguments: after a first search, none compiles
    again. Lanes: the patch size, k and the channel unroll are compile-time (the patch loops are
    unrolled); sizes, masks, warm starts, seeds and channel counts with the same unroll are not."""
    monkeypatch.setenv("PSAL_TRITON_SEARCH", FAMILIES["tiles"])
    kernels = (search_tiles._init_kernel, search_tiles._iterate_kernel)
    search(rand(1, 3, 20, 17, seed=1), rand(1, 3, 15, 22, seed=2), patch_size=3, num_neighbors=3)
    before = _compiled(kernels)
    q, k = rand(2, 5, 31, 26, seed=3), rand(2, 5, 12, 40, seed=4)
    mask = (rand(2, 12, 40, seed=5) < 0.5).to(DEVICE)
    warm = search(q, k, patch_size=5, num_neighbors=4, key_mask=mask, generator=gen(7))
    search(q, k, patch_size=5, num_neighbors=4, key_mask=mask, init=warm, generator=gen(8))
    search(rand(3, 3, 7, 70, seed=6), rand(3, 3, 64, 1, seed=7), patch_size=7, num_neighbors=3, num_iters=2)
    assert _compiled(kernels) == before
    monkeypatch.setenv("PSAL_TRITON_SEARCH", FAMILIES["lanes"])
    lanes = (search_lanes._init_kernel, search_lanes._iterate_kernel)
    q, k = rand(2, 6, 31, 26, seed=3), rand(2, 6, 12, 40, seed=4)
    search(q, k, patch_size=5, num_neighbors=4, generator=gen(1))
    search(q, k, patch_size=5, num_neighbors=4, key_mask=mask, generator=gen(1))
    before = _compiled(lanes)
    warm = search(rand(1, 6, 9, 50, seed=8), k[:1], patch_size=5, num_neighbors=4, key_mask=mask[:1], generator=gen(7))
    search(rand(1, 6, 9, 50, seed=8), k[:1], patch_size=5, num_neighbors=4, init=warm, generator=gen(8))
    search(rand(3, 12, 7, 70, seed=6), rand(3, 12, 64, 1, seed=7), patch_size=5, num_neighbors=4, num_iters=2)  # C = 12: unroll 6
    assert _compiled(lanes) == before


_COMPILE_FOR_HOPPER = """
from psal.bench import kernels
for variant, dtype, C, P, K, dot, sparse in @CASES@:
    for role, fn, sig, consts, warps, _, _ in kernels.search_specs(variant, dtype, C, P, K, dot, sparse):
        k = kernels.compile_triton(fn, sig, consts, warps)
        assert kernels.local_memory_in_loops(k.sass) == 0 or variant.startswith("tiles") or dtype == "fp64", (variant, role)
print("ok")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the other tests compile and run the kernels")
@pytest.mark.parametrize(
    "cases",
    [
        [("lanes-pad-32x1", "fp32", 3, 7, 3, False, False), ("tiles-16x16x2", "fp32", 3, 7, 3, False, True)],
        [("lanes-clamp-64x2", "bf16", 16, 3, 4, True, True), ("tiles-16x64x4", "bf16", 16, 3, 4, True, False)],
        [("lanes-pad-128x4", "fp64", 2, 5, 2, False, True), ("tiles-8x256x4", "fp64", 2, 5, 2, False, False)],
    ],
    ids=["fp32-l2", "bf16-dot-sparse", "fp64-sparse"],
)
def test_kernels_compile_for_hopper(cases):
    """Without a GPU the interpreter never compiles the kernels: compile both families for sm_90
    (H100/H200) down to a cubin with Triton's own ptxas, in a process where the interpreter is
    off (the kernel report's compiler, ``python -m psal.bench kernels``); the lanes kernels
    without spills inside loops."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    code = _COMPILE_FOR_HOPPER.replace("@CASES@", repr(cases))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_cheaper_candidate_schemes_keep_the_contract():
    """The lanes kernels' cheaper schemes for the GPU check (the first ``prop_k`` matches of each
    neighbour propagated, random search around the first ``rand_k``): valid fields; the full
    scheme is the default's field; the tiles kernels refuse a reduced one."""
    q, k = rand(2, 3, 9, 8, seed=91), rand(2, 3, 10, 7, seed=92)
    args = (q.to(DEVICE), k.to(DEVICE), None, 3, 3, 2, "l2", None, 5)
    full = triton_search.patchmatch(*args, variant="lanes-pad-32x1")
    same = triton_search.patchmatch(*args, variant="lanes-pad-32x1", scheme=(3, 3))
    assert torch.equal(full[0], same[0]) and torch.equal(full[1], same[1])
    for scheme in ((1, 1), (1, 3), (2, 1)):
        idx, cost = triton_search.patchmatch(*args, variant="lanes-clamp-32x1", scheme=scheme)
        check_field(on_cpu(psal.KNNField(idx[:, None], cost[:, None])), q, k, patch_size=3, num_neighbors=3)
        torch.testing.assert_close(cost.cpu(), psal.patch_costs(q, k, idx[:, None].cpu(), patch_size=3)[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs only the full scheme"):
        triton_search.patchmatch(*args, variant="tiles-16x16x2", scheme=(1, 1))
