"""The GPU check's report: a markdown table for each section, made from its results alone (so
the JSON of an earlier run can be rendered again: ``python -m psal.bench gpu --render FILE``)."""

from __future__ import annotations

import math

from psal.bench import common


def _same_cell(row: dict) -> str:
    """A row's "same as the reference" column: yes, NO, or – where it was not compared."""
    return "–" if "same" not in row else ("yes" if row["same"] else "NO")


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def tests(res: dict) -> str:
    failures = res.get("failures", [])
    return f"**Tests** (CUDA selection, {res['seconds']:.0f} s, exit {res['exit']}): {res['summary']}" + "".join(
        f"\n- {f}" for f in failures[:20]
    )


def variants(res: dict) -> str:
    parts = []
    for cls, block in res.get("search", {}).items():
        rows = [
            [r["name"], fmt(r.get("ms"), 4), fmt(r.get("mean_cost"), 5), fmt(r.get("index_agreement"), 4),
             _same_cell(r), (r.get("error") or r.get("skipped") or "")[:60]]
            for r in block["rows"]
        ]  # fmt: skip
        parts.append(
            f"**Search variants, {cls} patches** ({block['problem']}: {block['size']}², C = {block['channels']}, p = {block['patch_size']}, "
            f"k = {block['k']}, {block['iters']} iterations); same: the reference's field (mean cost within 1e-4, 99% of indices); "
            f"kept: **{res['chosen'].get(cls)}**\n\n"
            + common.markdown_table(["variant", "median ms", "mean cost", "indices as ref.", "same", "error"], rows)
        )
    if res.get("schemes"):
        sc = res["schemes"]
        rows = [
            [f"({r['prop_k']}, {r['rand_k']})", r["iters"], fmt(r.get("ms"), 4), fmt(r.get("ratio"), 4), (r.get("error") or "")[:60]]
            for r in sc["rows"]
        ]
        best = sc.get("fastest_at_target")
        line = (
            f"fastest at or below the authors' 10-iteration quality ({sc['target_ratio']} x exact): scheme "
            f"({best['prop_k']}, {best['rand_k']}), {best['iters']} iterations, {best['ms']:.3g} ms, {best['ratio']:.3f} x exact"
            if best
            else "no scheme reached the authors' 10-iteration quality"
        )
        parts.append(
            f"**Candidate schemes** ({sc['variant']}, rgb {sc['size']}²; scheme = (neighbour matches propagated, matches searched "
            f"around), (3, 3) is every backend's): {line}\n\n"
            + common.markdown_table(["scheme", "iterations", "median ms", "mean / exact", "error"], rows)
        )
    if res.get("attend"):
        rows = [
            [r["name"], fmt(r.get("ms"), 4), fmt(r.get("peak_mib"), 4), fmt(r.get("sdpa_flash_peak_mib"), 4),
             _same_cell(r), (r.get("error") or "")[:60]]
            for r in res["attend"]
        ]  # fmt: skip
        setup = res.get("attend_setup", {})
        parts.append(
            f"**Key-side gradient paths** (the layer forward + backward, {setup.get('size')}², C = 64, p = 3, k = 4, "
            f"{setup.get('iters')} iterations, {setup.get('dtype')}); qualifies: gradients over one field as the gather's, and "
            f"peak at most SDPA flash's; kept: **{res['chosen'].get('key_grad')}**\n\n"
            + common.markdown_table(["path", "median ms", "peak MiB", "SDPA flash peak MiB", "qualifies", "error"], rows)
        )
    if res.get("compile_failures"):
        parts.append("Compile failures: " + "; ".join(f"{k}: {v}" for k, v in res["compile_failures"].items()))
    parts.append(f"To commit as the defaults (psal/backends/triton/search.py): `{res.get('tuned_line')}`")
    return "\n\n".join(parts)


def search(res: dict) -> str:
    rows = [["exact (brute force)", "–", fmt(res["exact_seconds"] * 1e3, 4), fmt(res["exact_best"], 4), fmt(res["exact_mean"], 4), "1.000"]]
    name = res["backend"] + (f" {res['variant']}" if res.get("variant") else "")
    for r in res["runs"]:
        rows.append([f"psal ({name})", r["iters"], fmt(r["ms"], 4), fmt(r["best"], 4), fmt(r["mean"], 4), f"{r['ratio']:.3f}"])
    return (
        f"**Search**, {res['size']}² RGB, p = {res['patch_size']}, k = {res['k']} ({res['inputs']}); cost: mean over the interior pixels, per patch value\n\n"
        + common.markdown_table(["method", "iterations", "median ms", "best cost", "mean cost (k)", "mean / exact"], rows)
    )


