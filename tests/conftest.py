"""Shared test helpers, including an independent brute-force oracle.

``naive_cost_matrix`` computes every patch cost by explicit clamped-coordinate shifts, without the
padding, unfold or gather code of the package, so the package's own oracles are checked against
something written differently.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist workers share the cores: OpenMP threads (torch's, numba's) that spin-wait
    # between parallel regions would take them from the other workers. Read when OpenMP loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if CUDA:
    # cuBLAS is deterministic only with a fixed workspace; without it, matrix products on CUDA
    # raise under ``torch.use_deterministic_algorithms(True)``. Read when cuBLAS starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
else:
    # Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. Triton
    # reads the variable when a kernel is defined, so it is set before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import psal  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core), torch's and numba's threads share the
# cores with the other workers instead of each worker taking them all.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_THREADS)
    try:
        import numba

        numba.set_num_threads(min(_THREADS, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover
        pass

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# The (backend, device) cases of the shared contract suite, the one list of them. On CPU tensors:
# numba, torch, and Triton through its interpreter when there is no GPU. With a GPU: Triton
# (compiled) and torch on CUDA tensors. Tests build their inputs on the CPU, with the same
# generators whatever the case, and move them to the device before calling psal.
_CPU_CASES = [("numba", "cpu"), ("torch", "cpu")] + ([("triton", "cpu")] if HAVE_TRITON and not CUDA else [])
_CUDA_CASES = (([("triton", "cuda")] if HAVE_TRITON else []) + [("torch", "cuda")]) if CUDA else []


def _params(cases):
    return [pytest.param(backend, device, id=f"{backend}-{device}") for backend, device in cases]


# For ``@pytest.mark.parametrize("backend, device", CASES)``.
CASES = _params(_CPU_CASES + _CUDA_CASES)
# Without the interpreted Triton case, for tests too slow through the interpreter.
NATIVE_CASES = _params([c for c in _CPU_CASES + _CUDA_CASES if c != ("triton", "cpu")])
# For tests of what sits above the ops (modules, compiled models): on CPU the backend that
# ``backend="auto"`` picks (numba), on CUDA every backend.
MODEL_CASES = _params([("numba", "cpu")] + _CUDA_CASES)
# For tests with no backend to choose (dense full attention): ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# The backends of the CPU cases, for the CPU-only tests that take a backend alone.
BACKENDS = [backend for backend, _ in _CPU_CASES]


def pytest_configure(config):
    try:
        from hypothesis import settings

        settings.register_profile("psal", deadline=None, derandomize=True, print_blob=True)
        settings.load_profile("psal")
    except ImportError:  # pragma: no cover
        pass
    workers = getattr(config.option, "numprocesses", None)
    if workers and not os.environ.get("PYTEST_XDIST_WORKER"):
        _warm_numba_cache()


# Every numba kernel signature the suite uses, split in two about equal halves.
_WARM = [
    "q = torch.rand(1, 4, 8, 8); psal.patchmatch(q, q, num_neighbors=2, backend='numba')\n"
    "q = torch.rand(1, 4, 8, 8, dtype=torch.float64, requires_grad=True); i = torch.zeros(1, 1, 2, 8, 8, dtype=torch.long)\n"
    "i[:, :, 1] = 1\n"
    "for a in ('center', 'patch'): psal.attend(q, q, q, i, aggregation=a, backend='numba').sum().backward()",
    "q = torch.rand(1, 4, 8, 8, requires_grad=True); i = torch.zeros(1, 1, 2, 8, 8, dtype=torch.long)\n"
    "i[:, :, 1] = 1\n"
    "for a in ('center', 'patch'): psal.attend(q, q, q, i, aggregation=a, backend='numba').sum().backward()",
]


def _warm_numba_cache():
    """Under pytest-xdist, before the workers start: compile the numba kernels into their disk
    cache once, in two processes at a time, so that the workers (and the processes that tests
    start) load them instead of each compiling them all (about 90 s of CPU each, cold)."""
    import subprocess
    import sys

    if importlib.util.find_spec("numba") is None:
        return
    procs = [
        subprocess.Popen([sys.executable, "-c", "import torch, psal\n" + code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for code in _WARM
    ]
    for proc in procs:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:  # the workers will compile what they need themselves
            proc.kill()


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for one test."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_device(device, *tensors):
    """The tensors (``None`` stays ``None``) on ``device``, as a tuple."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def field_to(field: psal.KNNField, device) -> psal.KNNField:
    return psal.KNNField(*to_device(device, *field))


def random_key_mask(B: int, Hk: int, Wk: int, k: int, density: float, g: torch.Generator) -> torch.Tensor:
    """``(B, Hk, Wk)`` bool, about ``density`` True, with at least ``k`` True in every batch element."""
    mask = torch.rand(B, Hk, Wk, generator=g) < density
    for b in range(B):
        mask[b].view(-1)[torch.randperm(Hk * Wk, generator=g)[:k]] = True
    return mask


def naive_cost_matrix(q: torch.Tensor, k: torch.Tensor, p: int, similarity: str = "l2") -> torch.Tensor:
    """float64 costs ``(H * W, Hk * Wk)`` between every query and key patch of one map ``(C, H, W)``."""
    q, k = q.double(), k.double()
    C, H, W = q.shape
    _, Hk, Wk = k.shape
    r = p // 2
    out = torch.zeros(H * W, Hk * Wk, dtype=torch.float64)
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            qr = (torch.arange(H) + di).clamp(0, H - 1)
            qc = (torch.arange(W) + dj).clamp(0, W - 1)
            kr = (torch.arange(Hk) + di).clamp(0, Hk - 1)
            kc = (torch.arange(Wk) + dj).clamp(0, Wk - 1)
            qs = q[:, qr][:, :, qc].reshape(C, -1).T  # (H*W, C)
            ks = k[:, kr][:, :, kc].reshape(C, -1).T  # (Hk*Wk, C)
            if similarity == "l2":
                out += (qs[:, None, :] - ks[None, :, :]).square().sum(-1)
            else:
                out -= qs @ ks.T
    return out


