"""The GPU check's inputs and measurements: the run's state, pictures and features, median times
with device events, allocator peaks."""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from psal.bench import common


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
        self.peer_build: tuple | None = None  # (the harness's build process, its log file)

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


def free(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def interior_mean(costs: torch.Tensor, p: int, C: int) -> tuple[float, float]:
    """(best, mean over k) of the costs ``(..., k, H, W)`` of the pixels whose patch lies inside
    the map, per patch value (divided by ``p * p * C``), as the authors' harness reports them."""
    r = p // 2
    c = costs.reshape(-1, *costs.shape[-3:])[0].double()
    c = c[:, r : c.shape[1] - r, r : c.shape[2] - r] / (p * p * C)
    return float(c[0].mean()), float(c.mean())


def peer_dir(args) -> Path | None:
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
    peer = peer_dir(run.args)
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


def layer_step(layer, fq, fk, grad):
    """A forward + backward of ``layer`` on fresh leaves (query ``fq``, key and value ``fk``)."""
    q, k, v = (t.clone().requires_grad_() for t in (fq, fk, fk))

    def step():
        for x in (q, k, v):
            x.grad = None
        layer(q, k, v).backward(grad)

    return step


def sdpa_step(qt, kt, vt, gt, backend):
    from torch.nn.attention import sdpa_kernel

    def step():
        for x in (qt, kt, vt):
            x.grad = None
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qt, kt, vt)
        out.backward(gt)

    return step


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
