# `make test` and `make train` create the environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# installed --no-deps: its metadata pulls torchvision and a CUDA torch (see pyproject.toml); it also declares
# transformers < 5, for modules Braid never imports (data_pipeline/mds.py loads only the MDS parts)
STREAMING := mosaicml-streaming==0.13.0
# pytest workers: CI and dev machines have 2 cores
JOBS ?= 2

.PHONY: env env-hf4 gguf slurm test test-hf4 test-gguf test-kernels kernels bench train smoke experiments clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(STREAMING)
	touch $(STAMP)

# The remote-code export is also tested under transformers 4.57 (the environment above has the newest 5.x):
# a second, small environment with only what tests/test_hf_remote.py imports. Versions as 4.57.6 needs them.
# llama.cpp's converter (make test-gguf) runs here too: llama.cpp pins transformers 4.57.6 for it, and it
# imports sentencepiece.
HF4_VENV := .venv-hf4
HF4_STAMP := $(HF4_VENV)/.installed
HF4_PACKAGES := transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2 safetensors==0.8.0 \
	numpy==2.1.3 pyyaml==6.0.4 tqdm==4.70.1 pytest==9.2.0 sentencepiece==0.2.3

env-hf4: $(HF4_STAMP)

$(HF4_STAMP): Makefile
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/python -m pip install -q torch==2.13.0
	$(HF4_VENV)/bin/python -m pip install -q $(HF4_PACKAGES)
	touch $@

test-hf4: $(HF4_STAMP)
	$(HF4_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_hf_remote.py

# Serving proof on CPU (opt-in, not part of `make test`: the build takes minutes): llama-cpp-python built
# from its source package (llama.cpp compiled here, CPU only), and that package's llama.cpp tree unpacked
# for its converter (convert_hf_to_gguf.py, gguf-py); tests/test_serving_gguf.py then converts native
# exports to GGUF and checks llama.cpp's greedy tokens against Braid's.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_DIR := .cache/llama-cpp
LLAMA_SDIST := $(LLAMA_DIR)/llama_cpp_python-0.3.36.tar.gz
LLAMA_STAMP := $(LLAMA_DIR)/.built
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

gguf: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	mkdir -p $(LLAMA_DIR)
	test -f $(LLAMA_SDIST) || $(PY) -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_DIR) $(LLAMA_CPP_PYTHON)
	tar xzf $(LLAMA_SDIST) -C $(LLAMA_DIR)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install -q $(LLAMA_SDIST)
	touch $@

test-gguf: $(LLAMA_STAMP) $(HF4_STAMP)
	BRAID_REQUIRE_LLAMA_CPP=1 BRAID_GGUF_PYTHON=$(HF4_VENV)/bin/python $(PY) -m pytest -q tests/test_serving_gguf.py

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

# the whole suite (transformers 5.x), then the export's tests again under transformers 4.57
test: $(STAMP) $(SLURM_STAMP) $(HF4_STAMP)
	$(PY) -m pytest -q -n $(JOBS) --durations=15
	$(MAKE) --no-print-directory test-hf4

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

# the small-scale reproduction of the hybrids' headline behaviours (experiments/RESULTS.md); PRESET=smoke|cpu|gpu
PRESET ?= cpu
experiments: $(STAMP)
	$(PY) -m experiments.hybrids --preset $(PRESET)

clean:
	rm -rf $(VENV) $(HF4_VENV)