def check_field(field: psal.KNNField, query, key, *, patch_size, num_neighbors, num_heads=1, key_mask=None, similarity="l2"):
    """The contract every search result must meet, whatever its quality."""
    B, _, H, W = query.shape
    Hk, Wk = key.shape[-2:]
    shape = (B, num_heads, num_neighbors, H, W)
    assert field.indices.shape == shape and field.costs.shape == shape
    assert field.indices.device == query.device and field.costs.device == query.device
    assert field.indices.dtype == torch.int64 and field.costs.dtype == torch.float32
    idx = field.indices
    assert int(idx.min()) >= 0 and int(idx.max()) < Hk * Wk
    if num_neighbors > 1:
        assert (idx.sort(2).values.diff(dim=2) != 0).all(), "matches of one query must be distinct"
        assert (field.costs.diff(dim=2) >= 0).all(), "costs must ascend along k"
    if key_mask is not None:
        flat = idx.reshape(B, num_heads, -1)
        ok = torch.gather(key_mask.flatten(1)[:, None, :].expand(B, num_heads, Hk * Wk), 2, flat)
        assert ok.all(), "a match falls on a masked key position"
    recomputed = psal.patch_costs(query, key, idx, patch_size=patch_size, similarity=similarity, num_heads=num_heads)
    tol = 1e-4 + 1e-4 * recomputed.abs()
    if similarity == "dot":
        # A dot cost sums p * p * C products of either sign, in float32: its rounding error scales
        # with the sum of their magnitudes, which cancellation can leave far above the cost itself.
        size = psal.patch_costs(query.abs(), key.abs(), idx, patch_size=patch_size, similarity="dot", num_heads=num_heads)
        tol = tol + 1e-5 * size.abs()
    close = (field.costs == recomputed) | ((field.costs - recomputed).abs() <= tol)  # equal: +inf (NaN inputs)
    assert close.all(), f"costs differ from the recomputed ones by up to {float((field.costs - recomputed).abs().nan_to_num().max()):.3g}"


def naive_attention(q, k, v, idx, T: float, p: int, aggregation: str, similarity: str = "l2") -> torch.Tensor:
    """float64 attention of one head, ``(B, Cv, H, W)``, by explicit loops over pixels, matches and
    offsets with clamped coordinates, straight from the formulas of ``PSAL.md``. ``idx (B, k, H, W)``."""
    q, k, v = q.double(), k.double(), v.double()
    B, _, H, W = q.shape
    Wk = k.shape[-1]
    K, r = idx.shape[1], p // 2

    def at(x, i, j):  # replicate padding
        return x[:, min(max(i, 0), x.shape[1] - 1), min(max(j, 0), x.shape[2] - 1)]

    out = torch.zeros(B, v.shape[1], H, W, dtype=torch.float64)
    for b in range(B):
        match = [[[divmod(int(idx[b, m, i, j]), Wk) for m in range(K)] for j in range(W)] for i in range(H)]
        score = torch.zeros(H, W, K, dtype=torch.float64)
        for i in range(H):
            for j in range(W):
                for m, (yr, yc) in enumerate(match[i][j]):
                    c = 0.0
                    for di in range(-r, r + 1):
                        for dj in range(-r, r + 1):
                            a, e = at(q[b], i + di, j + dj), at(k[b], yr + di, yc + dj)
                            c += float(((a - e) ** 2).sum()) if similarity == "l2" else -float((a * e).sum())
                    score[i, j, m] = -c / T
        for i in range(H):
            for j in range(W):
                if aggregation == "center":
                    w = score[i, j].softmax(0)
                    out[b, :, i, j] = sum(w[m] * at(v[b], *match[i][j][m]) for m in range(K))
                    continue
                votes, values = [], []
                for di in range(-r, r + 1):
                    for dj in range(-r, r + 1):
                        xi, xj = i - di, j - dj  # the query patch whose offset (di, dj) covers (i, j)
                        if not (0 <= xi < H and 0 <= xj < W):
                            continue
                        for m, (yr, yc) in enumerate(match[xi][xj]):
                            own = score[xi, xj].softmax(0)[m]
                            votes.append(score[xi, xj, m] if aggregation == "patch" else own)
                            values.append(at(v[b], yr + di, yc + dj))
                if aggregation == "patch":
                    w = torch.stack(votes).softmax(0)
                    out[b, :, i, j] = sum(wt * val for wt, val in zip(w, values))
                else:  # patch_mean: each patch's own weights, averaged over the covering patches
                    out[b, :, i, j] = sum(wt * val for wt, val in zip(votes, values)) / (len(votes) // K)
    return out


def random_indices(B: int, heads: int, K: int, H: int, W: int, num_keys: int, seed: int) -> torch.Tensor:
    """``(B, heads, K, H, W)`` int64: ``K`` distinct random key positions per query pixel."""
    g = gen(seed)
    return (
        torch.rand(B * heads * H * W, num_keys, generator=g)
        .argsort(1)[:, :K]
        .reshape(B, heads, H, W, K)
        .permute(0, 1, 4, 2, 3)
        .contiguous()
    )
