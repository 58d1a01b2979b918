"""The GPU check's driver: options, the order of sections, the saved results and the report."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from psal.bench import common

from . import peer, report, sections, variants
from .measure import Run, error_line, free

SECTIONS = ("tests", "variants", "search", "peer", "precision", "race", "layer")
RUNNERS = {
    "tests": sections.section_tests,
    "variants": variants.section_variants,
    "search": sections.section_search,
    "layer": sections.section_layer,
    "precision": sections.section_precision,
    "race": sections.section_race,
    "peer": peer.section_peer,
}


def parse(argv):
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m psal.bench gpu", description=doc.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="where gpu_check.json, gpu_check.md and the logs go")
    ap.add_argument("--render", default=None, help="print the report of an earlier run's gpu_check.json and stop")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, tests only collected: checks the command itself")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run in this order")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--peer", default="peers/ncherel-psal", help="a copy of ../shared/peers/ncherel-psal (git-ignored)")
    ap.add_argument("--budget", type=float, default=360.0, help="seconds; sections that would start later are cut short")
    ap.add_argument("--test-timeout", type=float, default=150.0, help="seconds for the test selection")
    ap.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers, where it is installed")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=None, help="search variants to time (default: psal.backends.triton.search.VARIANTS)")
    ap.add_argument("--variants-size", type=int, default=512)
    ap.add_argument("--variants-iters", type=int, default=5)
    ap.add_argument("--variants-classes", nargs="+", default=["small", "large"], choices=["small", "large"])
    ap.add_argument("--search-size", type=int, default=512)
    ap.add_argument("--search-iters", type=int, nargs="+", default=[1, 2, 3, 4, 5, 10])
    ap.add_argument("--layer-sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--layer-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--sdpa-max", type=int, default=1024, help="largest size at which SDPA is measured; above, extrapolated")
    ap.add_argument("--peer-layer-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--precision-size", type=int, default=64)
    ap.add_argument("--race-size", type=int, default=128)
    ap.add_argument("--race-repeats", type=int, default=100)
    args = ap.parse_args(argv)
    if args.out_dir is None and args.render is None:
        ap.error("give OUT_DIR (or --render FILE)")
    args.sections = list(dict.fromkeys(args.sections))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.dry_run:
        args.search_size, args.search_iters, args.repeats = 32, [1, 2], 2
        args.layer_sizes, args.sdpa_max, args.peer_layer_sizes = [16, 32], 16, [16]
        args.precision_size, args.race_size, args.race_repeats = 8, 12, 3
        args.variants = args.variants or ["lanes-pad-32x1", "tiles-16x16x2"]
        args.variants_size, args.variants_iters, args.variants_classes = 12, 1, ["small"]
        args.layer_dtype = "float32"  # numba's bfloat16 kernels would be compiled for this alone
    return args


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.render:
        with open(args.render) as f:
            print(report.render(json.load(f)))
        return 0
    # The variants section keeps its chosen key-gradient path for the sections after it; the
    # setting ends with the run, so that a caller's process (the tests) is left as it was.
    with sections.key_grad_path(None):
        return _run(args)


def _run(args) -> int:
    run = Run(args)
    print(common.environment(), flush=True)
    peer.start_build(run)
    for name in args.sections:  # in the order given
        if run.left() < 15:
            run.results["sections"][name] = {"skipped": "out of time"}
            continue
        run.log(f"section {name}")
        t = time.perf_counter()
        try:
            res = RUNNERS[name](run)
        except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others
            res = {"error": error_line(exc), "traceback": traceback.format_exc()[-4000:]}
            print(res["traceback"], file=sys.stderr)
        res["seconds"] = round(time.perf_counter() - t, 1)
        run.results["sections"][name] = res
        run.save()
        free(run)
    peer.stop_build(run)
    run.results["seconds"] = round(time.perf_counter() - run.t0, 1)
    run.save()
    text = report.render(run.results)
    (run.out / "gpu_check.md").write_text(text)
    print("\n" + text, flush=True)
    failed = [n for n, r in run.results["sections"].items() if "error" in r]
    return 1 if failed else 0
