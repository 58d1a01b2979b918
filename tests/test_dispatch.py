"""Backend choice: explainable, and `import psal` needs nothing but torch."""

from __future__ import annotations

import subprocess
import sys

import torch

import psal
from psal import _dispatch


def test_auto_picks_numba_on_cpu():
    assert _dispatch.search_backend("f", "auto", torch.device("cpu")).__name__ == "psal.backends.numba_cpu"
    assert _dispatch.search_backend("f", "auto", torch.device("meta")).__name__ == "psal.backends.reference"


def test_explain_says_why():
    verdicts = _dispatch.explain_search_backend(torch.device("meta"))
    assert verdicts["torch"] is None
    assert "CPU tensors only" in verdicts["numba"]


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_psal_import_does_not_load_numba():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, psal; print('numba' in sys.modules)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_public_api():
    assert set(psal.__all__) >= {"patchmatch", "exact_knn", "patch_costs", "KNNField"}


def test_numba_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    code = (
        "import torch, psal\n"
        "from psal.backends import numba_cpu as m\n"
        "psal.patchmatch(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), backend='numba')\n"
        "print(sum(k.stats.cache_misses.get(s, 0) for k in (m._init, m._iterate) for s in k.signatures),"
        " sum(k.stats.cache_hits.get(s, 0) for k in (m._init, m._iterate) for s in k.signatures))\n"
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    cold = [int(x) for x in runs[0].stdout.split()]
    warm = [int(x) for x in runs[1].stdout.split()]
    assert cold[0] == 2, f"first process should compile both kernels, got misses/hits {cold}"
    assert warm == [0, 2], f"second process should load both kernels from disk, got misses/hits {warm}"


def test_docstring_examples_run():
    import doctest

    import psal.functional
    import psal.nn

    for module, at_least in ((psal.functional, 15), (psal.nn, 4), (_dispatch, 1)):
        result = doctest.testmod(module, extraglobs={"torch": torch, "psal": psal})
        assert result.attempted >= at_least and result.failed == 0, module.__name__
