"""The GPU check's sections that prove and time psal: the CUDA tests, the search, the layer against
SDPA, half precision, repeated backward passes. Each returns its results; :mod:`.report` makes
the tables."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from psal.bench import common

from .measure import Run, error_line, features, free, images, interior_mean, layer_step, peak_mib, sdpa_step, time_ms

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
    "tests/test_volume.py",
)
TEST_SELECTION = "cuda or test_triton_search or test_triton_attend"


def backend_name(run: Run) -> str:
    return "triton" if run.cuda else "numba"


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
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    root = Path(__file__).resolve().parents[4]
    limit = max(30.0, min(args.test_timeout, run.left() - 60))
    run.log(f"tests: {' '.join(cmd[1:])} (limit {limit:.0f} s)")
    start = time.perf_counter()
    code: int | str
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    lines = log.read_text().splitlines()
    summary = next(
        (ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln or "collected" in ln),
        lines[-1] if lines else "",
    )
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(cmd[1:]),
        "exit": code,
        "seconds": round(seconds, 1),
        "summary": summary.strip("= "),
        "failures": failures[:60],
    }


def section_search(run: Run) -> dict:
    import psal

    args = run.args
    S, p, K = args.search_size, 7, 3
    q, k, source = images(run, S)
    q, k = q.to(run.device), k.to(run.device)
    res = {"inputs": source, "size": S, "patch_size": p, "k": K, "backend": backend_name(run), "runs": []}
    if run.cuda:
        from psal.backends.triton import search as ts

        res["variant"] = ts.variant_for(ts.prepare(q, k, None, K, p, 1, "l2", None, 0)).name
    t = time.perf_counter()
    exact = psal.exact_knn(q, k, patch_size=p, num_neighbors=K)
    common.sync(str(run.device))
    res["exact_seconds"] = time.perf_counter() - t
    res["exact_best"], res["exact_mean"] = interior_mean(exact.costs, p, 3)
    for iters in args.search_iters:
        g = torch.Generator().manual_seed(0)

        def call(iters=iters, g=g):
            return psal.patchmatch(q, k, patch_size=p, num_neighbors=K, num_iters=iters, generator=g)

        field = call()
        best, mean = interior_mean(field.costs, p, 3)
        ms, n = time_ms(call, run.device, warmup=1, repeats=args.repeats)
        res["runs"].append({"iters": iters, "ms": ms, "repeats": n, "best": best, "mean": mean, "ratio": mean / res["exact_mean"]})
    return res


def section_layer(run: Run) -> dict:
    from torch.nn.attention import SDPBackend

    import psal

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
            step = layer_step(layer, fq, fk, g)
            big = S >= 2048
            row["psal_ms"], row["psal_repeats"] = time_ms(step, run.device, 1, 2 if big else args.repeats, budget_s=15)
            row["psal_peak_mib"] = peak_mib(step, run.device)
            del step
        except torch.cuda.OutOfMemoryError as exc:
            row["psal_error"] = "out of memory: " + error_line(exc)[:200]
        except Exception as exc:  # noqa: BLE001 - the check reports and goes on
            row["psal_error"] = error_line(exc)
        free(run)
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
                step = sdpa_step(qt, kt, vt, tok[3], be)
                ms, n = time_ms(step, run.device, 1, args.repeats if S <= 512 else 2, budget_s=15)
                mib = peak_mib(step, run.device)
                row[f"{name}_ms"], row[f"{name}_repeats"], row[f"{name}_peak_mib"] = ms, n, mib
                last_measured[name] = (S, ms, mib)
                del qt, kt, vt, tok, step
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = error_line(exc)
            free(run)
        sd = [row[f"{n}_ms"] for n in sdpa_backends if f"{n}_ms" in row]
        row["speedup_vs_best_sdpa"] = min(sd) / row["psal_ms"] if sd and "psal_ms" in row else None
        del fq, fk, g
        free(run)
        run.log(f"layer {S}²: {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})}")
        run.save()
    return res


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


@contextlib.contextmanager
def key_grad_path(path: str | None):
    """The Triton attention's key-side gradients summed by ``path`` (``"gather"``, ``"atomic"``)."""
    saved = os.environ.get("PSAL_TRITON_KEY_GRAD")
    if path is not None:
        os.environ["PSAL_TRITON_KEY_GRAD"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PSAL_TRITON_KEY_GRAD", None)
        else:
            os.environ["PSAL_TRITON_KEY_GRAD"] = saved


def grads(q, k, v, idx, grad, T, backend, aggregation, p):
    import psal

    lq, lk, lv = (t.detach().requires_grad_() for t in (q, k, v))
    temp = torch.tensor(T, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device, requires_grad=True)
    out = psal.attend(lq, lk, lv, idx, patch_size=p, temperature=temp, aggregation=aggregation, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, (lq, lk, lv, temp), grad)]


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
    backend = backend_name(run)
    res = {"size": S, "channels": C, "k": K, "patch_size": p, "temperature": T, "backend": backend, "cases": []}
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype).to(run.device) for t in (q, k, v, grad)]
        for aggregation in ("center", "patch"):
            lq, lk, lv, lg = low
            exact = grads(lq.double(), lk.double(), lv.double(), idx, lg.double(), T, "torch", aggregation, p)
            ours = grads(lq, lk, lv, idx, lg, T, backend, aggregation, p)
            with plain_torch_precision():
                plain = grads(lq, lk, lv, idx, lg, T, "torch", aggregation, p)
            for name, a, b, e in zip(names, ours, plain, exact):
                scale = float(e.abs().max()) or 1.0
                err_ours = float((a.double() - e).abs().max()) / scale
                err_plain = float((b.double() - e).abs().max()) / scale
                ratio = err_ours / err_plain if err_plain > 0 else (0.0 if err_ours == 0 else math.inf)
                res["cases"].append(
                    {
                        "dtype": str(dtype).split(".")[1],
                        "aggregation": aggregation,
                        "tensor": name,
                        "ours": err_ours,
                        "plain": err_plain,
                        "ratio": ratio,
                    }
                )
    res["worst_ratio"] = max(c["ratio"] for c in res["cases"])
    return res


