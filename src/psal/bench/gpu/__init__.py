"""The GPU check: one command that proves, times and tunes the Triton backend on a GPU.

    python -m psal.bench gpu OUT_DIR                 # on a CUDA machine (make gpu-check)
    python -m psal.bench gpu OUT_DIR --dry-run       # anywhere: tiny sizes, CPU, no tests

It runs from the checkout (``PYTHONPATH=src``), needs nothing beyond torch, triton, pillow and
(for the tests) pytest and hypothesis, and writes ``OUT_DIR/gpu_check.json`` (rewritten after every
section, so a run cut short keeps what it measured) and ``OUT_DIR/gpu_check.md`` (the tables it
prints last). Sections, in the order they run:

- ``tests``: the CUDA test selection (the contract suite's CUDA cases and the Triton test files),
  in a subprocess, in parallel with pytest-xdist where it is installed; log in ``tests.log``.
- ``variants``: the search variants of ``psal.backends.triton.search.VARIANTS`` compiled first,
  in parallel worker processes, then timed on the two problems (512² RGB, p = 7, k = 3, 5
  iterations; 512² 64-channel bfloat16, p = 3, k = 4, 5 iterations); the key-side gradient paths
  of the attention (gather, atomic) timed on the layer. The rule (:func:`.variants.choose`): the
  fastest variant of each problem class whose field is the reference's, the fastest key-side path
  whose peak memory stays at most the gather's; both are used by the sections that follow and
  recorded (``sections.variants.chosen``), as the ``TUNED`` line to commit.
- ``search``: 512² RGB, p = 7, k = 3, 1/2/5/10 iterations: median time and the mean cost of the
  interior pixels (per patch value, as the authors' harness reports it) against the exact k-NN.
- ``precision``: float16/bfloat16 errors (output and every gradient) of the Triton backend against
  float64, next to plain PyTorch computing in the same precision.
- ``race``: 100 backward passes: the atomic path (the default) stays within tolerance, the
  gather path (the one ``torch.use_deterministic_algorithms(True)`` takes) is bitwise equal
  every time.
- ``peer``: the authors' CUDA extension (github.com/ncherel/psal) on the same inputs, when
  ``--peer DIR`` (default ``peers/ncherel-psal``, a git-ignored copy) holds it: its harness
  ``bench_ncherel.py`` JIT-builds it (in the background, from the start of the run); its search
  and its ``PSAttention`` are then timed here, in the same way as ours, and its costs are checked
  against ``psal.patch_costs``.
- ``layer``: :class:`psal.PSAttention` forward + backward (C = 64, p = 3, k = 4, 5 iterations,
  bf16) at 128² ... 2048² (``--layer-sizes``; last, as the longest), beside ``scaled_dot_product_attention`` with the flash and cuDNN
  backends (bf16, one head, d = 64) on the same features, with peak memory. Sizes above
  ``--sdpa-max`` are extrapolated for SDPA from the largest measured one (time as N², memory
  as N) and marked so.

Features for the search are the authors' two test images when the peer folder is there (the
harness's inputs), else scikit-image's astronaut and coffee; the layer's features are a fixed
random 3 -> 64 convolution of the same images, resized.

The package: :mod:`.driver` (options, the run, the order of sections), :mod:`.measure` (inputs,
timing, memory), :mod:`.sections` (tests, search, layer, precision, race), :mod:`.variants`,
:mod:`.peer`, and :mod:`.report` (the tables, from the results alone).
"""

from __future__ import annotations

from .driver import main, parse

__all__ = ["main", "parse"]