def layer(res: dict) -> str:
    backends = ("flash", "cudnn")
    rows = []
    for S, row in res["sizes"].items():
        if "skipped" in row:
            rows.append([f"{S}²", "skipped (out of time)"] + [""] * 6)
            continue
        sd = [row[f"{n}_ms"] for n in backends if f"{n}_ms" in row]
        mark = " (extrapolated)" if any(f"{n}_extrapolated_from" in row for n in backends) else ""
        ratio = row.get("speedup_vs_best_sdpa")
        rows.append([
            f"{S}²",
            fmt(row.get("psal_ms"), 4) if "psal_ms" in row else row.get("psal_error", "–")[:60],
            fmt(row.get("psal_peak_mib"), 4),
            (fmt(row.get("flash_ms"), 4) + mark) if "flash_ms" in row else row.get("flash_error", "–")[:40],
            (fmt(row.get("cudnn_ms"), 4) + mark) if "cudnn_ms" in row else row.get("cudnn_error", "–")[:40],
            fmt(min(row.get(f"{n}_peak_mib", math.inf) for n in backends), 4) + mark if sd else "–",
            (f"{ratio:.1f}x" + mark) if ratio else "–",
        ])  # fmt: skip
    return (
        f"**Layer forward + backward**, C = {res['channels']}, p = {res['patch_size']}, k = {res['k']}, {res['iters']} iterations, {res['dtype']}; "
        f"SDPA: one head, d = {res['channels']}, the same features as {res['dtype']} tokens; median ms; peak = allocator peak over the inputs\n\n"
        + common.markdown_table(
            ["size", "psal ms", "psal peak MiB", "SDPA flash ms", "SDPA cuDNN ms", "SDPA peak MiB", "psal vs faster SDPA"], rows
        )
    )


def precision(res: dict) -> str:
    rows = [[c["dtype"], c["aggregation"], c["tensor"], f"{c['ours']:.2e}", f"{c['plain']:.2e}", f"{c['ratio']:.2f}"] for c in res["cases"]]
    b = res["backend"]
    return (
        f"**Half precision** ({b} vs plain PyTorch in the same dtype), {res['size']}², C = {res['channels']}, k = {res['k']}, p = {res['patch_size']}: "
        f"max |error| against float64 over max |float64|; worst ratio {res['worst_ratio']:.2f} (goal ≤ 2)\n\n"
        + common.markdown_table(["dtype", "aggregation", "tensor", f"{b} error", "plain torch error", "ratio"], rows)
    )


def race(res: dict) -> str:
    rows = []
    n = res["repeats"]
    for name, f in res["fields"].items():
        fname, aggregation = name.split("/")
        rows.append([
            fname, aggregation, f"{f['atomic_max_spread_rel']:.1e}", f"{max(f['atomic_error_rel'][:4]):.1e}", f"{f['deterministic_equal']}/{n}",
            f"{max(f['deterministic_error_rel'][:4]):.1e}", f"{max(f['torch_float32_error_rel'][:4]):.1e}", "yes" if f["ok"] else "NO",
        ])  # fmt: skip
    return (
        f"**Repeated backward** ({res['backend']}), {res['size']}², C = {res['channels']}, k = {res['k']}, p = {res['patch_size']}, {n} passes each; "
        "errors relative to the float64 gradients' largest value (query, key, value)\n\n"
        + common.markdown_table(
            [
                "field",
                "aggregation",
                "atomic: max spread",
                "atomic: error",
                "gather: bitwise equal",
                "gather: error",
                "torch float32 error",
                "ok",
            ],
            rows,
        )
    )


def peer(res: dict, ours: dict | None = None) -> str:
    mine = {r["iters"]: r for r in (ours or {}).get("runs", [])}
    rows = []
    for e in res["search"]:
        m = mine.get(e["iters"])
        rows.append([
            e["iters"], fmt(e["ms"], 4), fmt(e["mean"], 4), fmt(e.get("ratio"), 4), f"{e['cost_check_max_rel']:.1e}",
            fmt(m["ms"], 4) if m else "–", fmt(m["mean"], 4) if m else "–", f"{e['ms'] / m['ms']:.1f}x" if m else "–",
        ])  # fmt: skip
    out = (
        "**The authors' CUDA search** (ncherel/psal, k = 3 fixed), 512² RGB, p = 7, the same inputs and metric; "
        "cost check: their interior costs against psal.patch_costs of their field\n\n"
        + common.markdown_table(
            ["iterations", "peer ms", "peer mean cost", "peer / exact", "cost check", "psal ms", "psal mean cost", "psal speed-up"], rows
        )
    )
    rows = []
    for S, row in res["layer"].items():
        rows.append([
            f"{S}²", fmt(row.get("peer_ms"), 4) if "peer_ms" in row else row.get("peer_error", "–")[:60], fmt(row.get("peer_peak_mib"), 4),
            fmt(row.get("psal_ms"), 4) if "psal_ms" in row else row.get("psal_error", "–")[:60], fmt(row.get("psal_peak_mib"), 4),
            f"{row['peer_ms'] / row['psal_ms']:.1f}x" if "peer_ms" in row and "psal_ms" in row else "–",
        ])  # fmt: skip
    return out + (
        "\n\n**The authors' PSAttention against ours**, forward + backward, float32, C = 64, p = 3, k = 3, 5 iterations, center\n\n"
        + common.markdown_table(["size", "peer ms", "peer peak MiB", "psal ms", "psal peak MiB", "psal speed-up"], rows)
    )


def section(name: str, res: dict, results: dict) -> str:
    """The table of section ``name`` from its results ``res`` (``results``: the whole run's)."""
    if "error" in res:
        return f"**{name}**: FAILED: {res['error']}"
    if "skipped" in res:
        return f"**{name}**: skipped ({res['skipped']})"
    if name == "peer":
        return peer(res, results["sections"].get("search"))
    return {"tests": tests, "variants": variants, "search": search, "layer": layer, "precision": precision, "race": race}[name](res)


def render(results: dict) -> str:
    """The whole report of a run's results (``gpu_check.json``)."""
    env = results.get("environment")
    head = "# psal GPU check\n\n" + common.environment(env) + f"\n\nTotal {results.get('seconds', 0):.0f} s.\n\n"
    return head + "\n\n".join(section(name, res, results) for name, res in results["sections"].items()) + "\n"
