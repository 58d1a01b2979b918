"""What every benchmark shares: the environment line, peak-memory probes, markdown tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "numba", "faiss", "triton"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            pass
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_dict() -> dict:
    import torch

    env = {"versions": _versions(), "cpu": _cpu(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import numba

        env["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def environment(env: dict | None = None) -> str:
    """The environment line of this machine (or of ``env``, an earlier :func:`environment_dict`)."""
    env = environment_dict() if env is None else env
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    threads = f"torch threads {env['torch_threads']}" + (f", numba threads {env['numba_threads']}" if "numba_threads" in env else "")
    gpu = f"; GPU: {env['gpu']}" if "gpu" in env else ""
    return f"{versions}\nCPU: {env['cpu']}, {env['cores']} cores ({threads}){gpu}; {sys.platform}"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib() -> int:
    """Resident set size now (Linux), KiB."""
    return _status_kib("VmRSS")


def peak_kib() -> int:
    """Resident set high-water mark since the last :func:`reset_peak` (Linux), KiB."""
    return _status_kib("VmHWM")


def reset_peak() -> None:
    """Resets the high-water mark to the current size (Linux >= 4.0; silently nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def sync(device: str) -> None:
    """Waits for the device's queued work, so that wall-clock times measure it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`peak_kib`, over the resting
    level at start: the process's resident set on CPU, the caching allocator's peak on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.rest = torch.cuda.memory_allocated() // 1024
        else:
            self.rest = rss_kib()
            reset_peak()

    def peak_kib(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() // 1024 - self.rest
        return peak_kib() - self.rest


def tensor_peak_bytes(step) -> int:
    """Peak bytes of the tensors PyTorch allocates on the CPU during a second call of ``step``,
    over the level before it: the accounting of :class:`PeakMemory` on a GPU (the first call's
    results, which the second frees as it runs, are credited), measured with the profiler's
    memory events. What Triton's interpreter allocates for itself is not counted: on a CPU this
    measures what a GPU would allocate for the same Triton launches."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("psal.second_call"):
            pass
        step()
    events = list(prof.profiler.kineto_results.events())
    mark = next(e.start_ns() for e in events if e.name() == "psal.second_call")
    current, level, peak = 0, None, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if level is None and e.start_ns() >= mark:
            level = current
        current += e.nbytes()
        if level is not None:
            peak = max(peak, current - level)
    return peak


def host_peak_bytes(step) -> tuple[int, int]:
    """Peak bytes during a second call of ``step`` on the CPU, over the level before it: of the
    tensors PyTorch allocates (:func:`tensor_peak_bytes`) and of the numpy arrays (numba's
    kernels' inputs and outputs; numpy reports them to ``tracemalloc``), measured in two runs
    of the two calls. Their sum bounds the peak of both together from above."""
    import tracemalloc

    tensors = tensor_peak_bytes(step)
    step()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return tensors, max(peak - before, 0)


def write_json(path, args, results) -> None:
    """The environment, the command's arguments and its results, as JSON at ``path`` (if given)."""
    if path:
        from psal.images import write_json as write

        write(path, {"environment": environment_dict(), "args": vars(args), "results": results})


def markdown_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def run_worker(module: str, method: str, size: int, options: list[str]):
    """Runs ``python -m module --worker method --size size *options --out FILE`` in a fresh
    process and returns what it saved (``torch.load``), or ``None`` after printing why it failed."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        cmd = [sys.executable, "-m", module, "--worker", method, "--size", str(size), *options, "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {method} at {size}: failed ({tail})", file=sys.stderr)
            return None
        return torch.load(out)


def run_script(code: str, argv: list[str], label: str):
    """Runs ``python -c code *argv`` in a fresh process and returns the JSON object on the last
    line of its output, or ``None`` after printing why it failed (as ``label``)."""
    import json

    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {label}: failed ({(proc.stderr.strip().splitlines() or ['?'])[-1]})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_worker_arguments(ap) -> None:
    """``--json`` and the hidden options by which :func:`run_worker` calls a suite back."""
    import argparse

    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (tensors, timings and peak memory on it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)


def parse_suite(ap, argv, worker, default_methods: dict):
    """Parses a suite's command line; as a worker (:func:`run_worker`), runs ``worker(args)`` and
    returns ``None``. Otherwise fills in the device's default ``--methods`` and returns ``args``."""
    args = ap.parse_args(argv)
    if args.worker:
        args.method = args.worker
        worker(args)
        return None
    if args.methods is None:
        args.methods = list(default_methods["cuda" if args.device.startswith("cuda") else "cpu"])
    return args


def paired(ours, theirs, lower_is_better: bool, groups=None, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two methods' scores on the same cases: the share of cases ours wins
    (a tie counts half), the mean difference ``ours - theirs`` and its bootstrap 95% interval (the
    percentile interval of the mean over ``resamples`` seeded resamplings). ``groups``: one label
    per case (its picture); the bootstrap then resamples whole groups, since the cases of one
    picture are not independent of each other, and the interval is wider and honest."""
    import numpy as np

    if len(ours) != len(theirs) or len(ours) == 0:
        raise ValueError(f"paired: ours and theirs must be two equal, non-empty lists of scores, got {len(ours)} and {len(theirs)}")
    if groups is not None and len(groups) != len(ours):
        raise ValueError(f"paired: groups must give one label per case, got {len(groups)} for {len(ours)} cases")
    d = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    better = d < 0 if lower_is_better else d > 0
    wins = float((better.sum() + 0.5 * (d == 0).sum()) / d.size)
    labels = np.arange(d.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums, counts = np.bincount(labels, weights=d), np.bincount(labels).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, sums.size, (resamples, sums.size))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "wins": wins,
        "mean_difference": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "cases": int(d.size),
        "groups": int(sums.size),
    }