def section_race(run: Run) -> dict:
    """Repeated backward passes on the atomic path (the default: within tolerance) and the gather
    path (deterministic mode's: bitwise equal)."""
    import psal

    S, C, K, p, n = run.args.race_size, 64, 4, 3, run.args.race_repeats
    fq, fk = features(run, S, C, torch.float32)
    field = psal.patchmatch(fq, fk, patch_size=p, num_neighbors=K, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(fq.shape, generator=g).to(run.device)
    # Besides the search's field, one where every query matches among three key positions: the
    # most writes per key-gradient entry.
    collide = (torch.randint(0, 3, field.indices.shape, generator=g) * 7).to(run.device)
    backend = backend_name(run)
    res = {"size": S, "channels": C, "k": K, "patch_size": p, "repeats": n, "backend": backend, "fields": {}}
    for fname, idx in (("search", field.indices), ("3 keys", collide)):
        for aggregation in ("center", "patch"):
            exact = grads(fq.double(), fk.double(), fk.double(), idx, grad.double(), 1.0, "torch", aggregation, p)
            scale = [float(e.abs().max()) or 1.0 for e in exact]
            # The float32 pure-PyTorch backend's error: the problem's own float32 conditioning.
            base = [
                float((a.double() - e).abs().max()) / s
                for a, e, s in zip(grads(fq, fk, fk, idx, grad, 1.0, "torch", aggregation, p), exact, scale)
            ]
            with key_grad_path("atomic"):
                first = grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                spread = [0.0] * 5
                for _ in range(n - 1):
                    again = grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                    spread = [max(s, float((a - b).abs().max())) for s, a, b in zip(spread, again, first)]
            err = [float((a.double() - e).abs().max()) / s for a, e, s in zip(first, exact, scale)]
            with key_grad_path("gather"):
                det0 = grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                equal = 1
                for _ in range(n - 1):
                    det = grads(fq, fk, fk, idx, grad, 1.0, backend, aggregation, p)
                    equal += all(torch.equal(a, b) for a, b in zip(det, det0))
            det_err = [float((a.double() - e).abs().max()) / s for a, e, s in zip(det0, exact, scale)]
            rel_spread = max(d / s for d, s in zip(spread[:4], scale))
            # Within tolerance: each run's error at most twice the float32 reference backend's (plus
            # float32 rounding of the largest value), in both paths; the gather one bitwise.
            within = all(e <= 2 * b + 1e-6 for e, b in zip(err[:4] + det_err[:4], base[:4] * 2))
            ok = within and rel_spread <= 2 * max(base[:4]) + 1e-6 and equal == n
            res["fields"][f"{fname}/{aggregation}"] = {
                "atomic_max_spread_rel": rel_spread, "atomic_error_rel": err, "torch_float32_error_rel": base, "deterministic_equal": equal,
                "deterministic_error_rel": det_err, "ok": ok,
            }  # fmt: skip
    return res
