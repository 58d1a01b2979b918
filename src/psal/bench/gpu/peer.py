"""The GPU check's benchmark peer: the authors' CUDA extension (github.com/ncherel/psal), built by
their harness in the background from a git-ignored copy, then timed as ours is."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch

from .measure import Run, error_line, features, free, images, interior_mean, layer_step, peak_mib, peer_dir, time_ms

PEER_BUILD = os.environ.get("NCHEREL_BUILD", "/tmp/ncherel_build")


def start_build(run: Run) -> None:
    peer = peer_dir(run.args)
    if peer is None or not run.cuda or "peer" not in run.args.sections:
        return
    log = open(run.out / "peer_build.log", "w")
    cmd = [sys.executable, str(peer / "bench_ncherel.py"), str(peer), str(run.out / "peer_build.json"), "--build-only"]
    run.log("peer: building the authors' extension in the background")
    run.peer_build = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=peer), log)


def stop_build(run: Run) -> None:
    if run.peer_build is not None and run.peer_build[0].poll() is None:
        run.peer_build[0].kill()


def _load(run: Run):
    """The built extension (``patchmatch``, ``backward``) and the authors' ``PSAttention`` class,
    wired as the harness wires them."""
    if run.peer_build is None:
        raise RuntimeError("the peer's build was not started")
    proc, log = run.peer_build
    proc.wait(timeout=max(10.0, run.left() - 30))
    log.close()
    so = next(Path(PEER_BUILD, "b_ncherel_patchmatch").glob("ncherel_patchmatch*.so"), None)
    if proc.returncode != 0 or so is None:
        tail = (run.out / "peer_build.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"the peer's build failed (exit {proc.returncode}): {' | '.join(tail)}")
    loader = importlib.machinery.ExtensionFileLoader("ncherel_patchmatch", str(so))
    pm = _module(importlib.util.spec_from_file_location("ncherel_patchmatch", str(so), loader=loader))
    pkg_dir = Path(PEER_BUILD, "ncherel_psal")
    pkg = types.ModuleType("ncherel_psal")
    pkg.__path__ = [str(pkg_dir)]
    masked: Any = types.ModuleType("ncherel_psal.patchmatch_masked")
    masked.patchmatch_masked = masked.backward_masked = None
    sys.modules.update({"ncherel_psal": pkg, "ncherel_psal.patchmatch": pm, "ncherel_psal.patchmatch_masked": masked})
    pa = _module(importlib.util.spec_from_file_location("ncherel_psal.psal_attention", str(pkg_dir / "psal_attention.py")))
    return pm, pa


def _module(spec):
    """The module of an import ``spec``, registered and executed."""
    if spec is None or spec.loader is None:
        raise RuntimeError("the peer's module cannot be loaded")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def section_peer(run: Run) -> dict:
    import psal

    if peer_dir(run.args) is None:
        return {"skipped": f"no peer folder at {run.args.peer!r} (copy ../shared/peers/ncherel-psal there)"}
    if not run.cuda:
        return {"skipped": "the authors' extension is CUDA only"}
    pm, pa = _load(run)
    res: dict = {"search": [], "layer": {}}
    build = run.out / "peer_build.json"
    if build.is_file():
        res["build"] = json.loads(build.read_text())
    # Search: the harness's inputs and metric (interior pixels, per patch value).
    S, p = 512, 7
    q, k, _ = images(run, S)
    A, B = q[0].to(run.device).contiguous(), k[0].to(run.device).contiguous()
    exact_mean = run.results["sections"].get("search", {}).get("exact_mean")
    r = p // 2
    for iters in run.args.search_iters:
        shift, cost = pm.patchmatch(A, B, p, iters)
        ms, n = time_ms(lambda iters=iters: pm.patchmatch(A, B, p, iters), run.device, warmup=2, repeats=run.args.repeats)
        best, mean = interior_mean(cost[None], p, 3)
        # Their field through our oracle: the interior costs must be theirs (true patch SSDs).
        idx = (shift[0].long() * S + shift[1].long())[None, None]  # (1, 1, 3, H, W)
        again = psal.patch_costs(q.to(run.device), k.to(run.device), idx, patch_size=p)[0, 0]
        inner = (slice(None), slice(r, S - r), slice(r, S - r))
        mismatch = float(((again[inner] - cost[inner]).abs() / again[inner].abs().clamp_min(1e-3)).max())
        entry = {"iters": iters, "ms": ms, "repeats": n, "best": best, "mean": mean, "cost_check_max_rel": mismatch}
        if exact_mean:
            entry["ratio"] = mean / exact_mean
        res["search"].append(entry)
    # Layer: their PSAttention (k = 3, float32 only, loops over the batch) against ours, float32.
    C = 64
    for S in run.args.peer_layer_sizes:
        if run.left() < 20:
            break
        fq, fk = features(run, S, C, torch.float32)
        g = torch.randn(fq.shape, generator=torch.Generator().manual_seed(1)).to(run.device)
        row: dict = {}
        for name, att in (
            ("peer", pa.PSAttention(patch_size=3, n_iters=5, aggregation=False)),
            ("psal", psal.PSAttention(patch_size=3, num_neighbors=3, num_iters=5, seed=0)),
        ):
            step = layer_step(att, fq, fk, g)
            try:
                row[f"{name}_ms"], _ = time_ms(step, run.device, 1, run.args.repeats if S <= 512 else 3, budget_s=15)
                row[f"{name}_peak_mib"] = peak_mib(step, run.device)
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = error_line(exc)
            del step
            free(run)
        res["layer"][S] = row
        run.save()
    return res
