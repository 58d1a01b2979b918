"""The kernel report: every GPU kernel compiled for sm_90 (H100/H200) and read, no GPU needed.

    python -m psal.bench kernels                       # psal's kernels, and the authors' if found
    python -m psal.bench kernels --peer DIR --json F   # the authors' CUDA code from DIR
    python -m psal.bench kernels --dry-run             # a few kernels (what `make test` runs)

Triton compiles for ``GPUTarget("cuda", 90, 32)`` on any machine, with its own ptxas; Triton's
cuobjdump disassembles the cubin. For every search variant (:data:`psal.backends.triton.search.ALL_VARIANTS`)
on the two problems of the GPU check (``rgb``: 512² RGB float32, p = 7, k = 3; ``c64``: 512², 64
channels bfloat16, p = 3, k = 4) and every attention kernel, the report prints registers, spills
and stack (``ptxas -v``), resident warps per SM, and the **cost loop**: the innermost SASS loop
that holds the patch-value loads and fused multiply-adds, its instructions split into integer,
floating-point, memory and other, and its **thread-instructions per patch value** (loop
instructions over the values one thread covers in one trip).

The authors' kernels (``../shared/peers/ncherel-psal/src/patchmatch.cu``, a benchmark peer that is
never a dependency) are compiled unchanged for sm_90 with nvcc (``pip install
"psal[kernels]"``: CUDA 13.0, the GPU machines' major, from PyPI) against the CPU torch wheel's
headers, once (about a minute; the cubin is cached under ``--cache``), and read the same way: their
cost loop is the innermost loop of ``dist()`` inside ``propagation<float, 7>``, whose values are
its FFMA count (``dist += diff * diff``).

**Estimated time** (a screen between GPU lends; the GPU's clock decides): per iteration of the
``rgb`` search, ``issue_ms = candidates x warps x dynamic SASS per candidate / (132 SM x 4
schedulers x 1.98 GHz)``, every loop trip counted as run (no early exit: an upper bound), times
``(a + b / resident warps per SM)`` with ``a = 0.9, b = 12`` (``../shared/GPU-STATIC.md``, fitted
on the twelve tile shapes timed on an H200 on 2026-11-27 with emulated trips). The report checks
this estimate against those twelve timings (``docs/gpu/2026-11-27-h200-run2.json``) by rank
correlation, beside the rank correlations of the plain figures.

Its last line: ``cost loop: psal N instr/value, authors M instr/value, ratio R`` (psal: the default
variant's iterate kernel on ``rgb``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from psal.bench import common

# H100/H200 (sm_90): 132 SMs, 4 schedulers each, 1.98 GHz boost; 64K registers, 64 warps, 32
# blocks and 228 KiB of shared memory per SM; registers allocated per warp in units of 256.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
REGS_PER_SM, MAX_WARPS, MAX_BLOCKS, SMEM_PER_SM = 65536, 64, 32, 228 * 1024
MODEL_A, MODEL_B = 0.9, 12.0
MEASURED = Path(__file__).resolve().parents[3] / "docs" / "gpu" / "2026-11-27-h200-run2.json"
PROBLEMS = {
    # name: (feature dtype, C, p, k, size)
    "rgb": ("fp32", 3, 7, 3, 512),
    "c64": ("bf16", 64, 3, 4, 512),
}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ----------------------------------------------------------------------------------------------
# Compiling and reading SASS.


def triton_tools() -> dict:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {"ptxas": str(bin_dir / "ptxas"), "cuobjdump": str(bin_dir / "cuobjdump")}


@dataclasses.dataclass
class Kernel:
    name: str
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    warps: int  # per block
    sass: list  # [(address, instruction text)]

    @property
    def warps_per_sm(self) -> int:
        return resident_warps(self.regs, self.warps, self.shared)


def resident_warps(regs: int, warps: int, shared: int = 0) -> int:
    """Resident warps per SM for blocks of ``warps`` warps at ``regs`` registers per thread."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(REGS_PER_SM // (per_warp * warps), MAX_BLOCKS, MAX_WARPS // warps)
    if shared:
        blocks = min(blocks, SMEM_PER_SM // shared)
    return blocks * warps


def compile_triton(fn, signature: dict, constexprs: dict, num_warps: int) -> Kernel:
    """``fn`` (a ``@triton.jit`` kernel) compiled for sm_90 with Triton's toolchain, in this process
    (the interpreter must be off: ``TRITON_INTERPRET`` unset when ``fn`` was defined)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Pointers 16-byte aligned, as a launch with torch tensors specialises them; ints plain.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if str(signature[n]).startswith("*")}
    c = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps),
    )
    regs, st, ld, stack = ptxas_resources(c.asm["ptx"])
    return Kernel(fn.__name__, regs, st, ld, stack, int(c.metadata.shared), num_warps, disassemble(c.asm["cubin"]))


def ptxas_resources(ptx: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from ``ptxas -v``."""
    tools = triton_tools()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        target = re.search(r"\.target\s+(sm_\w+)", ptx)
        arch = target.group(1) if target else "sm_90a"
        out = subprocess.run([tools["ptxas"], f"-arch={arch}", "-v", str(path), "-o", str(Path(d) / "k.o")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    if regs is None:
        raise RuntimeError(f"ptxas -v gave no register count: {text.strip()[-400:]}")
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0, int(stack.group(1)) if stack else 0


_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(cubin: bytes, function: str | None = None) -> list:
    """SASS ``[(address, text)]`` of a cubin (of its ``function`` whose name contains this text)."""
    funcs = functions_sass(cubin)
    if function is None:
        return next(iter(funcs.values()))
    return next(v for name, v in funcs.items() if function in name)


def functions_sass(cubin: bytes) -> dict:
    """``{function name: [(address, text)]}`` of every function in a cubin."""
    tools = triton_tools()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tools["cuobjdump"], "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    out: dict = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        m = _INS.match(line)
        if m and current is not None:
            out[current].append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


_MEM = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "LD", "ST", "LDC", "ULDC", "LDSM", "LDGSTS", "REDUX"}
_CTL = {"BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "CALL", "RET", "BPT", "YIELD", "SHFL", "VOTE", "VOTEU"}


def kind(op: str) -> str:
    """``mem`` (loads, stores, atomics, constant loads, REDUX), ``fp``, ``int`` or ``other``
    (branches, barriers, shuffles and votes)."""
    if op in _MEM:
        return "mem"
    if op in _CTL:
        return "other"
    if op.startswith(("F", "H", "D")) and op not in ("FLO",) or op in ("MUFU", "I2F", "F2I", "F2F"):
        return "fp"
    return "int"


def loops(sass: list) -> list:
    """``[(first, last)]`` address ranges of the loops: a branch back to an address at or before it."""
    out = []
    for addr, text in sass:
        if opcode(text) != "BRA":
            continue
        m = re.search(r"(0x[0-9a-f]+)\s*$", text)
        if m and int(m.group(1), 16) <= addr:
            out.append((int(m.group(1), 16), addr))
    return sorted(set(out))


def local_memory_in_loops(sass: list) -> int:
    """LDL/STL instructions inside any loop: spills that cost on every trip (0 is the goal)."""
    inside = {a for lp in loops(sass) for a, _ in sass if lp[0] <= a <= lp[1]}
    return sum(1 for a, t in sass if a in inside and opcode(t) in ("LDL", "STL"))


def body(sass: list, loop) -> list:
    return [t for a, t in sass if loop[0] <= a <= loop[1]]


def mix(texts) -> dict:
    ops = collections.Counter(opcode(t) for t in texts)
    kinds: collections.Counter = collections.Counter()
    for op, n in ops.items():
        kinds[kind(op)] += n
    return {"total": sum(ops.values()), **{k: kinds.get(k, 0) for k in ("int", "fp", "mem", "other")},
            "LDG": ops.get("LDG", 0), "FFMA": ops.get("FFMA", 0), "LDL_STL": ops.get("LDL", 0) + ops.get("STL", 0)}  # fmt: skip


def cost_loop(sass: list):
    """The innermost loop that holds patch-value loads and the most FFMA (the first of equals)."""
    ls = loops(sass)
    inner = [lp for lp in ls if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in ls)]
    scored = [(mix(body(sass, lp)), lp) for lp in inner]
    scored = [(m, lp) for m, lp in scored if m["LDG"] > 0 and m["FFMA"] > 0]
    if not scored:
        return None
    best = max(m["FFMA"] for m, _ in scored)
    return next(lp for m, lp in scored if m["FFMA"] == best)


def parents(sass: list, loop) -> list:
    """The loops that enclose ``loop``, innermost first."""
    return sorted((lp for lp in loops(sass) if lp != loop and lp[0] <= loop[0] and loop[1] <= lp[1]), key=lambda lp: lp[1] - lp[0])


# ----------------------------------------------------------------------------------------------
# psal's kernels: what to compile.


def search_specs(variant: str, dt: str, C: int, P: int, K: int, dot: bool = False, sparse: bool = False):
    """``[(role, fn, signature, constexprs, warps, values per thread per cost-loop trip, trips)]``
    of a search variant on features of dtype ``dt`` (``"fp32"``, ``"bf16"``, ...) with ``C``
    channels, patch ``P`` and ``K`` neighbours; ``trips``: the full trip counts of the cost loop
    and of the loops around it, innermost first, up to the loop over candidates."""
    import triton.language as tl

    from psal.backends.triton import search as ts
    from psal.backends.triton import search_lanes as sl
    from psal.backends.triton import search_tiles as st

    v = ts.parse_variant(variant)
    acc = tl.float64 if dt == "fp64" else tl.float32
    if v.kernel == "lanes":
        cu = sl.channel_unroll(C)
        consts: dict = dict(P=P, K=K, CU=cu, PAD=v.pad, TILE=False, DOT=dot, ACC=acc, SPARSE=sparse, BLOCK=v.block,
                      CU2=sl._next_pow2(cu), PW=sl._next_pow2(P), IDX=tl.int32)  # fmt: skip
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "mask_ptr": "*u8", "table_ptr": "*i32", "nallowed_ptr": "*i32",
                "init_ptr": "*i64", "src_idx": "*i32", "src_cost": "*fp32", "dst_idx": "*i32", "dst_cost": "*fp32",
                "qpos_ptr": "*i64", "nbr_ptr": "*i64"}  # fmt: skip
        per_thread: float = v.block // (32 * v.warps) * cu * P
        trips = [C // cu, P]
        kernels = [("iterate", sl._iterate_kernel), ("init", sl._init_kernel)]
    else:
        cb = min(st._next_pow2(P * P * C), v.chunk)
        consts = dict(DOT=dot, ACC=acc, BLOCK=v.block, KB=max(st._next_pow2(K), 2), CB=cb, ONE_CHUNK=P * P * C <= cb, SPARSE=sparse)
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "mask_ptr": "*u8", "table_ptr": "*i32", "nallowed_ptr": "*i32",
                "init_ptr": "*i64", "src_idx": "*i64", "src_cost": "*fp32", "dst_idx": "*i64", "dst_cost": "*fp32",
                "qpos_ptr": "*i64", "nbr_ptr": "*i64"}  # fmt: skip
        per_thread = v.block * cb / (32 * v.warps)
        trips = [math.ceil(P * P * C / cb)]
        kernels = [("iterate", st._iterate_kernel), ("init", st._init_kernel)]
    out = []
    for role, fn in kernels:
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
        out.append((role, fn, sig, consts, v.warps, per_thread, trips))
    return out


def attend_specs(dtype: str = "bf16", index: str = "i32"):
    """``[(name, fn, signature, constexprs, warps)]``: every attention kernel and mode, for
    features of ``dtype`` and indices of ``index`` (``"i32"``, ``"i64"``), with the tiles a GPU
    launches for 64 channels."""
    import triton.language as tl

    from psal.backends.triton import attend as ta

    ints = {"C", "H", "W", "Hk", "Wk", "K", "P", "N", "M", "longest"}
    feats = {"q", "k", "v", "g", "src", "kf"}
    acc = "fp64" if dtype == "fp64" else "fp32"
    variants: list = [(ta._costs, dict(DOT=dot, SPARSE=sparse)) for dot in (False, True) for sparse in (False, True)]
    variants += [(ta._votes, dict(PATCH=patch, SPARSE=sparse)) for patch in (False, True) for sparse in (False, True)]
    variants += [(ta._score_grad, dict(WEIGHTED=w, MEAN=m)) for w, m in ((False, False), (True, False), (False, True))]
    variants += [(ta._query_grad, dict(DOT=dot)) for dot in (False, True)]
    variants += [(kern, dict(MODE=mode, SHIFT=mode == 0, MEAN=False)) for kern in (ta._scatter, ta._gather) for mode in (0, 1, 2)]
    variants += [(kern, dict(MODE=0, SHIFT=False, MEAN=True)) for kern in (ta._scatter, ta._gather)]
    tiles = dict(ta._tiles(1 << 20, 64))
    warps = tiles.pop("num_warps")
    out = []
    gather_tiles = dict(ta._tiles(1 << 20, 64, cb_max=8))
    gather_tiles.pop("num_warps")
    for fn, flags in variants:
        consts = dict(flags, ACC=tl.float64 if dtype == "fp64" else tl.float32, **(gather_tiles if fn is ta._gather else tiles))
        pointers = {"idx": index, "order": index, "rowptr": index, "listed": "i64", "tab": "i64"}
        # Gradients and outputs in the features' dtype; the gather's accumulation and the
        # atomics' destination are float32 maps (dst of _scatter), the rest per-match floats.
        own = feats | ({"dst"} if fn is ta._gather else set()) | ({"out"} if fn in (ta._votes, ta._query_grad) else set())
        sig = {n: "constexpr" if n in consts else "i32" if n in ints else "*" + pointers[n] if n in pointers
               else "*" + dtype if n in own else "*" + acc for n in fn.arg_names}  # fmt: skip
        label = fn.__name__ + "(" + ",".join(f"{k}={int(v)}" for k, v in flags.items()) + ")"
        out.append((label, fn, sig, consts, warps))
    return out


def per_candidate(sass: list, loop, trips: list) -> float | None:
    """Dynamic SASS per candidate: the cost loop's trips and each enclosing loop's own body, up to
    (not including) the loop over candidates, every trip run; None when the nesting is shallower."""
    chain = [loop, *parents(sass, loop)]
    if len(chain) < len(trips) + 1:
        return None
    dyn = float(len(body(sass, chain[0])))
    for i, n in enumerate(trips):
        # The enclosing loop's own instructions, once per trip of it, around n trips of this one;
        # the last enclosing loop is the one over candidates: its own body is per-candidate work.
        own = len(body(sass, chain[i + 1])) - len(body(sass, chain[i]))
        dyn = own + n * dyn
    return dyn


def candidates_per_iteration(K: int, size: int) -> int:
    """Candidates a pixel is offered per iteration: 4 directions x 4 jump steps x k, and k x
    log2 windows of random search."""
    return 16 * K + K * size.bit_length()


def analyse_search(variant: str, problem: str) -> dict:
    dt, C, P, K, size = PROBLEMS[problem]
    res: dict = {"variant": variant, "problem": problem, "kernels": {}}
    for role, fn, sig, consts, warps, per_thread, trips in search_specs(variant, dt, C, P, K):
        t = time.perf_counter()
        k = compile_triton(fn, sig, consts, warps)
        entry = {
            "regs": k.regs, "spill_stores": k.spill_stores, "spill_loads": k.spill_loads, "stack": k.stack,
            "shared": k.shared, "warps_per_block": warps, "warps_per_sm": k.warps_per_sm, "sass": len(k.sass),
            "compile_s": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        lp = cost_loop(k.sass)
        if lp is not None:
            m = mix(body(k.sass, lp))
            entry["loop"] = m
            entry["values_per_trip"] = per_thread
            entry["per_value"] = m["total"] / per_thread
            entry["per_candidate"] = per_candidate(k.sass, lp, trips)
        res["kernels"][role] = entry
    it = res["kernels"]["iterate"]
    if it.get("per_candidate"):
        v = _variant(variant)
        pixels_per_warp = v.block / v.warps
        warp_ins = candidates_per_iteration(K, size) * (size * size / pixels_per_warp) * it["per_candidate"]
        res["issue_ms_per_iter"] = warp_ins / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3
        res["estimate_ms_per_iter"] = res["issue_ms_per_iter"] * (MODEL_A + MODEL_B / it["warps_per_sm"])
    return res


def _variant(name):
    from psal.backends.triton import search as ts

    return ts.parse_variant(name)


def analyse_attend() -> list:
    out = []
    for label, fn, sig, consts, warps in attend_specs():
        k = compile_triton(fn, sig, consts, warps)
        inner = [lp for lp in loops(k.sass) if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops(k.sass))]
        biggest = max(inner, key=lambda lp: len(body(k.sass, lp)), default=None)
        entry = {"kernel": label, "regs": k.regs, "spill_stores": k.spill_stores, "stack": k.stack, "warps_per_block": warps,
                 "warps_per_sm": k.warps_per_sm, "sass": len(k.sass), "loop_ldl_stl": local_memory_in_loops(k.sass)}  # fmt: skip
        if biggest is not None:
            entry["loop"] = mix(body(k.sass, biggest))
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# The authors' kernels.


def _site_packages_cuda() -> Path | None:
    """The CUDA 13 tree that PyPI's nvidia-cuda-nvcc installs (``nvidia/cu13``), if any."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []) or []:
        cand = Path(root) / "cu13"
        if (cand / "bin" / "nvcc").is_file():
            return cand
    return None


def nvcc_command() -> tuple[list, list] | None:
    """``(nvcc, include flags)``: PyPI's CUDA 13 (the ``kernels`` extra) or one on the PATH."""
    tree = _site_packages_cuda()
    if tree is not None:
        return [str(tree / "bin" / "nvcc")], [f"-I{tree / 'include'}", f"-I{tree / 'include' / 'cccl'}"]
    nvcc = shutil.which("nvcc")
    return ([nvcc], []) if nvcc else None


def build_peer(peer: Path, cache: Path, log=print) -> Path:
    """The authors' ``src/patchmatch.cu`` compiled unchanged for sm_90 into a cached cubin."""
    import sysconfig

    import torch.utils.cpp_extension as ext

    src = peer / "src" / "patchmatch.cu"
    digest = hashlib.sha256(src.read_bytes() + (peer / "src" / "patchmatch.h").read_bytes()).hexdigest()[:16]
    out = cache / f"ncherel-patchmatch-sm90-{digest}.cubin"
    if out.is_file():
        return out
    cmd = nvcc_command()
    if cmd is None:
        raise RuntimeError('no nvcc: pip install "psal[kernels]" (CUDA 13.0 from PyPI) or put nvcc on the PATH')
    nvcc, inc = cmd
    cache.mkdir(parents=True, exist_ok=True)
    flags = ["-arch=sm_90", "-O3", "-cubin", "-std=c++17", "-DTORCH_EXTENSION_NAME=peer", "-w"]
    flags += inc + [f"-I{p}" for p in ext.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    log(f"building the authors' kernels for sm_90 (about a minute): {' '.join(nvcc)} {' '.join(flags[:5])} ...")
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run([*nvcc, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed: {(proc.stderr or proc.stdout).strip()[-600:]}")
    tmp.rename(out)
    return out


def analyse_peer(cubin: Path) -> dict:
    """Registers, stack and the cost loop of the authors' ``float, PSZ = 7`` kernels."""
    tools = triton_tools()
    data = cubin.read_bytes()
    funcs = functions_sass(data)
    usage = subprocess.run([tools["cuobjdump"], "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    res = {}
    for role, pattern in (
        ("propagation", "11propagationIfLi7E"),
        ("random_search", "13random_searchIfLi7E"),
        ("init", "20initialise_shift_mapIfLi7E"),
    ):
        name = next((n for n in funcs if pattern in n), None)
        if name is None:
            continue
        sass = funcs[name]
        m = re.search(re.escape(name) + r":\s*\n\s*REG:(\d+) STACK:(\d+)", usage)
        entry = {"function": name[:60], "regs": int(m.group(1)) if m else None, "stack": int(m.group(2)) if m else None, "sass": len(sass)}
        lp = cost_loop(sass)
        if lp is not None:
            mx = mix(body(sass, lp))
            entry["loop"] = mx
            entry["values_per_trip"] = mx["FFMA"]
            entry["per_value"] = mx["total"] / mx["FFMA"]
        res[role] = entry
    return res


# ----------------------------------------------------------------------------------------------
# The check of the estimate against the H200 timings.


def spearman(a, b) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa = math.sqrt(sum((x - ma) ** 2 for x in ra))
    sb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (sa * sb) if sa and sb else float("nan")


def validate(measured: Path, log=print) -> dict:
    """The estimate and plain figures of the twelve tile shapes, against their H200 timings."""
    runs = json.loads(measured.read_text())["sections"]["tune"]["search"]
    rows = []
    for run in runs:
        b, cb, w = run["config"]
        name = f"tiles-{b}x{cb}x{w}"
        res = analyse_search(name, "rgb")
        it = res["kernels"]["iterate"]
        rows.append({
            "variant": name, "measured_ms_10it": run["rgb512_p7_k3_it10_ms"], "estimate_ms_per_iter": res.get("estimate_ms_per_iter"),
            "issue_ms_per_iter": res.get("issue_ms_per_iter"), "per_value": it.get("per_value"), "regs": it["regs"],
            "warps_per_sm": it["warps_per_sm"], "spills": it["spill_stores"] + it["spill_loads"],
        })  # fmt: skip
        log(f"  validate {name}: {rows[-1]}")
    ms = [r["measured_ms_10it"] for r in rows]
    rho = {
        key: spearman([r[key] for r in rows], ms)
        for key in ("estimate_ms_per_iter", "issue_ms_per_iter", "per_value", "regs", "warps_per_sm")
    }
    ratio = sorted(r["measured_ms_10it"] / 10 / r["estimate_ms_per_iter"] for r in rows)
    return {"source": str(measured.name), "rows": rows, "spearman": rho, "measured_over_estimate_median": ratio[len(ratio) // 2]}


# ----------------------------------------------------------------------------------------------


def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def search_table(results: list) -> str:
    rows = []
    for r in results:
        for role, k in r["kernels"].items():
            lp = k.get("loop", {})
            rows.append([
                r["variant"], r["problem"], role, k["regs"], f"{k['spill_stores']}/{k['spill_loads']}", k["stack"], k["warps_per_sm"],
                k["sass"], lp.get("total", "–"), f"{lp.get('int', '–')}/{lp.get('fp', '–')}/{lp.get('mem', '–')}/{lp.get('other', '–')}",
                _fmt(k.get("values_per_trip")), _fmt(k.get("per_value")), _fmt(k.get("per_candidate"), 4) if role == "iterate" else "",
                _fmt(r.get("estimate_ms_per_iter")) if role == "iterate" else "",
            ])  # fmt: skip
    header = ["variant", "problem", "kernel", "regs", "spill st/ld B", "stack B", "warps/SM", "SASS", "cost loop", "int/fp/mem/other",
              "values/trip", "instr/value", "SASS/candidate", "est. ms/iter"]  # fmt: skip
    return common.markdown_table(header, rows)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m psal.bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variants", nargs="+", default=None, help="search variants (default: all of psal.backends.triton.search.ALL_VARIANTS)"
    )
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--peer", default=None, help="a copy of ncherel-psal (default: peers/ncherel-psal or ../shared/peers/ncherel-psal)")
    ap.add_argument(
        "--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "psal", "kernels"), help="where the authors' cubin is kept"
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the authors' kernels")
    ap.add_argument("--no-attend", action="store_true", help="skip the attention kernels")
    ap.add_argument("--no-validate", action="store_true", help="skip the check of the estimate against the H200 timings")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--dry-run", action="store_true", help="the default variant on rgb, no attention, no validation: checks the command")
    args = ap.parse_args(argv)
    if args.dry_run:
        from psal.backends.triton import search as ts

        args.variants = args.variants or [ts.TUNED["small"]]
        args.problems, args.no_attend, args.no_validate = ["rgb"], True, True
    return args


def _peer_dir(arg) -> Path | None:
    root = Path(__file__).resolve().parents[3]
    for cand in [Path(arg)] if arg else [root / "peers" / "ncherel-psal", root.parent / "shared" / "peers" / "ncherel-psal"]:
        if (cand / "src" / "patchmatch.cu").is_file():
            return cand
    return None


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter never compiles: run the report in a process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run(
            [sys.executable, "-m", "psal.bench", "kernels", *(sys.argv[1:] if argv is None else argv)], env=env
        ).returncode
    from psal.backends.triton import search as ts

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    print(common.environment(), flush=True)
    import triton

    out: dict = {"triton": triton.__version__, "target": "cuda sm_90", "search": [], "attend": [], "peer": None}
    variants = args.variants or list(ts.ALL_VARIANTS)
    for problem in args.problems:
        for v in variants:
            log(f"compiling {v} on {problem}")
            out["search"].append(analyse_search(v, problem))
    print("\n**Search kernels** (sm_90, Triton " + triton.__version__ + "); cost loop: instructions per trip, int/fp/mem/other; "
          "instr/value: thread-instructions per patch value; SASS/candidate: every trip run; est.: issue bound x (0.9 + 12 / warps per SM), rgb\n")  # fmt: skip
    print(search_table(out["search"]))
    if not args.no_attend:
        log("compiling the attention kernels")
        out["attend"] = analyse_attend()
        rows = [[a["kernel"], a["regs"], a["spill_stores"], a["stack"], a["warps_per_sm"], a["sass"], a.get("loop", {}).get("total", "–"),
                 "{int}/{fp}/{mem}/{other}".format(**a["loop"]) if "loop" in a else "–", a["loop_ldl_stl"]] for a in out["attend"]]  # fmt: skip
        print("\n**Attention kernels** (bf16, C = 64 tiles)\n")
        print(
            common.markdown_table(
                ["kernel", "regs", "spill B", "stack B", "warps/SM", "SASS", "largest inner loop", "int/fp/mem/other", "LDL/STL in loops"],
                rows,
            )
        )
    peer = None if args.no_peer else _peer_dir(args.peer)
    if peer is not None:
        try:
            out["peer"] = analyse_peer(build_peer(peer, Path(args.cache), log))
        except (RuntimeError, OSError) as exc:
            out["peer"] = {"error": str(exc)}
            log(f"authors' kernels skipped: {exc}")
    if out["peer"] and "error" not in out["peer"]:
        rows = []
        for role, e in out["peer"].items():
            lp = e.get("loop", {})
            rows.append([role, e["regs"], e["stack"], e["sass"], lp.get("total", "–"), f"{lp.get('int')}/{lp.get('fp')}/{lp.get('mem')}/{lp.get('other')}",
                         e.get("values_per_trip", "–"), _fmt(e.get("per_value"))])  # fmt: skip
        print("\n**The authors' kernels** (ncherel/psal patchmatch.cu, float, PSZ = 7, nvcc -arch=sm_90 -O3)\n")
        print(
            common.markdown_table(
                ["kernel", "regs", "stack B", "SASS", "cost loop", "int/fp/mem/other", "values/trip", "instr/value"], rows
            )
        )
    if not args.no_validate and MEASURED.is_file():
        log("checking the estimate against the H200 tile timings")
        out["validation"] = val = validate(MEASURED, log)
        print(
            f"\n**The estimate against the H200** ({val['source']}, 12 tile shapes, rgb 10 iterations): Spearman rank correlation with the measured ms\n"
        )
        print(common.markdown_table(["figure", "rho"], [[k, f"{v:+.2f}"] for k, v in val["spearman"].items()]))
        print(f"\nmeasured / estimate (median over the shapes): {val['measured_over_estimate_median']:.2f}")
    if args.json:
        from psal.images import write_json

        write_json(args.json, {"environment": common.environment_dict(), "args": vars(args), "results": out})
    ours = next((r for r in out["search"] if r["problem"] == "rgb" and r["variant"] == ts.TUNED["small"]), None)
    if ours is None:
        ours = next((r for r in out["search"] if r["problem"] == "rgb"), None)
    mine = ours["kernels"]["iterate"].get("per_value") if ours else None
    theirs = (out["peer"] or {}).get("propagation", {}).get("per_value") if out["peer"] and "error" not in out["peer"] else None
    print(
        f"\ncost loop: psal {_fmt(mine)} instr/value, authors {_fmt(theirs)} instr/value, "
        f"ratio {_fmt(mine / theirs) if mine and theirs else '–'}"
    )
    return 0
