# Two commands from nothing: `make demo` and `make test`. Each creates .venv, installs the pinned
# CPU build of torch and the package with what the job needs, then runs the job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: setup demo test lint docs bench bench-knn bench-attention gpu-check kernels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras, remade when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[$*]"
	@touch $@

setup: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(BIN)/psal demo --out out

# One pytest worker per core (pytest-xdist); PYTEST_ARGS=-n0 runs them in one process.
PYTEST_ARGS ?= -n auto
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format, the whole tree) and mypy (src/psal), configured in pyproject.toml; the type
# checker sees the test extra's packages (torch, starlette) too.
lint: $(VENV)/.installed-test,lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The API reference from the docstrings, in out/docs (open out/docs/index.html); a warning fails it.
docs: $(VENV)/.installed-test,docs
	$(BIN)/sphinx-build -W --keep-going -q -b html docs out/docs

bench: bench-knn bench-attention

bench-knn: $(VENV)/.installed-bench
	$(BIN)/python -m psal.bench knn --sizes 128 256 512

bench-attention: $(VENV)/.installed-bench
	$(BIN)/python -m psal.bench attention --sizes 64 128 256 --repeats 3

# On a CUDA machine, from the checkout, nothing installed (at most 6 minutes): the CUDA tests, every
# search variant and key-side path timed and the fastest kept, search and layer timings against
# SDPA, half-precision errors, repeated backward passes and, when peers/ncherel-psal holds a copy of
# ../shared/peers/ncherel-psal (git-ignored), the authors' CUDA extension.
GPU_OUT ?= out/gpu-check
gpu-check:
	@if [ -d ../shared/peers/ncherel-psal ] && [ ! -d peers/ncherel-psal ]; then mkdir -p peers && cp -r ../shared/peers/ncherel-psal peers/; fi
	PYTHONPATH=src $(PYTHON) -m psal.bench gpu $(GPU_OUT) $(GPU_ARGS)

# Anywhere (no GPU): every Triton kernel compiled for sm_90 and read (registers, spills, the cost
# loop's instructions per patch value), beside the authors' kernels when nvcc is installed
# (pip install ".[kernels]") and ../shared/peers/ncherel-psal is there.
kernels: $(VENV)/.installed-test
	$(BIN)/python -m psal.bench kernels

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
