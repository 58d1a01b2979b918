"""Attention benchmark: PSAL forward + backward against full attention, in one run.

    python -m psal.bench attention --sizes 64 128 256 --repeats 3

For each size S: query, key and value ``(1, C, S, S)`` drawn from a normal distribution (C = 64),
patch size p = 3, l2 costs, ``"center"`` aggregation; the loss is ``sum(out * g)`` for a fixed
random ``g``, and one step is its forward and backward (gradients for query, key and value).

- ``psal``: :func:`psal.ps_attention` (PatchMatch search with k = 4 and 5 iterations, then
  :func:`psal.attend`), backend ``"auto"``.
- ``full-flash``: :func:`psal.full_attention` with ``method="sdpa"``: PyTorch's fused (flash)
  kernel over patch vectors, the same semantics over all keys.
- ``full-chunked``: :func:`psal.full_attention` with ``method="chunked"``: dense scores in
  chunks, recomputed in the backward.

Every method runs in a fresh worker process, so that its peak memory (the rise of the resident-set
high-water mark over its size with the inputs loaded) is its own. PSAL makes one untimed call
first (numba loads its kernels); full attention has nothing to warm up, and at 256² one call takes
minutes, so its first call is timed. Calls repeat up to ``--repeats`` or ``--time-budget``
seconds; the median is reported. ``vs flash`` is the flash method's median over this method's,
from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from psal.bench import common

METHODS = ("psal", "full-flash", "full-chunked")


def _inputs(size: int, channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, channels, size, size, generator=g) for _ in range(4))
    return q, k, v, grad


def _step(method: str, args):
    """A function (query, key, value, grad) -> (forward s, backward s) for ``method``."""
    import psal

    gen = torch.Generator().manual_seed(0)

    def forward(q, k, v):
        if method == "psal":
            return psal.ps_attention(
                q, k, v, patch_size=args.patch_size, num_neighbors=args.k, num_iters=args.iters, generator=gen
            )
        how = "sdpa" if method == "full-flash" else "chunked"
        return psal.full_attention(q, k, v, patch_size=args.patch_size, method=how)

    def step(q, k, v, grad):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        out = forward(q, k, v)
        t1 = time.perf_counter()
        (out * grad).sum().backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return step


def worker(args) -> None:
    """Runs one method at one size; writes times and memory to ``args.out``."""
    q, k, v, grad = _inputs(args.size, args.channels)
    step = _step(args.method, args)
    first = None
    if args.method == "psal":
        t0 = time.perf_counter()
        step(q, k, v, grad)
        first = time.perf_counter() - t0
    rest = common.rss_kib()
    common.reset_peak()
    times = []
    for _ in range(args.repeats):
        times.append(step(q, k, v, grad))
        if sum(f + b for f, b in times) > args.time_budget:
            break
    peak = common.peak_kib() - rest
    torch.save({"times": times, "first": first, "peak_kib": peak}, args.out)


def _run_worker(method: str, size: int, args) -> dict | None:
    options = [
        "--repeats", str(args.repeats), "--patch-size", str(args.patch_size), "--k", str(args.k),
        "--iters", str(args.iters), "--channels", str(args.channels), "--time-budget", str(args.time_budget),
    ]  # fmt: skip
    return common.run_worker("psal.bench.attention", method, size, options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (median reported)")
    ap.add_argument("--time-budget", type=float, default=120.0, help="stop repeating a method after this many seconds")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    common.add_worker_arguments(ap)
    args = ap.parse_args(argv)
    if args.worker:
        args.method = args.worker
        worker(args)
        return 0

    print(common.environment())
    print(
        f"\nattention forward + backward: query, key, value (1, {args.channels}, S, S), p = {args.patch_size}, "
        f"l2, center; PSAL k = {args.k}, {args.iters} iterations; median of up to {args.repeats} steps\n",
        flush=True,
    )
    header = ["size", "method", "fwd+bwd s", "forward s", "backward s", "steps", "peak MiB", "vs flash (time)", "memory / flash"]
    rows, records = [], []
    for size in args.sizes:
        results = {m: r for m in args.methods if (r := _run_worker(m, size, args)) is not None}
        flash = results.get("full-flash")
        flash_med = statistics.median(f + b for f, b in flash["times"]) if flash else float("nan")
        for method, res in results.items():
            total = [f + b for f, b in res["times"]]
            med = statistics.median(total)
            fwd = statistics.median(f for f, _ in res["times"])
            bwd = statistics.median(b for _, b in res["times"])
            mem = res["peak_kib"] / 1024
            mem_ratio = mem / (flash["peak_kib"] / 1024) if flash else float("nan")
            rows.append([
                f"{size}²", method, f"{med:.3f}", f"{fwd:.3f}", f"{bwd:.3f}", len(total), f"{mem:.0f}",
                f"{flash_med / med:.1f}x", f"{mem_ratio:.2f}",
            ])  # fmt: skip
            records.append({
                "size": size, "method": method, "times_s": res["times"], "median_s": med, "first_call_s": res["first"],
                "peak_mib": mem,
            })  # fmt: skip
            print(f"  {size}² {method}: {med:.3f} s, {mem:.0f} MiB", file=sys.stderr, flush=True)
    print(common.markdown_table(header, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": common.environment_dict(), "args": vars(args), "results": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
