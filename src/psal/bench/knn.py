"""Patch k-NN benchmark: PatchMatch backends against exact search and faiss, in one run.

    python -m psal.bench knn --sizes 128 256 512 --repeats 3
    python -m psal.bench knn --device cuda --sizes 512 --iters 10

For each size S, the query is scikit-image's ``astronaut`` and the key its ``coffee``, both resized
to S x S RGB; all S*S patches (p = 7, replicate padded) of the query are matched against all of
the key's, k = 3. Every method runs in a fresh worker process, so that its peak memory (the rise
of the process's resident-set high-water mark over its resting size) is its own; one untimed
call first (numba loads or compiles, faiss spins up its threads), then ``--repeats`` timed calls,
of which the median is reported.

Quality is measured against the exact k-NN (pure PyTorch brute force) on every query pixel, or on a
random sample of ``--quality-sample`` query pixels where the image has more: ``cost ratio`` is the
mean cost of the j-th match over the exact j-th mean (one number per j, and their mean),
``recall@1`` the share of query pixels whose first match has the exact best cost. The costs of
every method's matches are recomputed by one oracle (``psal.patch_costs``).

``--device cuda`` runs the PatchMatch backends that take CUDA tensors (``psal-triton``,
``psal-torch``) and the exact search on the GPU, synchronising around every call; peak memory is
then the caching allocator's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import psal
from psal.bench import common

METHODS = ("psal-numba", "psal-triton", "psal-torch", "torch-exact", "faiss-flat", "faiss-hnsw32")
DEFAULT_METHODS = {
    "cpu": ("psal-numba", "psal-torch", "torch-exact", "faiss-flat", "faiss-hnsw32"),
    "cuda": ("psal-triton", "psal-torch", "torch-exact"),
}
EXACT = ("torch-exact", "faiss-flat")


def _inputs(size: int):
    from psal.images import load_bundled

    return load_bundled("astronaut", size), load_bundled("coffee", size)


def _patch_rows(x: torch.Tensor, p: int):
    from psal.backends.layout import unfold_patches

    return unfold_patches(x, p)[0].T.contiguous().numpy()  # (H*W, C*p*p) float32


def _runner(method: str, p: int, k: int, iters: int, device: str = "cpu"):
    """A function (query, key) -> (indices (k, L) int64, costs (k, L) float32) for ``method``."""
    import psal

    if method.startswith("psal-"):
        backend = method.split("-", 1)[1]
        gen = torch.Generator(device=device).manual_seed(0)

        def run_psal(q, key):
            f = psal.patchmatch(q, key, patch_size=p, num_neighbors=k, num_iters=iters, generator=gen, backend=backend)
            return f.indices.reshape(k, -1), f.costs.reshape(k, -1)

        return run_psal
    if method == "torch-exact":

        def run_exact(q, key):
            f = psal.exact_knn(q, key, patch_size=p, num_neighbors=k)
            return f.indices.reshape(k, -1), f.costs.reshape(k, -1)

        return run_exact
    import faiss

    def run(q, key):
        Q, K = _patch_rows(q, p), _patch_rows(key, p)
        index = faiss.IndexFlatL2(Q.shape[1]) if method == "faiss-flat" else faiss.IndexHNSWFlat(Q.shape[1], 32)
        index.add(K)
        dist, idx = index.search(Q, k)
        return torch.from_numpy(idx.T.copy()), torch.from_numpy(dist.T.copy())

    return run


def worker(args) -> None:
    """Runs one method at one size; writes times, memory and the field to ``args.out``."""
    device = "cpu" if args.method.startswith("faiss") else args.device
    q, key = (t.to(device) for t in _inputs(args.size))
    run = _runner(args.method, args.patch_size, args.k, args.iters, device)
    t0 = time.perf_counter()
    run(q, key)
    common.sync(device)
    first = time.perf_counter() - t0
    memory = common.PeakMemory(device)
    memory.start()
    times = []
    for _ in range(args.repeats):
        common.sync(device)
        t0 = time.perf_counter()
        idx, cost = run(q, key)
        common.sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > args.time_budget:
            break
    peak = memory.peak_kib()
    torch.save({"times": times, "first": first, "peak_kib": peak, "indices": idx.cpu(), "costs": cost.cpu()}, args.out)


def _exact_sample(q, key, p: int, k: int, sample: int, seed: int = 0):
    """Exact k-NN costs (k, n) for a random sample of query pixels (all of them if few)."""
    from psal.backends.layout import unfold_patches
    from psal.backends.torch.search import exact_knn_patches

    qpat, kpat = unfold_patches(q, p), unfold_patches(key, p)
    L = qpat.shape[2]
    pick = torch.arange(L) if L <= sample else torch.randperm(L, generator=torch.Generator().manual_seed(seed))[:sample]
    _, cost = exact_knn_patches(qpat[:, :, pick], kpat, None, k, "l2")
    return pick, cost[0]


def compile_times() -> tuple[float, float]:
    """Seconds of the first numba search in a new process: with an empty kernel cache (compile),
    then with the cache that run left (load)."""
    code = (
        "import time, torch, psal; q = torch.rand(1, 3, 16, 16); t = time.perf_counter(); "
        "psal.patchmatch(q, q, backend='numba'); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": tmp}
        runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True) for _ in range(2)]
    return float(runs[0].stdout), float(runs[1].stdout)


def _run_worker(method: str, size: int, args) -> dict | None:
    options = [
        "--repeats", str(args.repeats), "--patch-size", str(args.patch_size), "--k", str(args.k),
        "--iters", str(args.iters), "--time-budget", str(args.time_budget), "--device", args.device,
    ]  # fmt: skip
    return common.run_worker("psal.bench.knn", method, size, options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench knn", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument(
        "--methods", nargs="+", choices=METHODS, help="default: all but psal-triton (CPU); psal-triton, psal-torch, torch-exact (CUDA)"
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per method (median reported)")
    ap.add_argument("--time-budget", type=float, default=60.0, help="stop repeating a method after this many seconds")
    ap.add_argument("--max-exact", type=int, default=256, help="largest size at which exact methods are timed")
    ap.add_argument("--quality-sample", type=int, default=16384, help="query pixels checked against exact")
    ap.add_argument("--patch-size", type=int, default=7)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    common.add_worker_arguments(ap)
    args = common.parse_suite(ap, argv, worker, DEFAULT_METHODS)
    if args is None:
        return 0

    print(common.environment())
    if "psal-numba" in args.methods:
        cold, warm = compile_times()
        print(f"numba kernels, first call in a new process: {cold:.1f} s compiling (empty cache), {warm:.2f} s loading the disk cache")
    print(
        f"\npatch k-NN on {args.device}: query astronaut, key coffee, S x S RGB, p = {args.patch_size}, k = {args.k}, "
        f"PatchMatch iterations = {args.iters}; median of up to {args.repeats} calls after one untimed call\n"
    )
    base = "faiss-hnsw32" if "faiss-hnsw32" in args.methods else "torch-exact"  # the time ratios' competitor
    header = ["size", "method", "median s", "first call s", "peak MiB", "cost ratio (per k)", "recall@1", f"vs {base}"]
    rows, records = [], []
    for size in args.sizes:
        q, key = _inputs(size)
        pick, exact = _exact_sample(q, key, args.patch_size, args.k, args.quality_sample)
        results = {}
        for method in args.methods:
            if method in EXACT and size > args.max_exact:
                continue
            res = _run_worker(method, size, args)
            if res is not None:
                results[method] = res
        hnsw = results.get(base)
        for method, res in results.items():
            med = statistics.median(res["times"])
            # Every method's matches are re-costed by the same direct oracle: faiss reports
            # distances in the expanded |q|^2 + |k|^2 - 2<q, k> form, whose rounding would
            # otherwise count as misses.
            idx = res["indices"].reshape(1, 1, args.k, size, size)
            cost = psal.patch_costs(q, key, idx, patch_size=args.patch_size).reshape(args.k, -1)[:, pick].double()
            ratios = cost.mean(1) / exact.double().mean(1)
            recall = float((cost[0] <= exact[0].double() * (1 + 1e-5) + 1e-6).double().mean())
            speed = statistics.median(hnsw["times"]) / med if hnsw else float("nan")
            sampled = "" if pick.numel() == size * size else "*"
            rows.append([
                f"{size}²", method, f"{med:.3f}", f"{res['first']:.2f}", f"{res['peak_kib'] / 1024:.0f}",
                " / ".join(f"{r:.3f}" for r in ratios.tolist()) + sampled, f"{recall:.3f}{sampled}", f"{speed:.1f}x",
            ])  # fmt: skip
            records.append({
                "size": size, "method": method, "times_s": res["times"], "median_s": med, "first_call_s": res["first"],
                "peak_mib": res["peak_kib"] / 1024, "cost_ratio": ratios.tolist(), "recall_at_1": recall,
                "quality_pixels": pick.numel(),
            })  # fmt: skip
    print(common.markdown_table(header, rows))
    if any(r[5].endswith("*") for r in rows):
        print(f"\n* quality on a random sample of {args.quality_sample} query pixels")
    common.write_json(args.json, args, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
