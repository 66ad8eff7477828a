# `make test` and `make train` create the environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# installed --no-deps: its metadata pulls torchvision and a CUDA torch (see pyproject.toml)
STREAMING := mosaicml-streaming==0.13.0
# pytest workers: CI and dev machines have 2 cores
JOBS ?= 2

.PHONY: env slurm test test-kernels kernels bench train smoke clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(STREAMING)
	touch $(STAMP)

# A real Slurm for tests/test_launch_slurm.py: Debian 12's Slurm 22.05 packages, downloaded and extracted
# here (never installed; tests/slurm_cluster.py runs the daemons from this folder). Once; `apt-get update`
# only when the package lists lack them.
SLURM_DIR := .cache/slurm
SLURM_STAMP := $(SLURM_DIR)/.extracted
SLURM_DEBS := slurmctld slurmd slurm-client slurm-wlm-basic-plugins libhwloc15

slurm: $(SLURM_STAMP)

$(SLURM_STAMP):
	rm -rf $(SLURM_DIR) && mkdir -p $(SLURM_DIR)/debs
	cd $(SLURM_DIR)/debs && { apt-get download $(SLURM_DEBS) || { apt-get update -qq && apt-get download $(SLURM_DEBS); }; }
	for deb in $(SLURM_DIR)/debs/*.deb; do dpkg-deb -x "$$deb" $(SLURM_DIR)/root || exit 1; done
	rm -rf $(SLURM_DIR)/debs
	touch $@

test: $(STAMP) $(SLURM_STAMP)
	$(PY) -m pytest -q -n $(JOBS) --durations=15

# The `cuda` extra on a machine without nvcc or a GPU: Triton, fla-core, and the CUDA C++ libraries'
# Python parts (their extension builds skipped; tests/kernel_standins.py stands in for the extensions).
# --no-build-isolation: the sdists build against the installed torch instead of downloading one.
KERNELS_STAMP := $(VENV)/.kernels
NO_CUDA_BUILD := MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
	MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE

kernels: $(KERNELS_STAMP)

$(KERNELS_STAMP): $(STAMP)
	$(NO_CUDA_BUILD) $(PY) -m pip install -q --no-build-isolation -e ".[cuda]"
	touch $(KERNELS_STAMP)

# Braid's blocks on packed rows through every fast path, on CPU: Triton kernels under the interpreter
test-kernels: $(KERNELS_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m kernels tests/test_kernels.py --durations=10

bench: $(STAMP) data/tiny/braid_data.json
	$(PY) benchmarks/bench_scans.py
	$(PY) benchmarks/bench_window_attention.py
	$(PY) benchmarks/bench_mixers.py
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/parallel_memory.py
	$(PY) benchmarks/bench_train_loop.py
	$(PY) benchmarks/bench_decode.py --models samba-tiny tiny

# the bundled corpus -> tokenizer -> shards, only when the shards are missing
TINY_DATA := data/tiny/braid_data.json

$(TINY_DATA): | $(STAMP)
	$(VENV)/bin/braid data tokenizer configs/data/tiny.yaml
	$(VENV)/bin/braid data prepare configs/data/tiny.yaml

# configs/tiny.yaml as written (800 steps); TRAIN_ARGS adds key=value overrides, e.g.
#   make train TRAIN_ARGS="run_dir=runs/short train.max_steps=20"
TRAIN_ARGS ?=

train: $(STAMP) $(TINY_DATA)
	$(VENV)/bin/braid train configs/tiny.yaml $(TRAIN_ARGS)

# The main job in a short form (CI runs it after the tests): data -> SMOKE_STEPS training steps ->
# to-hf -> transformers generates -> an eval suite on the folder (.ci/smoke)
SMOKE_STEPS ?= 20

smoke: $(STAMP)
	SMOKE_STEPS=$(SMOKE_STEPS) .ci/smoke

clean:
	rm -rf $(VENV)
