# `make test` and `make train` create the environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# installed --no-deps: its metadata pulls torchvision and a CUDA torch (see pyproject.toml)
STREAMING := mosaicml-streaming==0.13.0
# pytest workers: CI and dev machines have 2 cores
JOBS ?= 2

.PHONY: env slurm test bench train experiments clean

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

train: $(STAMP) $(TINY_DATA)
	$(VENV)/bin/braid train configs/tiny.yaml

# the small-scale reproduction of the hybrids' headline behaviours (experiments/RESULTS.md); PRESET=smoke|cpu|gpu
PRESET ?= cpu
experiments: $(STAMP)
	$(PY) -m experiments.hybrids --preset $(PRESET)

clean:
	rm -rf $(VENV)
