# One venv for everything; torch==2.13.0 first (a looser pin would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo selfcheck bench bench-train lint format clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	HAF_REQUIRE_CPP=$${HAF_REQUIRE_CPP:-0} $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Whole test suite (Triton kernels run under the CPU interpreter).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra

## Main job: the demo training run on the bundled synthetic preference data.
demo: $(STAMP)
	$(PY) -m training.demo

## Loss on random data with every available backend: backend, loss, peak memory.
selfcheck: $(STAMP)
	$(PY) -m haf_kernels.selfcheck

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py --preset cpu

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/lint-imports

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info haf_kernels/_C*.so
