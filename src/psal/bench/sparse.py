"""Sparse queries benchmark: the search over a few query pixels (``positions=``) against the
dense search of the whole map, in one run.

    python -m psal.bench sparse --sizes 512 2048 --fraction 0.01
    python -m psal.bench sparse --device cuda --sizes 2048 4096

For each size S the query is scikit-image's ``astronaut`` and the key its ``coffee``, both S x S
RGB; p = 7, k = 3, 5 iterations. The listed pixels are one disc covering ``--fraction`` of the
query, the shape of a region to edit (the query pixels of an inpainting hole). Every (backend,
mode) runs in a fresh worker process: the kernels are loaded by a tiny call first, then the
first full call is measured for peak memory (the rise of the resident-set high-water mark on CPU,
the caching allocator's peak on CUDA; a first call, so that memory freed and kept by an allocator
cannot hide a later call's needs), then ``--repeats`` timed calls, of which the median is
reported. Quality: the mean cost over the listed pixels against the exact k-NN of those pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from psal.bench import common

BACKENDS = {"cpu": ("numba", "torch"), "cuda": ("triton", "torch")}


def listed_disc(size: int, fraction: float) -> torch.Tensor:
    """``(S, S)`` bool: one disc of about ``fraction`` of the pixels, centred a little off-centre."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = (fraction * size * size / torch.pi) ** 0.5
    return (yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 <= radius**2


def _inputs(size: int):
    from psal.images import load_bundled

    return load_bundled("astronaut", size), load_bundled("coffee", size)


def worker(args) -> None:
    import psal

    backend, mode = args.worker.split("-")
    device = args.device
    q, key = (t.to(device) for t in _inputs(args.size))
    listed = listed_disc(args.size, args.fraction).to(device)
    positions = listed.flatten().nonzero().squeeze(1) if mode == "sparse" else None
    opts = dict(patch_size=args.patch_size, num_neighbors=args.k, num_iters=args.iters, backend=backend)

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        return psal.patchmatch(q, key, generator=gen, positions=positions, **opts)

    tiny = torch.rand(1, 3, 16, 16, device=device)
    psal.patchmatch(tiny, tiny, positions=torch.arange(8, device=device) if mode == "sparse" else None, **opts)
    memory = common.PeakMemory(device)
    memory.start()
    common.sync(device)
    t0 = time.perf_counter()
    field = run()
    common.sync(device)
    times = [time.perf_counter() - t0]
    peak = memory.peak_kib()
    for _ in range(args.repeats - 1):
        if sum(times) > args.time_budget:
            break
        common.sync(device)
        t0 = time.perf_counter()
        field = run()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    costs = field.costs.reshape(args.k, -1).cpu()
    if mode == "dense":
        costs = costs[:, listed.flatten().cpu()]
    torch.save({"times": times, "peak_kib": peak, "costs": costs}, args.out)


def _exact_costs(size: int, fraction: float, p: int, k: int, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN costs ``(k, n)`` of a sample of the listed pixels, and which (in list order)."""
    from psal.backends.layout import unfold_patches
    from psal.backends.torch.search import exact_knn_patches

    q, key = _inputs(size)
    where = listed_disc(size, fraction).flatten().nonzero().squeeze(1)
    pick = torch.arange(where.numel())
    if where.numel() > sample:
        pick = torch.randperm(where.numel(), generator=torch.Generator().manual_seed(0))[:sample].sort().values
    qpat = unfold_patches(q, p)[:, :, where[pick]]
    _, cost = exact_knn_patches(qpat, unfold_patches(key, p), None, k, "l2")
    return pick, cost[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench sparse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--fraction", type=float, default=0.01, help="share of the query pixels listed (one disc)")
    ap.add_argument("--backends", nargs="+", choices=["numba", "torch", "triton"], help="default: numba, torch (CPU); triton, torch (CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    ap.add_argument("--time-budget", type=float, default=120.0, help="stop repeating a method after this many seconds")
    ap.add_argument("--quality-sample", type=int, default=4096, help="listed pixels checked against exact")
    ap.add_argument("--patch-size", type=int, default=7)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--methods", help=argparse.SUPPRESS)
    common.add_worker_arguments(ap)
    args = common.parse_suite(ap, argv, worker, {"cpu": [], "cuda": []})
    if args is None:
        return 0
    backends = args.backends or BACKENDS["cuda" if args.device.startswith("cuda") else "cpu"]

    print(common.environment())
    print(
        f"\nsparse queries on {args.device}: query astronaut, key coffee, S x S RGB, p = {args.patch_size}, k = {args.k}, "
        f"{args.iters} iterations; listed: one disc of {100 * args.fraction:g}% of the query pixels; median of up to "
        f"{args.repeats} calls; peak memory of the first call\n"
    )
    options = [
        "--repeats", str(args.repeats), "--patch-size", str(args.patch_size), "--k", str(args.k), "--iters", str(args.iters),
        "--time-budget", str(args.time_budget), "--device", args.device, "--fraction", str(args.fraction),
    ]  # fmt: skip
    header = [
        "size",
        "backend",
        "search",
        "listed pixels",
        "median s",
        "peak MiB",
        "time vs dense",
        "memory vs dense",
        "cost ratio to exact",
    ]
    rows, records = [], []
    for size in args.sizes:
        pick, exact = _exact_costs(size, args.fraction, args.patch_size, args.k, args.quality_sample)
        listed = int(listed_disc(size, args.fraction).sum())
        for backend in backends:
            res = {mode: common.run_worker("psal.bench.sparse", f"{backend}-{mode}", size, options) for mode in ("dense", "sparse")}
            if res["dense"] is None or res["sparse"] is None:
                continue
            dense_s, dense_kib = statistics.median(res["dense"]["times"]), max(res["dense"]["peak_kib"], 1)
            for mode in ("dense", "sparse"):
                r = res[mode]
                med = statistics.median(r["times"])
                ratio = float(r["costs"][:, pick].double().mean() / exact.double().mean())
                searched = size * size if mode == "dense" else listed
                rows.append([
                    f"{size}²", backend, mode, f"{searched}", f"{med:.3f}", f"{r['peak_kib'] / 1024:.1f}",
                    f"{med / dense_s:.3f}", f"{r['peak_kib'] / dense_kib:.3f}", f"{ratio:.3f}",
                ])  # fmt: skip
                records.append({
                    "size": size, "backend": backend, "mode": mode, "searched": searched, "times_s": r["times"],
                    "median_s": med, "peak_mib": r["peak_kib"] / 1024, "time_vs_dense": med / dense_s,
                    "memory_vs_dense": r["peak_kib"] / dense_kib, "cost_ratio": ratio,
                })  # fmt: skip
    print(common.markdown_table(header, rows))
    common.write_json(args.json, args, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
