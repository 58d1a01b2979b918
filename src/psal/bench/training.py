"""Peak memory and time of one training step of the inpainting models, by input size.

    python -m psal.bench training [--sizes 128 256 512] [--models psal conv full] [--device cpu]

Each (model, size) runs in a fresh process: one warm-up step at 32x32 (numba loads its kernels),
then ``--repeats`` steps (forward, L1 loss in the hole, backward, Adam) on a batch of one
``size x size`` image with a hole of a quarter of its area. Memory: on CPU, the process's peak
resident memory during the measured steps (``VmHWM``, reset through ``/proc/self/clear_refs``
before them) minus its resident memory just before them; on CUDA,
the allocator's peak over what was allocated before them. A process that fails to allocate
(``--memory-limit`` caps its address space on CPU, so that a model that does not fit fails
alone instead of swapping the machine) or runs past ``--timeout`` seconds is reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from psal.bench import common


def child(mixer: str, size: int, device: str, repeats: int, width: int) -> dict:
    from psal.apps.inpaint_net import InpaintNet, hole_l1

    dev = torch.device(device)
    torch.manual_seed(0)
    if mixer == "naive":  # the full-attention model with its softmax matrix materialised
        model = InpaintNet("full", width=width, full_method="naive").to(dev)
    else:
        model = InpaintNet(mixer, width=width).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(s):
        x = torch.rand(1, 3, s, s, device=dev)
        hole = torch.zeros(1, 1, s, s, dtype=torch.bool, device=dev)
        hole[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = True
        loss = hole_l1(model(x, hole), x, hole)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.sync(str(dev))

    step(32)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        common.reset_peak()  # else the peak of the imports and the warm-up would count
        base = common.rss_kib() * 1024
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(size)
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = common.peak_kib() * 1024 - base
    times.sort()
    return {"peak_bytes": peak, "seconds": times[len(times) // 2]}


def measure(mixer, size, args) -> dict:
    cmd = [sys.executable, "-m", "psal.bench.training", "--child", mixer, str(size), "--device", args.device,
           "--repeats", str(args.repeats), "--width", str(args.width)]  # fmt: skip
    limit = None if args.device != "cpu" else int(args.memory_limit * 2**30)

    def cap():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        if any(s in done.stderr for s in ("can't allocate memory", "out of memory", "MemoryError", "std::bad_alloc")):
            return {"error": "out of memory" + (f" (> {args.memory_limit:g} GiB)" if limit else "")}
        if done.returncode < 0:
            return {"error": f"killed by signal {-done.returncode}"}
        return {"error": tail[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m psal.bench training", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["psal", "conv", "full", "naive"],
        choices=["psal", "conv", "full", "naive"],
        help="naive: the full-attention model with its softmax matrix materialised (as non-local blocks do)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="measured steps; the median time is reported")
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per (model, size)")
    ap.add_argument("--memory-limit", type=float, default=16, help="GiB of address space per process on CPU")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, args.repeats, args.width)))
        return 0

    print(common.environment())
    print(f"one training step, batch 1, width {args.width}, device {args.device}\n", flush=True)
    rows, results = [], {}
    for size in args.sizes:
        for mixer in args.models:
            r = measure(mixer, size, args)
            results[f"{mixer}@{size}"] = r
            if "error" in r:
                rows.append([f"{size}²", mixer, r["error"], "", ""])
            else:
                ref = results.get(f"psal@{size}", {})
                ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.1f}×" if ref.get("peak_bytes") else ""
                rows.append([f"{size}²", mixer, f"{r['peak_bytes'] / 2**20:.0f}", ratio, f"{r['seconds']:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(common.markdown_table(["input", "model", "peak MiB", "vs psal", "s / step"], rows))
    common.write_json(args.json, args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
