# `make test` and `make train` create the environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# installed --no-deps: its metadata pulls torchvision and a CUDA torch (see pyproject.toml)
STREAMING := mosaicml-streaming==0.13.0
# pytest workers: CI and dev machines have 2 cores
JOBS ?= 2

.PHONY: env test bench train clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(STREAMING)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --durations=15

bench: $(STAMP)
	$(PY) benchmarks/bench_scans.py
	$(PY) benchmarks/bench_window_attention.py
	$(PY) benchmarks/bench_mixers.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_loader.py

train: $(STAMP)
	@echo "make train: the training loop is not built yet (issue 4: pretraining on DeepSpeed)." >&2
	@exit 2

clean:
	rm -rf $(VENV)
