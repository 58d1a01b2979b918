"""Backend choice, in one place: explainable, size-aware, and `import psal` needs nothing but torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import psal
from psal import _dispatch


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_auto_picks_numba_on_cpu_and_torch_elsewhere():
    for op in ("search", "attend"):
        assert _dispatch.choose("f", op, "auto", torch.device("cpu")).__name__ == f"psal.backends.numba.{op}"
        assert _dispatch.choose("f", op, "auto", torch.device("meta")).__name__ == f"psal.backends.torch.{op}"


def test_auto_keeps_numba_on_cpu_even_when_triton_can_interpret():
    with_interpreter = "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
    code = (
        with_interpreter
        + "import torch\nfrom psal import _dispatch\nprint(_dispatch.choose('f', 'attend', 'auto', torch.device('cpu')).__name__)"
    )
    out = _python(code)
    assert out.stdout.strip() == "psal.backends.numba.attend", out.stderr


def test_auto_picks_triton_on_cuda():
    pytest.importorskip("triton")
    # The choice needs no GPU: it depends on the device type, the sizes and whether triton imports.
    cuda = torch.device("cuda")
    assert _dispatch.choose("f", "attend", "auto", cuda).__name__ == "psal.backends.triton.attend"
    assert _dispatch.choose("f", "search", "auto", cuda).__name__ == "psal.backends.triton.search"
    assert psal.available_backends("cuda")["triton"] is None


def test_auto_falls_back_when_a_problem_is_too_large_for_triton():
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    # k * H * W of 2**31 or more: Triton's int32 positions cannot hold it, torch can.
    big = _dispatch.positions(8, 1 << 14, 1 << 14, 16, 16, 3)
    assert big >= 2**31
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legitimate fallback, not a missing package: no warning
        assert _dispatch.choose("f", "attend", "auto", cuda, big).__name__ == "psal.backends.torch.attend"
    with pytest.raises(
        ValueError, match=r"psal.attend: backend 'triton' needs k \* H \* W, the padded map sizes and C \* H \* W below 2\*\*31"
    ):
        _dispatch.choose("psal.attend", "attend", "triton", cuda, big)
    # the padded key map counts too
    assert _dispatch.positions(1, 4, 4, 1 << 16, 1 << 15, 3) >= 2**31


def test_auto_falls_back_to_torch_on_cuda_without_triton():
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, psal\n"
        "from psal import _dispatch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = _dispatch.choose('f', 'attend', 'auto', torch.device('cuda'))\n"
        "print(m.__name__, any('triton is not installed' in str(x.message) for x in w))\n"
    )
    out = _python(code)
    assert out.stdout.split() == ["psal.backends.torch.attend", "True"], out.stderr


def test_available_backends_says_why_not():
    verdicts = psal.available_backends("meta")
    assert verdicts["torch"] is None
    assert "CPU tensors only" in verdicts["numba"]
    assert psal.available_backends("cpu")["numba"] is None
    code = "import psal; print(psal.available_backends('cpu')['triton'])"
    out = _python(code, TRITON_INTERPRET="0")
    assert "runs on CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr
    out = _python("import sys; sys.modules['triton'] = None\n" + code, TRITON_INTERPRET="1")
    assert "needs the triton package" in out.stdout, out.stderr


def test_the_old_name_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="use psal.available_backends"):
        assert psal.explain_search_backend("meta") == psal.available_backends("meta")
    assert "explain_search_backend" not in psal.__all__


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match=r"f: backend must be one of 'auto', 'numba', 'triton', 'torch', got 'cuda'"):
        _dispatch.choose("f", "search", "cuda", torch.device("cpu"))


def test_import_and_search_without_numba():
    code = (
        "import sys, warnings\n"
        "sys.modules['numba'] = None\n"  # makes `import numba` fail
        "import torch, psal\n"
        "assert 'numba' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    f = psal.patchmatch(torch.rand(1, 3, 9, 9), torch.rand(1, 3, 9, 9))\n"
        "assert f.indices.shape == (1, 1, 3, 9, 9)\n"
        "assert any('numba is not installed' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_psal_loads_neither_numba_nor_triton():
    out = _python("import sys, psal; print('numba' in sys.modules, 'triton' in sys.modules)")
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_public_api():
    assert set(psal.__all__) >= {"patchmatch", "exact_knn", "patch_costs", "KNNField"}


def test_numba_kernels_load_from_the_disk_cache_in_a_new_process():
    """This process compiles (or loads) the search kernels into numba's cache, wherever numba
    keeps it for the package; a new process must then load both from disk, compiling nothing.
    (Compiling into an empty cache first would cost a minute of CPU: the package's own cache
    serves, as it serves users.)"""
    from psal.backends.numba import kernels as m

    psal.patchmatch(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), backend="numba")
    assert m.search_init.signatures and m.search_iterate.signatures
    code = (
        "import torch, psal\n"
        "from psal.backends.numba import kernels as m\n"
        "psal.patchmatch(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), backend='numba')\n"
        "ks = (m.search_init, m.search_iterate)\n"
        "print(sum(k.stats.cache_misses.get(s, 0) for k in ks for s in k.signatures),"
        " sum(k.stats.cache_hits.get(s, 0) for k in ks for s in k.signatures))\n"
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr
    warm = [int(x) for x in run.stdout.split()]
    assert warm == [0, 2], f"a new process should load both kernels from disk, got misses/hits {warm}"


def test_no_backend_imports_the_dispatcher_or_another_engine():
    """The layers run one way: backends import only ``layout``, ``device``, ``rng`` and their own
    engine's modules, never the dispatcher, the public layer or another engine."""
    import pathlib
    import re

    root = pathlib.Path(psal.__file__).parent / "backends"
    engines = {"torch", "numba", "triton"}
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^from \.\.+(_dispatch|_ops|functional|nn|_checks)\b", text, re.M), path
        assert not re.search(r"^from \.\.\.", text, re.M), path  # nothing above psal.backends
        own = path.parent.name if path.parent != root else None
        for other in engines - {own}:
            assert not re.search(rf"^from \.\.?{other}\b", text, re.M), f"{path} imports the {other} engine"


