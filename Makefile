# fxport developer commands. Every target creates .venv on first use (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fxport-installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# The CPU tests run on 2 pytest-xdist workers, one test file each at a time (module fixtures stay
# in one worker): most of their time is single-threaded Python (export, passes, lowering), so two
# workers on a 2-core machine ran the 670 tests in 7 min 13 s wall, 13 min CPU (2026-12-05).
PYTEST_CPU := $(PYTEST) -n 2 --dist loadfile

.PHONY: setup test test-cpu test-triton gpu-smoke gpu-check demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch must come first, or a dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,hf,gguf]'
	touch $(STAMP)

setup: $(STAMP)

# The GPU check's CPU smoke, the CPU tests, then the Triton kernels under the interpreter in
# their own process (TRITON_INTERPRET must be set before triton is imported).
# tests/bench/test_gpu_smoke.py runs the same smoke for plain `pytest tests`; make test has
# already run it as gpu-smoke, so test-cpu leaves it out.
test: setup gpu-smoke test-cpu test-triton

test-cpu: setup
	$(PYTEST_CPU) tests --ignore=tests/triton --ignore=tests/bench/test_gpu_smoke.py

test-triton: setup
	TRITON_INTERPRET=1 $(PYTEST) tests/triton

# bench/gpu_check.py on the CPU: every stage's code path, tiny shapes, Triton interpreter,
# torchao/executorch imports blocked as on the GPU machine. Writes build/gpu-check.md; fails
# unless the split-K, int4 GEMV and decode rows are ok. Figures are not measurements.
gpu-smoke: setup
	TRITON_INTERPRET=1 $(PY) bench/gpu_check.py --smoke --out build --require "split-K,GEMV M=1,tok/s"

# On a GPU machine (no .venv, no setup: its own python with torch/triton, after
# `pip install --no-deps -e .`): the one-shot check, <= 8 min; writes build/gpu-check.md.
# Extra flags: make gpu-check GPU_CHECK_ARGS="--out DIR --stages 2,5 --peak-gbs 4800".
GPU_CHECK_ARGS ?=
gpu-check:
	TRITON_INTERPRET=0 timeout 540 $(PYTHON) bench/gpu_check.py --out build $(GPU_CHECK_ARGS)

demo: setup
	$(PY) -m fxport.cli demo

bench: setup
	@for b in bench/*.py; do [ "$$b" = bench/gpu_check.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(PY) -m compileall -q passes kernels lowering models quant runtime debug builder cli.py contract.py demo.py fileio.py

clean:
	rm -rf $(VENV) build *.egg-info fxport_dumps
