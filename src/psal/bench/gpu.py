"""The GPU check: one command that proves and times the Triton backend on a GPU.

    python -m psal.bench gpu OUT_DIR                 # on a CUDA machine (make gpu-check)
    python -m psal.bench gpu OUT_DIR --dry-run       # anywhere: tiny sizes, CPU, no tests

It runs from the checkout (``PYTHONPATH=src``), needs nothing beyond torch, triton, pillow and
(for the tests) pytest and hypothesis, and writes ``OUT_DIR/gpu_check.json`` (rewritten after every
section, so a run cut short keeps what it measured) and ``OUT_DIR/gpu_check.md`` (the tables it
prints last). Sections, in the order they run:

- ``tests``: the CUDA test selection (the contract suite's CUDA cases and the Triton test files),
  in a subprocess, in parallel with pytest-xdist where it is installed; log in ``tests.log``.
- ``search``: 512² RGB, p = 7, k = 3, 1/2/5/10 iterations: median time and the mean cost of the
  interior pixels (per patch value, as the authors' harness reports it) against the exact k-NN.
- ``layer``: :class:`psal.PSAttention` forward + backward (C = 64, p = 3, k = 4, 5 iterations,
  bf16) at 128² ... 4096², beside ``scaled_dot_product_attention`` with the flash and cuDNN
  backends (bf16, one head, d = 64) on the same features, with peak memory. Sizes above
  ``--sdpa-max`` are extrapolated for SDPA from the largest measured one (time as N², memory
  as N) and marked so.
- ``precision``: float16/bfloat16 errors (output and every gradient) of the Triton backend against
  float64, next to plain PyTorch computing in the same precision.
- ``race``: 100 backward passes: the atomic path stays within tolerance, the deterministic path
  (``torch.use_deterministic_algorithms(True)``) is bitwise equal every time.
- ``peer``: the authors' CUDA extension (github.com/ncherel/psal) on the same inputs, when
  ``--peer DIR`` (default ``peers/ncherel-psal``, a git-ignored copy) holds it: its harness
  ``bench_ncherel.py`` JIT-builds it (in the background, from the start of the run); its search
  and its ``PSAttention`` are then timed here, in the same way as ours, and its costs are checked
  against ``psal.patch_costs``.
- ``tune``: tile shapes and warps of the hot kernels, timed (``--tune``).

Features for the search are the authors' two test images when the peer folder is there (the
harness's inputs), else scikit-image's astronaut and coffee; the layer's features are a fixed
random 3 -> 64 convolution of the same images, resized.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from psal.bench import common

SECTIONS = ("tests", "search", "layer", "precision", "race", "peer", "tune")
# The CUDA test selection: the contract suite's "-cuda" cases and the Triton backend's own files
# (which run on CUDA tensors whenever a GPU is present).
TEST_FILES = (
    "tests/test_triton_search.py",
    "tests/test_triton_attend.py",
    "tests/test_search_properties.py",
    "tests/test_attend.py",
    "tests/test_determinism.py",
    "tests/test_full_attention.py",
    "tests/test_modules.py",
    "tests/test_compile.py",
    "tests/test_sparse.py",
)
TEST_SELECTION = "cuda or test_triton_search or test_triton_attend"
PEER_BUILD = os.environ.get("NCHEREL_BUILD", "/tmp/ncherel_build")


# ----------------------------------------------------------------------------------------------
# Helpers.


class Run:
    """The state of one check: options, device, deadline, results (saved after each section)."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.results: dict = {"environment": common.environment_dict(), "args": vars(args), "sections": {}}
        self.tables: list[str] = []
        self.peer_build = None

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        from psal.images import write_json

        write_json(self.out / "gpu_check.json", self.results)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def time_ms(fn, device: torch.device, warmup: int = 1, repeats: int = 10, budget_s: float = 10.0) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` over up to ``repeats`` calls (fewer once ``budget_s`` is
    spent, at least one) after ``warmup`` untimed calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    common.sync(str(device))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory of one call of ``fn`` over what was allocated before it, MiB."""
    memory = common.PeakMemory(str(device))
    memory.start()
    fn()
    return memory.peak_kib() / 1024


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


# ----------------------------------------------------------------------------------------------
# Inputs.


def _peer_dir(args) -> Path | None:
    d = Path(args.peer).resolve() if args.peer else None
    return d if d is not None and (d / "bench_ncherel.py").is_file() and (d / "src").is_dir() else None


def _read_rgb(path: Path, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous()


def images(run: Run, size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Query and key pictures ``(1, 3, size, size)`` in ``[0, 1]`` on the CPU, and their names."""
    peer = _peer_dir(run.args)
    if peer is not None and (peer / "data" / "img2_512.png").is_file():
        q = _read_rgb(peer / "data" / "img2_512.png", size)
        k = _read_rgb(peer / "data" / "img1_512.png", size)
        return q, k, "ncherel-psal data/img2_512.png (query), img1_512.png (key)"
    from psal.images import load_bundled

    return load_bundled("astronaut", size), load_bundled("coffee", size), "scikit-image astronaut (query), coffee (key)"


def features(run: Run, size: int, channels: int, dtype: torch.dtype):
    """Coherent features ``(1, channels, size, size)``: a fixed random 3 x 3 convolution of the
    pictures resized to ``size``, on the run's device."""
    q, k, _ = images(run, 512 if not run.args.dry_run else 32)
    w = torch.randn(channels, 3, 3, 3, generator=torch.Generator().manual_seed(0)) / 3
    out = []
    for x in (q, k):
        x = F.interpolate(x.to(run.device), size=(size, size), mode="bilinear", align_corners=False)
        out.append(F.conv2d(x, w.to(run.device), padding=1).to(dtype).contiguous())
    return out


# ----------------------------------------------------------------------------------------------
# Sections.


def section_tests(run: Run) -> dict:
    args = run.args
    log = run.out / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", TEST_SELECTION, *TEST_FILES]
    if args.dry_run:
        cmd.append("--collect-only")
    else:
        if importlib.util.find_spec("xdist") is not None and args.test_workers > 1:
            cmd += ["-n", str(args.test_workers)]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "300"]
        cmd += ["-rfE", "--durations=15"]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    root = Path(__file__).resolve().parents[3]
    limit = max(30.0, min(args.test_timeout, run.left() - 60))
    run.log(f"tests: {' '.join(cmd[1:])} (limit {limit:.0f} s)")
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    lines = log.read_text().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln or "collected" in ln or "tests collected" in ln), lines[-1] if lines else "")
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    res = {"command": " ".join(cmd[1:]), "exit": code, "seconds": round(seconds, 1), "summary": summary.strip("= "), "failures": failures[:60]}
    run.tables.append(f"**Tests** (CUDA selection, {seconds:.0f} s, exit {code}): {res['summary']}" + "".join(f"\n- {f}" for f in failures[:20]))
    return res


def _interior_mean(costs: torch.Tensor, p: int, C: int) -> tuple[float, float]:
    """(best, mean over k) of the costs ``(..., k, H, W)`` of the pixels whose patch lies inside
    the map, per patch value (divided by ``p * p * C``), as the authors' harness reports them."""
    r = p // 2
    c = costs.reshape(-1, *costs.shape[-3:])[0].double()
    c = c[:, r : c.shape[1] - r, r : c.shape[2] - r] / (p * p * C)
    return float(c[0].mean()), float(c.mean())


def section_search(run: Run) -> dict:
    import psal

    args = run.args
    S, p, K = args.search_size, 7, 3
    q, k, source = images(run, S)
    q, k = q.to(run.device), k.to(run.device)
    res = {"inputs": source, "size": S, "patch_size": p, "k": K, "runs": []}
    t = time.perf_counter()
    exact = psal.exact_knn(q, k, patch_size=p, num_neighbors=K)
    common.sync(str(run.device))
    res["exact_seconds"] = time.perf_counter() - t
    res["exact_best"], res["exact_mean"] = _interior_mean(exact.costs, p, 3)
    rows = [["exact (brute force)", "–", _fmt(res["exact_seconds"] * 1e3, 4), _fmt(res["exact_best"], 4), _fmt(res["exact_mean"], 4), "1.000"]]
    for iters in args.search_iters:
        g = torch.Generator().manual_seed(0)

        def call():
            return psal.patchmatch(q, k, patch_size=p, num_neighbors=K, num_iters=iters, generator=g)

        field = call()
        best, mean = _interior_mean(field.costs, p, 3)
        ms, n = time_ms(call, run.device, warmup=1, repeats=args.repeats)
        res["runs"].append({"iters": iters, "ms": ms, "repeats": n, "best": best, "mean": mean, "ratio": mean / res["exact_mean"]})
        rows.append([f"psal ({_backend_name(run)})", iters, _fmt(ms, 4), _fmt(best, 4), _fmt(mean, 4), f"{mean / res['exact_mean']:.3f}"])
    run.tables.append(
        f"**Search**, {S}² RGB, p = {p}, k = {K} ({source}); cost: mean over the interior pixels, per patch value\n\n"
        + common.markdown_table(["method", "iterations", "median ms", "best cost", "mean cost (k)", "mean / exact"], rows)
    )
    return res


def _backend_name(run: Run) -> str:
    return "triton" if run.cuda else "numba"


def _sdpa_step(qt, kt, vt, gt, backend):
    from torch.nn.attention import sdpa_kernel

    def step():
        for x in (qt, kt, vt):
            x.grad = None
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qt, kt, vt)
        out.backward(gt)

    return step


def section_layer(run: Run) -> dict:
    import psal
    from torch.nn.attention import SDPBackend

    args = run.args
    dtype = getattr(torch, args.layer_dtype)
    C, p, K, iters = 64, 3, 4, 5
    layer = psal.PSAttention(patch_size=p, num_neighbors=K, num_iters=iters, seed=0)
    res = {"channels": C, "patch_size": p, "k": K, "iters": iters, "dtype": args.layer_dtype, "sizes": {}}
    sdpa_backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    last_measured: dict = {}
    for S in args.layer_sizes:
        if run.left() < 20:
            res["sizes"][S] = {"skipped": "out of time"}
            continue
        row: dict = {}
        res["sizes"][S] = row
        try:
            fq, fk = features(run, S, C, dtype)
            g = torch.randn(fq.shape, generator=torch.Generator().manual_seed(1)).to(run.device, dtype)
            q, k, v = (t.clone().requires_grad_() for t in (fq, fk, fk))

            def step():
                for x in (q, k, v):
                    x.grad = None
                layer(q, k, v).backward(g)

            big = S >= 2048
            row["psal_ms"], row["psal_repeats"] = time_ms(step, run.device, 1, 2 if big else args.repeats, budget_s=15)
            row["psal_peak_mib"] = peak_mib(step, run.device)
            del q, k, v
        except torch.cuda.OutOfMemoryError as exc:
            row["psal_error"] = "out of memory: " + _error_line(exc)[:200]
        except Exception as exc:  # noqa: BLE001 - the check reports and goes on
            row["psal_error"] = _error_line(exc)
        _free(run)
        for name, be in sdpa_backends.items():
            if S > args.sdpa_max:
                if name in last_measured:
                    S0, ms0, mib0 = last_measured[name]
                    row[f"{name}_ms"] = ms0 * (S / S0) ** 4
                    row[f"{name}_peak_mib"] = mib0 * (S / S0) ** 2
                    row[f"{name}_extrapolated_from"] = S0
                continue
            try:
                tok = [t.flatten(2).transpose(1, 2)[:, None].contiguous() for t in (fq, fk, fk, g)]
                qt, kt, vt = (t.clone().requires_grad_() for t in tok[:3])
                step = _sdpa_step(qt, kt, vt, tok[3], be)
                ms, n = time_ms(step, run.device, 1, args.repeats if S <= 512 else 2, budget_s=15)
                mib = peak_mib(step, run.device)
                row[f"{name}_ms"], row[f"{name}_repeats"], row[f"{name}_peak_mib"] = ms, n, mib
                last_measured[name] = (S, ms, mib)
                del qt, kt, vt, tok
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = _error_line(exc)
            _free(run)
        del fq, fk, g
        _free(run)
        run.log(f"layer {S}²: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})}")
        run.save()
    rows = []
    for S, row in res["sizes"].items():
        if "skipped" in row:
            rows.append([f"{S}²", "skipped (out of time)"] + [""] * 6)
            continue
        sd = [(row[f"{n}_ms"], n) for n in sdpa_backends if f"{n}_ms" in row]
        best = min(sd) if sd else None
        ext = any(f"{n}_extrapolated_from" in row for n in sdpa_backends)
        mark = " (extrapolated)" if ext else ""
        ratio = best[0] / row["psal_ms"] if best and "psal_ms" in row else None
        row["speedup_vs_best_sdpa"] = ratio
        rows.append([
            f"{S}²",
            _fmt(row.get("psal_ms"), 4) if "psal_ms" in row else row.get("psal_error", "–")[:60],
            _fmt(row.get("psal_peak_mib"), 4),
            (_fmt(row.get("flash_ms"), 4) + mark) if "flash_ms" in row else row.get("flash_error", "–")[:40],
            (_fmt(row.get("cudnn_ms"), 4) + mark) if "cudnn_ms" in row else row.get("cudnn_error", "–")[:40],
            _fmt(min(row.get(f"{n}_peak_mib", math.inf) for n in sdpa_backends), 4) + mark if sd else "–",
            (f"{ratio:.1f}x" + mark) if ratio else "–",
        ])  # fmt: skip
    run.tables.append(
        f"**Layer forward + backward**, C = {C}, p = {p}, k = {K}, {iters} iterations, {args.layer_dtype}; SDPA: one head, "
        f"d = {C}, the same features as {args.layer_dtype} tokens; median ms; peak = allocator peak over the inputs\n\n"
        + common.markdown_table(["size", "psal ms", "psal peak MiB", "SDPA flash ms", "SDPA cuDNN ms", "SDPA peak MiB", "psal vs faster SDPA"], rows)
    )
    return res


def _free(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def plain_torch_precision():
    """The pure-PyTorch backend computing in the inputs' own dtype, as plain PyTorch code would
    (instead of float32 for float16/bfloat16 inputs)."""
    from psal.backends.torch import attend, search

    saved = search.compute_dtype, attend.compute_dtype
    search.compute_dtype = attend.compute_dtype = lambda dtype: dtype
    try:
        yield
    finally:
        search.compute_dtype, attend.compute_dtype = saved


def _grads(q, k, v, idx, grad, T, backend, aggregation, p):
    import psal

    args = [t.detach().requires_grad_() for t in (q, k, v)]
    temp = torch.tensor(T, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device, requires_grad=True)
    out = psal.attend(*args, idx, patch_size=p, temperature=temp, aggregation=aggregation, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, (*args, temp), grad)]


def section_precision(run: Run) -> dict:
    import psal

    S, C, K, p = run.args.precision_size, 64, 4, 3
    g = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(1, C, S, S, generator=g) * 0.25 for _ in range(4))
    field = psal.patchmatch(q.to(run.device), k.to(run.device), patch_size=p, num_neighbors=K, generator=torch.Generator().manual_seed(0))
    idx = field.indices
    # A temperature of the order of the spread of the costs: the softmax is not saturated.
    T = float(field.costs.std().clamp_min(1e-3))
    names = ["out", "query", "key", "value", "temperature"]
    res = {"size": S, "channels": C, "k": K, "patch_size": p, "temperature": T, "cases": []}
    rows = []
    backend = "triton" if run.cuda else "numba"
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype).to(run.device) for t in (q, k, v, grad)]
        for aggregation in ("center", "patch"):
            exact = _grads(*(t.double() for t in low[:3]), idx, low[3].double(), T, "torch", aggregation, p)
            ours = _grads(*low[:3], idx, low[3], T, backend, aggregation, p)
            with plain_torch_precision():
                plain = _grads(*low[:3], idx, low[3], T, "torch", aggregation, p)
            for name, a, b, e in zip(names, ours, plain, exact):
                scale = float(e.abs().max()) or 1.0
                err_ours = float((a.double() - e).abs().max()) / scale
                err_plain = float((b.double() - e).abs().max()) / scale
                ratio = err_ours / err_plain if err_plain > 0 else (0.0 if err_ours == 0 else math.inf)
                res["cases"].append({"dtype": str(dtype).split(".")[1], "aggregation": aggregation, "tensor": name, "ours": err_ours, "plain": err_plain, "ratio": ratio})
                rows.append([str(dtype).split(".")[1], aggregation, name, f"{err_ours:.2e}", f"{err_plain:.2e}", f"{ratio:.2f}"])
    worst = max(c["ratio"] for c in res["cases"])
    res["worst_ratio"] = worst
    run.tables.append(
        f"**Half precision** ({backend} vs plain PyTorch in the same dtype), {S}², C = {C}, k = {K}, p = {p}: "
        f"max |error| against float64 over max |float64|; worst ratio {worst:.2f} (goal ≤ 2)\n\n"
        + common.markdown_table(["dtype", "aggregation", "tensor", f"{backend} error", "plain torch error", "ratio"], rows)
    )
    return res


def section_race(run: Run) -> dict:
    import psal

    S, C, K, p, n = run.args.race_size, 64, 4, 3, run.args.race_repeats
    fq, fk = features(run, S, C, torch.float32)
    field = psal.patchmatch(fq, fk, patch_size=p, num_neighbors=K, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(fq.shape, generator=g).to(run.device)
    # Besides the search's field, one where every query matches among three key positions: the
    # most writes per key-gradient entry.
    collide = (torch.randint(0, 3, field.indices.shape, generator=g) * 7).to(run.device)
    backend = "triton" if run.cuda else "numba"
    res = {"size": S, "channels": C, "k": K, "repeats": n, "fields": {}}
    rows = []
    for fname, idx in (("search", field.indices), ("3 keys", collide)):
        for aggregation in ("center", "patch"):
            exact = _grads(fq.double(), fk.double(), fk.double(), idx, grad.double(), 1.0, "torch", aggregation, p)
            scale = [float(e.abs().max()) or 1.0 for e in exact]
            # The float32 pure-PyTorch backend's error: the problem's own float32 conditioning.
            base = [float((a.double() - e).abs().max()) / s for a, e, s in zip(_grads(fq, fk, fk, idx, grad, 1.0, "torch", aggregation, p), exact, scale)]
            first = _grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
            spread = [0.0] * 5
            for _ in range(n - 1):
                again = _grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                spread = [max(s, float((a - b).abs().max())) for s, a, b in zip(spread, again, first)]
            err = [float((a.double() - e).abs().max()) / s for a, e, s in zip(first, exact, scale)]
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                det0 = _grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                equal = 1
                for _ in range(n - 1):
                    det = _grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                    equal += all(torch.equal(a, b) for a, b in zip(det, det0))
            finally:
                torch.use_deterministic_algorithms(before)
            det_err = [float((a.double() - e).abs().max()) / s for a, e, s in zip(det0, exact, scale)]
            rel_spread = max(d / s for d, s in zip(spread[:4], scale))
            # Within tolerance: each run's error at most twice the float32 reference backend's (plus
            # float32 rounding of the largest value), in both paths; the deterministic one bitwise.
            within = all(e <= 2 * b + 1e-6 for e, b in zip(err[:4] + det_err[:4], base[:4] * 2))
            ok = within and rel_spread <= 2 * max(base[:4]) + 1e-6 and equal == n
            res["fields"][f"{fname}/{aggregation}"] = {
                "atomic_max_spread_rel": rel_spread, "atomic_error_rel": err, "torch_float32_error_rel": base, "deterministic_equal": equal,
                "deterministic_error_rel": det_err, "ok": ok,
            }  # fmt: skip
            rows.append([fname, aggregation, f"{rel_spread:.1e}", f"{max(err[:4]):.1e}", f"{equal}/{n}", f"{max(det_err[:4]):.1e}", f"{max(base[:4]):.1e}", "yes" if ok else "NO"])
    run.tables.append(
        f"**Repeated backward** ({backend}), {S}², C = {C}, k = {K}, p = {p}, {n} passes each; errors relative to the float64 "
        "gradients' largest value (query, key, value)\n\n"
        + common.markdown_table(["field", "aggregation", "atomic: max spread", "atomic: error", "deterministic: bitwise equal", "deterministic: error", "torch float32 error", "ok"], rows)
    )
    return res


# ----------------------------------------------------------------------------------------------
# The authors' CUDA extension.


def start_peer_build(run: Run) -> None:
    peer = _peer_dir(run.args)
    if peer is None or not run.cuda or "peer" not in run.args.sections:
        return
    log = open(run.out / "peer_build.log", "w")
    cmd = [sys.executable, str(peer / "bench_ncherel.py"), str(peer), str(run.out / "peer_build.json"), "--build-only"]
    run.log("peer: building the authors' extension in the background")
    run.peer_build = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=peer), log)


def _load_peer(run: Run):
    """The built extension (``patchmatch``, ``backward``) and the authors' ``PSAttention`` class,
    wired as the harness wires them."""
    proc, log = run.peer_build
    proc.wait(timeout=max(10.0, run.left() - 30))
    log.close()
    so = next(Path(PEER_BUILD, "b_ncherel_patchmatch").glob("ncherel_patchmatch*.so"), None)
    if proc.returncode != 0 or so is None:
        tail = (run.out / "peer_build.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"the peer's build failed (exit {proc.returncode}): {' | '.join(tail)}")
    loader = importlib.machinery.ExtensionFileLoader("ncherel_patchmatch", str(so))
    spec = importlib.util.spec_from_file_location("ncherel_patchmatch", str(so), loader=loader)
    pm = importlib.util.module_from_spec(spec)
    loader.exec_module(pm)
    pkg_dir = Path(PEER_BUILD, "ncherel_psal")
    pkg = types.ModuleType("ncherel_psal")
    pkg.__path__ = [str(pkg_dir)]
    masked = types.ModuleType("ncherel_psal.patchmatch_masked")
    masked.patchmatch_masked = masked.backward_masked = None
    sys.modules.update({"ncherel_psal": pkg, "ncherel_psal.patchmatch": pm, "ncherel_psal.patchmatch_masked": masked})
    spec = importlib.util.spec_from_file_location("ncherel_psal.psal_attention", str(pkg_dir / "psal_attention.py"))
    pa = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pa
    spec.loader.exec_module(pa)
    return pm, pa


def section_peer(run: Run) -> dict:
    import psal

    if _peer_dir(run.args) is None:
        return {"skipped": f"no peer folder at {run.args.peer!r} (copy ../shared/peers/ncherel-psal there)"}
    if not run.cuda:
        return {"skipped": "the authors' extension is CUDA only"}
    pm, pa = _load_peer(run)
    res: dict = {"search": [], "layer": {}}
    build = run.out / "peer_build.json"
    if build.is_file():
        res["build"] = json.loads(build.read_text())
    # Search: the harness's inputs and metric (interior pixels, per patch value).
    S, p = 512, 7
    q, k, _ = images(run, S)
    A, B = q[0].to(run.device).contiguous(), k[0].to(run.device).contiguous()
    rows = []
    ours = {r["iters"]: r for r in run.results["sections"].get("search", {}).get("runs", [])}
    exact_mean = run.results["sections"].get("search", {}).get("exact_mean")
    r = p // 2
    for iters in run.args.search_iters:
        shift, cost = pm.patchmatch(A, B, p, iters)
        ms, n = time_ms(lambda: pm.patchmatch(A, B, p, iters), run.device, warmup=2, repeats=run.args.repeats)
        best, mean = _interior_mean(cost[None], p, 3)
        # Their field through our oracle: the interior costs must be theirs (true patch SSDs).
        idx = (shift[0].long() * S + shift[1].long())[None, None]  # (1, 1, 3, H, W)
        again = psal.patch_costs(q.to(run.device), k.to(run.device), idx, patch_size=p)[0, 0]
        inner = (slice(None), slice(r, S - r), slice(r, S - r))
        mismatch = float(((again[inner] - cost[inner]).abs() / again[inner].abs().clamp_min(1e-3)).max())
        entry = {"iters": iters, "ms": ms, "repeats": n, "best": best, "mean": mean, "cost_check_max_rel": mismatch}
        if exact_mean:
            entry["ratio"] = mean / exact_mean
        res["search"].append(entry)
        mine = ours.get(iters)
        rows.append([
            iters, _fmt(ms, 4), _fmt(mean, 4), _fmt(entry.get("ratio"), 4), f"{mismatch:.1e}",
            _fmt(mine["ms"], 4) if mine else "–", _fmt(mine["mean"], 4) if mine else "–",
            f"{ms / mine['ms']:.1f}x" if mine else "–",
        ])  # fmt: skip
    run.tables.append(
        f"**The authors' CUDA search** (ncherel/psal, k = 3 fixed), {S}² RGB, p = {p}, the same inputs and metric; "
        "cost check: their interior costs against psal.patch_costs of their field\n\n"
        + common.markdown_table(["iterations", "peer ms", "peer mean cost", "peer / exact", "cost check", "psal ms", "psal mean cost", "psal speed-up"], rows)
    )
    # Layer: their PSAttention (k = 3, float32 only, loops over the batch) against ours, float32.
    rows = []
    C = 64
    for S in run.args.peer_layer_sizes:
        if run.left() < 20:
            break
        fq, fk = features(run, S, C, torch.float32)
        g = torch.randn(fq.shape, generator=torch.Generator().manual_seed(1)).to(run.device)
        row = {}
        for name, att in (
            ("peer", pa.PSAttention(patch_size=3, n_iters=5, aggregation=False)),
            ("psal", psal.PSAttention(patch_size=3, num_neighbors=3, num_iters=5, seed=0)),
        ):
            q, k, v = (t.clone().requires_grad_() for t in (fq, fk, fk))

            def step():
                for x in (q, k, v):
                    x.grad = None
                att(q, k, v).backward(g)

            try:
                row[f"{name}_ms"], _ = time_ms(step, run.device, 1, run.args.repeats if S <= 512 else 3, budget_s=15)
                row[f"{name}_peak_mib"] = peak_mib(step, run.device)
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = _error_line(exc)
            del q, k, v
            _free(run)
        res["layer"][S] = row
        rows.append([
            f"{S}²", _fmt(row.get("peer_ms"), 4) if "peer_ms" in row else row.get("peer_error", "–")[:60], _fmt(row.get("peer_peak_mib"), 4),
            _fmt(row.get("psal_ms"), 4) if "psal_ms" in row else row.get("psal_error", "–")[:60], _fmt(row.get("psal_peak_mib"), 4),
            f"{row['peer_ms'] / row['psal_ms']:.1f}x" if "peer_ms" in row and "psal_ms" in row else "–",
        ])  # fmt: skip
        run.save()
    run.tables.append(
        "**The authors' PSAttention against ours**, forward + backward, float32, C = 64, p = 3, k = 3, 5 iterations, center\n\n"
        + common.markdown_table(["size", "peer ms", "peer peak MiB", "psal ms", "psal peak MiB", "psal speed-up"], rows)
    )
    return res


# ----------------------------------------------------------------------------------------------
# Tuning.

SEARCH_CONFIGS = (
    (32, 16, 4), (16, 16, 2), (16, 16, 1), (16, 64, 2), (16, 64, 4), (32, 64, 4), (64, 64, 8),
    (16, 128, 4), (8, 128, 2), (16, 256, 4), (8, 256, 4), (32, 256, 8),
)  # fmt: skip
ATTEND_CONFIGS = ((16, 64, 16), (32, 64, 8), (64, 32, 8))


def section_tune(run: Run) -> dict:
    """Times the search's tile shapes on its two typical problems (an RGB patch of 147 values; a
    64-channel 3 x 3 patch of 576) and keeps, for the sections that follow, the fastest of each
    class (``triton_search._GPU_SMALL`` / ``_GPU_LARGE``); then a few attention tile shapes."""
    import psal
    from psal.backends.triton import attend as triton_attend, search as triton_search

    if not run.cuda:
        return {"skipped": "tile shapes are tuned on a GPU"}
    res: dict = {"search": [], "attend": []}
    q, k, _ = images(run, 512)
    q, k = q.to(run.device), k.to(run.device)
    f64 = features(run, 512, 64, torch.bfloat16)
    saved = (triton_search._GPU_SMALL, triton_search._GPU_LARGE)
    rows = []
    for config in SEARCH_CONFIGS:
        if run.left() < 150:
            break
        triton_search._GPU_SMALL = triton_search._GPU_LARGE = config
        entry = {"config": config}
        try:
            g = torch.Generator().manual_seed(0)
            rgb = lambda: psal.patchmatch(q, k, patch_size=7, num_neighbors=3, num_iters=10, generator=g)  # noqa: E731
            entry["rgb512_p7_k3_it10_ms"], _ = time_ms(rgb, run.device, 1, 5)
            entry["rgb_mean"] = _interior_mean(rgb().costs, 7, 3)[1]
            c64 = lambda: psal.patchmatch(*f64, patch_size=3, num_neighbors=4, num_iters=5, generator=g)  # noqa: E731
            entry["c64_512_p3_k4_it5_ms"], _ = time_ms(c64, run.device, 1, 5)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = _error_line(exc)
        res["search"].append(entry)
        run.log(f"tune search {config}: {entry}")
        rows.append([f"search {config[0]}x{config[1]}, {config[2]} warps", _fmt(entry.get("rgb512_p7_k3_it10_ms"), 4), _fmt(entry.get("c64_512_p3_k4_it5_ms"), 4), entry.get("error", "")[:60]])
        run.save()
    ok = [e for e in res["search"] if "error" not in e]
    if ok:
        triton_search._GPU_SMALL = min(ok, key=lambda e: e["rgb512_p7_k3_it10_ms"])["config"]
        triton_search._GPU_LARGE = min(ok, key=lambda e: e["c64_512_p3_k4_it5_ms"])["config"]
    else:
        triton_search._GPU_SMALL, triton_search._GPU_LARGE = saved
    res["chosen"] = {"small": triton_search._GPU_SMALL, "large": triton_search._GPU_LARGE, "before": saved}
    # Attention, forward + backward over a fixed field, 512², C = 64, bf16.
    field = psal.patchmatch(*f64, patch_size=3, num_neighbors=4, num_iters=2, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(f64[0].shape, generator=torch.Generator().manual_seed(1)).to(run.device, torch.bfloat16)
    tiles = triton_attend._tiles
    try:
        for block, cb, warps in ATTEND_CONFIGS:
            if run.left() < 120:
                break
            triton_attend._tiles = lambda lanes, channels, b=block, c=cb, w=warps: dict(
                BLOCK=b, CB=min(c, triton_attend.triton.next_power_of_2(max(channels, 1))), num_warps=w
            )
            entry = {"block": block, "cb": cb, "warps": warps}
            qq, kk, vv = (t.clone().requires_grad_() for t in (f64[0], f64[1], f64[1]))

            def step():
                for x in (qq, kk, vv):
                    x.grad = None
                psal.attend(qq, kk, vv, field.indices, patch_size=3).backward(grad)

            try:
                entry["attend_c64_512_fwdbwd_ms"], _ = time_ms(step, run.device, 1, 5)
            except Exception as exc:  # noqa: BLE001
                entry["error"] = _error_line(exc)
            res["attend"].append(entry)
            rows.append([f"attend {block}x{cb}, {warps} warps", _fmt(entry.get("attend_c64_512_fwdbwd_ms"), 4), "", entry.get("error", "")[:60]])
            run.save()
    finally:
        triton_attend._tiles = tiles
    run.tables.append(
        "**Tile shapes** (BLOCK x CB, warps): search median ms ((a) 512² RGB p = 7 k = 3 10 it; (b) 512² C = 64 bf16 p = 3 k = 4 "
        "5 it), attention forward + backward median ms (512² C = 64 bf16, center). Kept for what follows: "
        f"{triton_search._GPU_SMALL} for patches of up to {triton_search._GPU_SMALL_PATCH} values, {triton_search._GPU_LARGE} above\n\n"
        + common.markdown_table(["config", "ms (a)", "ms (b)", "error"], rows)
    )
    return res


# ----------------------------------------------------------------------------------------------


RUNNERS = {
    "tests": section_tests,
    "search": section_search,
    "layer": section_layer,
    "precision": section_precision,
    "race": section_race,
    "peer": section_peer,
    "tune": section_tune,
}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m psal.bench gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="where gpu_check.json, gpu_check.md and the logs go")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, tests only collected: checks the command itself")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=[s for s in SECTIONS if s != "tune"], help="run in this order")
    ap.add_argument("--tune", action="store_true", help="also time other tile shapes (section tune)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--peer", default="peers/ncherel-psal", help="a copy of ../shared/peers/ncherel-psal (git-ignored)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; sections that would start later are cut short")
    ap.add_argument("--test-timeout", type=float, default=200.0, help="seconds for the test selection")
    ap.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers, where it is installed")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--search-size", type=int, default=512)
    ap.add_argument("--search-iters", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--layer-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--layer-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--sdpa-max", type=int, default=1024, help="largest size at which SDPA is measured; above, extrapolated")
    ap.add_argument("--peer-layer-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--precision-size", type=int, default=64)
    ap.add_argument("--race-size", type=int, default=128)
    ap.add_argument("--race-repeats", type=int, default=100)
    args = ap.parse_args(argv)
    if args.tune and "tune" not in args.sections:
        args.sections.append("tune")
    args.sections = list(dict.fromkeys(args.sections))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run:
        args.search_size, args.search_iters, args.repeats = 32, [1, 2], 2
        args.layer_sizes, args.sdpa_max, args.peer_layer_sizes = [16, 32], 16, [16]
        args.precision_size, args.race_size, args.race_repeats = 8, 12, 3
        args.layer_dtype = "float32"  # numba's bfloat16 kernels would be compiled for this alone
    return args


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    run = Run(args)
    print(common.environment(), flush=True)
    start_peer_build(run)
    for name in args.sections:  # in the order given
        if run.left() < 15:
            run.results["sections"][name] = {"skipped": "out of time"}
            run.tables.append(f"**{name}**: skipped (out of time)")
            continue
        run.log(f"section {name}")
        t = time.perf_counter()
        try:
            res = RUNNERS[name](run)
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            import traceback

            res = {"error": _error_line(exc), "traceback": traceback.format_exc()[-4000:]}
            run.tables.append(f"**{name}**: FAILED: {res['error']}")
            print(res["traceback"], file=sys.stderr)
        res["seconds"] = round(time.perf_counter() - t, 1)
        if "skipped" in res:
            run.tables.append(f"**{name}**: skipped ({res['skipped']})")
        run.results["sections"][name] = res
        run.save()
        _free(run)
    if run.peer_build is not None and run.peer_build[0].poll() is None:
        run.peer_build[0].kill()
    run.results["seconds"] = round(time.perf_counter() - run.t0, 1)
    run.save()
    text = f"# psal GPU check\n\n{common.environment()}\n\nTotal {run.results['seconds']:.0f} s.\n\n" + "\n\n".join(run.tables) + "\n"
    (run.out / "gpu_check.md").write_text(text)
    print("\n" + text, flush=True)
    failed = [n for n, r in run.results["sections"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