def test_the_command_line_and_the_service_share_the_task_layer_not_each_other():
    """``psal.serve`` and ``psal.cli`` both import ``psal.tasks``; the service never imports the
    command line (the command line starts the service: ``psal serve``), the task layer imports
    neither, and each layer below imports none above it (apps, then the library)."""
    import pathlib
    import re

    pkg = pathlib.Path(psal.__file__).parent
    above = ("apps", "tasks", "cli", "serve", "bench", "examples")
    rules = {"serve": ("cli",), "tasks": ("cli", "serve"), "apps": above[1:]}
    # the library below the picture tools imports none of the layers above it
    rules.update({name: above for name in ("backends", "functional.py", "nn.py", "_ops.py", "_dispatch.py", "_checks.py", "images.py")})
    for folder, banned in rules.items():
        for path in [pkg / folder] if folder.endswith(".py") else (pkg / folder).rglob("*.py"):
            text = path.read_text()
            for other in banned:
                pattern = rf"^\s*(from psal\.{other}\b|from \.+{other}\b|import psal\.{other}\b|from (psal|\.+) import {other}\b)"
                assert not re.search(pattern, text, re.M), f"{path.relative_to(pkg)} imports psal.{other}"
    assert re.search(r"^from psal import tasks", (pkg / "serve" / "app.py").read_text(), re.M)
    assert re.search(r"^from \.\. import tasks", (pkg / "cli" / "main.py").read_text(), re.M)


def test_docstring_examples_run():
    import doctest

    import psal.functional
    import psal.nn

    for module, at_least in ((psal.functional, 15), (psal.nn, 4), (_dispatch, 1)):
        result = doctest.testmod(module, extraglobs={"torch": torch, "psal": psal})
        assert result.attempted >= at_least and result.failed == 0, module.__name__
