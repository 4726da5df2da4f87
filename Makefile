# fxport developer commands. Every target creates .venv on first use (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fxport-installed
# pytest worker count is left at 1: the CI machine has 2 cores and torch uses both.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: setup test test-cpu test-triton demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch must come first, or a dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,hf,gguf]'
	touch $(STAMP)

setup: $(STAMP)

# CPU tests, then the Triton kernels under the interpreter in their own process
# (TRITON_INTERPRET must be set before triton is imported).
test: setup test-cpu test-triton

test-cpu: setup
	$(PYTEST) tests --ignore=tests/triton

test-triton: setup
	TRITON_INTERPRET=1 $(PYTEST) tests/triton

demo: setup
	$(PY) -m fxport.cli demo

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(PY) -m compileall -q passes kernels lowering models quant runtime debug cli.py

clean:
	rm -rf $(VENV) build *.egg-info fxport_dumps
