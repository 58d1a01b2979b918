"""Where the CPU search's time goes: ``python -m psal.bench profile``.

    python -m psal.bench profile --size 512                       # RGB photographs, p = 7, k = 3
    python -m psal.bench profile --size 256 --features noise64    # the layer's inputs: p = 3, k = 4

The numba search on one problem (query astronaut, key coffee, or 64-channel white noise searched
against itself), then the same search with one stage of every iteration left out (the kernels'
``stages`` bits: propagation, random search, the sketch's lower bound, the patch cost), each timed
in this process (median of ``--repeats`` calls after a warm-up). The set-up and the random start
are the call with no iteration; an iteration's time per query pixel is given in core time
(``ns / pixel-iteration`` times the threads). A variant returns a different (worse) field: only
its time means something. The mean cost ratio of the whole search to the exact k-NN of a sample
of query pixels says what the time buys.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from psal.bench import common

_VARIANTS = (
    ("the search as it is", ()),
    ("no random search", ("RANDOM",)),
    ("no propagation", ("PROPAGATE",)),
    ("no sketch bound", ("BOUND",)),
    ("no cost (bound only)", ("COST",)),
    ("candidates only (no bound, no cost)", ("BOUND", "COST")),
)


def _inputs(features: str, size: int):
    if features == "noise64":
        x = torch.randn(1, 64, size, size, generator=torch.Generator().manual_seed(0))
        return x, x, 3, 4
    from psal.bench import knn

    return (*knn._inputs(size), 7, 3)  # the knn suite's problem


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--features", choices=("photo", "noise64"), default="photo")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality-sample", type=int, default=4096, help="query pixels of the exact k-NN check (0: none)")
    args = ap.parse_args(argv)

    import numba

    from psal.backends.numba import kernels
    from psal.backends.numba import search as numba_search

    query, key, p, k = _inputs(args.features, args.size)
    pixels = query.shape[-2] * query.shape[-1]
    threads = numba.get_num_threads()

    def search(iters: int, stages: int = kernels.ALL_STAGES):
        return numba_search.patchmatch(query, key, None, k, p, iters, "l2", None, 0, stages=stages)

    print(common.environment())
    what = "astronaut against coffee, RGB" if args.features == "photo" else "64-channel white noise against itself"
    print(
        f"\nnumba search profile: {what}, {args.size}², p = {p}, k = {k}, {args.iters} iterations, {threads} threads, median of {args.repeats}\n"
    )
    start = _median_time(lambda: search(0), args.repeats)
    rows = []
    for name, left_out in _VARIANTS:
        stages = kernels.ALL_STAGES
        for stage in left_out:
            stages &= ~getattr(kernels, stage)
        total = _median_time(lambda stages=stages: search(args.iters, stages), args.repeats)
        per = max(total - start, 0.0) / args.iters
        rows.append([name, f"{total * 1000:.1f}", f"{per * 1000:.1f}", f"{per * threads * 1e9 / pixels:.0f}"])
    print(f"set-up and random start (no iteration): {start * 1000:.1f} ms\n")
    print(common.markdown_table(["variant", "ms per call", "ms per iteration", "ns / pixel-iteration (core)"], rows))
    if args.quality_sample:
        from psal.bench.knn import _exact_sample

        pick, exact = _exact_sample(query, key, p, k, args.quality_sample)
        costs = search(args.iters)[1].flatten(2)[0][:, pick]
        ratio = (costs.double().mean(1) / exact.double().mean(1)).tolist()
        print(f"\nmean cost ratio to exact, per match ({pick.numel()} query pixels): " + " / ".join(f"{r:.3f}" for r in ratio))
    return 0
