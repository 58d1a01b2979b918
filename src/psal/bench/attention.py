"""Attention benchmark: PSAL forward + backward against full attention, in one run.

    python -m psal.bench attention --sizes 64 128 256 --repeats 3
    python -m psal.bench attention --device cuda --dtype bfloat16 --sizes 256 512 1024 2048

For each size S: query, key and value ``(1, C, S, S)`` drawn from a normal distribution (C = 64),
patch size p = 3, l2 costs, ``"center"`` aggregation; the loss is ``sum(out * g)`` for a fixed
random ``g``, and one step is its forward and backward (gradients for query, key and value).

- ``psal``: :func:`psal.ps_attention` (PatchMatch search with k = 4 and 5 iterations, then
  :func:`psal.attend`), backend ``"auto"``, with independent query, key and value.
- ``psal-qk``: the same with the query as the key (one tensor, as in
  ``PSALBlock(shared_query_key=True)``'s self-attention).
- ``conv3x3``: one 3x3 convolution C -> C (bias, zero padding) of the query, gradients for its
  input and weights: the cost of the layer a network would otherwise spend here. Where it runs,
  ``x conv3x3`` is each method's median over the convolution's, from the same run.
- ``full-flash``: :func:`psal.full_attention` with ``method="sdpa"``: PyTorch's fused (flash)
  kernel over patch vectors, the same semantics over all keys.
- ``full-chunked``: :func:`psal.full_attention` with ``method="chunked"``: dense scores in
  chunks, recomputed in the backward.
- ``sdpa``: plain ``scaled_dot_product_attention`` over the ``S * S`` pixels as tokens of
  dimension C (no patches): what a network would use instead of PSAL, flash attention on CUDA
  with float16/bfloat16 inputs. Default on CUDA, where ``full-chunked`` is left out.

``--device cuda`` puts the inputs on the GPU (PSAL then runs its Triton kernels), synchronises
around every timed phase and reports the caching allocator's peak over the inputs.

Every method runs in a fresh worker process, so that its peak memory (the rise of the resident-set
high-water mark over its size with the inputs loaded) is its own. PSAL makes one untimed call
first (numba loads its kernels; Triton compiles them); on CPU full attention has nothing to warm
up, and at 256² one call takes minutes, so its first call is timed; on CUDA every method gets one
untimed call. Calls repeat up to ``--repeats`` or ``--time-budget`` seconds; the median is
reported. ``vs sdpa`` (``vs full-flash`` where sdpa is not run) is that method's median over this
method's, from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from psal.bench import common

METHODS = ("psal", "psal-qk", "full-flash", "full-chunked", "sdpa", "conv3x3")
DEFAULT_METHODS = {"cpu": ("psal", "full-flash", "full-chunked", "conv3x3"), "cuda": ("psal", "sdpa", "full-flash", "conv3x3")}


def _inputs(size: int, channels: int, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    return [torch.randn(1, channels, size, size, generator=g).to(device=device, dtype=dt) for _ in range(4)]


def _sdpa(q, k, v):
    """Pixels as tokens: ``(1, C, H, W)`` -> ``(1, 1, H * W, C)``, attention, and back."""
    B, _, H, W = q.shape
    tokens = [t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*tokens)
    return out.squeeze(1).transpose(1, 2).reshape(B, v.shape[1], H, W)


def _step(method: str, args):
    """A function (query, key, value, grad) -> (forward s, backward s) for ``method``."""
    import psal

    gen = torch.Generator(device=args.device).manual_seed(0)
    conv = None
    if method == "conv3x3":
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1).to(device=args.device, dtype=getattr(torch, args.dtype))

    def forward(q, k, v):
        if method in ("psal", "psal-qk"):
            k = q if method == "psal-qk" else k
            return psal.ps_attention(q, k, v, patch_size=args.patch_size, num_neighbors=args.k, num_iters=args.iters, generator=gen)
        if conv is not None:
            return conv(q)
        if method == "sdpa":
            return _sdpa(q, k, v)
        how = "sdpa" if method == "full-flash" else "chunked"
        return psal.full_attention(q, k, v, patch_size=args.patch_size, method=how)

    def step(q, k, v, grad):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        common.sync(args.device)
        t0 = time.perf_counter()
        out = forward(q, k, v)
        common.sync(args.device)
        t1 = time.perf_counter()
        (out * grad).sum().backward()
        common.sync(args.device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return step


def worker(args) -> None:
    """Runs one method at one size; writes times and memory to ``args.out``."""
    q, k, v, grad = _inputs(args.size, args.channels, args.device, args.dtype)
    step = _step(args.method, args)
    first = None
    if args.method in ("psal", "psal-qk", "conv3x3") or args.device != "cpu":
        first = sum(step(q, k, v, grad))
    memory = common.PeakMemory(args.device)
    memory.start()
    times = []
    for _ in range(args.repeats):
        times.append(step(q, k, v, grad))
        if sum(f + b for f, b in times) > args.time_budget:
            break
    torch.save({"times": times, "first": first, "peak_kib": memory.peak_kib()}, args.out)


def _run_worker(method: str, size: int, args) -> dict | None:
    options = [
        "--repeats", str(args.repeats), "--patch-size", str(args.patch_size), "--k", str(args.k),
        "--iters", str(args.iters), "--channels", str(args.channels), "--time-budget", str(args.time_budget),
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    return common.run_worker("psal.bench.attention", method, size, options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="default: psal, full-flash, full-chunked, conv3x3 (CPU); psal, sdpa, full-flash, conv3x3 (CUDA)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (median reported)")
    ap.add_argument("--time-budget", type=float, default=120.0, help="stop repeating a method after this many seconds")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    common.add_worker_arguments(ap)
    args = common.parse_suite(ap, argv, worker, DEFAULT_METHODS)
    if args is None:
        return 0

    print(common.environment())
    print(
        f"\nattention forward + backward on {args.device}: query, key, value (1, {args.channels}, S, S) {args.dtype}, "
        f"p = {args.patch_size}, l2, center; PSAL k = {args.k}, {args.iters} iterations; median of up to "
        f"{args.repeats} steps\n",
        flush=True,
    )
    base = "sdpa" if "sdpa" in args.methods else "full-flash"  # the competitor the ratios are against
    header = ["size", "method", "fwd+bwd s", "forward s", "backward s", "steps", "peak MiB", f"vs {base} (time)", f"memory / {base}"]
    if "conv3x3" in args.methods:
        header.append("x conv3x3")
    rows, records = [], []
    for size in args.sizes:
        results = {m: r for m in args.methods if (r := _run_worker(m, size, args)) is not None}
        flash = results.get(base)
        flash_med = statistics.median(f + b for f, b in flash["times"]) if flash else float("nan")
        conv = results.get("conv3x3")
        conv_med = statistics.median(f + b for f, b in conv["times"]) if conv else float("nan")
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
            ] + ([f"{med / conv_med:.1f}x"] if "conv3x3" in args.methods else []))  # fmt: skip
            records.append({
                "size": size, "method": method, "times_s": res["times"], "median_s": med, "first_call_s": res["first"],
                "peak_mib": mem,
            })  # fmt: skip
            print(f"  {size}² {method}: {med:.3f} s, {mem:.0f} MiB", file=sys.stderr, flush=True)
    print(common.markdown_table(header, rows))
    common.write_json(args.json, args, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
