import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# remote code that transformers imports goes to a cache of this process's own, not the shared
# ~/.cache/huggingface/modules, where a folder named like another one (`hf`) would share its modules
if not os.environ.get("HF_MODULES_CACHE"):
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="braid-hf-modules-")
torch.set_num_threads(1)   # pytest-xdist runs one worker per core

from model import ModelConfig, get_preset  # noqa: E402

# Each preset's pattern and block settings at a width that runs in milliseconds on CPU.
_SMALL = dict(vocab_size=256, max_seq_len=128)
SMALL_PRESETS = {
    "tiny": dict(attn=dict(window=8), mamba=dict(chunk_size=8), gla=dict(chunk_size=8)),
    "samba-421m": dict(d_model=64, mlp_hidden=96, attn=dict(n_heads=2, window=8), mamba=dict(chunk_size=8)),
    "samba-1.3b": dict(d_model=48, mlp_hidden=64, attn=dict(n_heads=3, window=8), mamba=dict(chunk_size=8)),
    "griffin": dict(d_model=64, mlp_hidden=96, attn=dict(n_heads=4, window=8), rglru=dict(n_heads=4)),
    "mamba2-hybrid": dict(d_model=64, mlp_hidden=96, attn=dict(n_heads=4, n_kv_heads=2),
                          mamba=dict(d_state=16, head_dim=16, n_groups=2, chunk_size=8)),
    "nemotron-h": dict(d_model=64, mlp_hidden=96, attn=dict(n_heads=4, n_kv_heads=2),
                       mamba=dict(d_state=16, head_dim=16, n_groups=2, chunk_size=8)),
}


def small_preset(name: str, **changes) -> ModelConfig:
    """The named preset's pattern and block kinds, shrunk in width (and window) for CPU tests."""
    cfg = get_preset(name).replace(**_SMALL).replace(**SMALL_PRESETS[name])
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """256 MDS rows of 33 counting tokens (two documents each): learnable in a few steps."""
    from data_pipeline.mds import MDSWriter
    out = tmp_path_factory.mktemp("shards") / "train"
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16", "doc_starts": "ndarray:int32"}) as writer:
        for _ in range(256):
            start = rng.integers(0, 256)      # counting sequences: learnable in a few steps
            writer.write({"tokens": ((start + np.arange(33)) % 256).astype(np.uint16),
                          "doc_starts": np.array([0, 17], dtype=np.int32)})
    return str(out)


# ---- several ranks as separate processes (gloo), torchrun-like environment ----------------

_ports_given: set[int] = set()


def free_port() -> int:
    """A free port, never the same twice (jobs launched together have not bound theirs yet)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def launch_ranks(script: str, world: int, argument: str,
                 rank_env: Callable[[int], dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """`python script argument` once per rank, with RANK, WORLD_SIZE, MASTER_ADDR/PORT set
    (LOCAL_RANK only if `rank_env` sets it)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": REPO, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(var, None)
        env.update(rank_env(rank) if rank_env else {})
        procs.append(subprocess.Popen([sys.executable, script, argument], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    """Each rank's output once all exited 0. Every rank's pipe is drained at once (a rank blocked on a
    full pipe cannot stall the others), and a failure reports every rank's exit code and output tail:
    the rank that crashed first is often not rank 0, whose own error is then a closed connection."""
    from concurrent.futures import ThreadPoolExecutor

    def collect(proc: subprocess.Popen) -> str:
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()[0] + f"\n[killed after {timeout} s]"

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs = list(pool.map(collect, procs))
        failed = [r for r, proc in enumerate(procs) if proc.returncode != 0]
        assert not failed, "\n".join(f"--- rank {r} exited {procs[r].returncode}:\n{outputs[r][-3000:]}"
                                      for r in range(len(procs)))
        return outputs
    finally:
        for proc in procs:          # the other ranks of a failed job would wait for it
            if proc.poll() is None:
                proc.kill()


@pytest.fixture
def tiny_overrides(shards):
    """`key=value` overrides that shrink configs/tiny.yaml to seconds on CPU, on the `shards` data."""
    def overrides(run_dir: str, changes: dict | None = None) -> list[str]:
        values = {"run_dir": run_dir, "data.train": f"[{shards}]", "data.val": "null", "data.seq_len": 32,
                  "data.micro_batch": 2, "model.vocab_size": 256, "model.d_model": 64, "model.mlp_hidden": 96,
                  "model.attn.window": 8, "model.gla.chunk_size": 8, "train.log_every": 1, "train.val_every": 0,
                  "logging.tensorboard": "false", **(changes or {})}
        return [f"{key}={value}" for key, value in values.items()]
    return overrides


# ---- a model under evaluation: a small byte-level BPE and a small hybrid with its vocabulary ----

_EVAL_TEXT_WORDS = ("the quick brown fox jumps over a lazy dog while grass is green and sky is blue here "
                    "there we go again pass key number name phone value variable word answer what is").split()


@pytest.fixture(scope="session")
def eval_tokenizer_path(tmp_path_factory) -> str:
    """A 512-token byte-level BPE (ids 0/1: <|endoftext|>/<|pad|>) trained in a second on generated text."""
    from data_pipeline.tokenizer import train_bpe
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(_EVAL_TEXT_WORDS, 40)) + f" {rng.integers(0, 10**6)}." for _ in range(2000)]
    tok = train_bpe(texts, 512, ["<|endoftext|>", "<|pad|>"])
    path = str(tmp_path_factory.mktemp("eval_tokenizer") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture
def eval_model(eval_tokenizer_path):
    """An EvalModel: the tiny preset (every sublayer kind, window 8) with random weights and that tokenizer."""
    from data_pipeline.tokenizer import load_tokenizer
    from evals.common import EvalModel
    from model import HybridLM
    model = HybridLM(small_preset("tiny", vocab_size=512, max_seq_len=4096)).eval()
    return EvalModel(model=model, tokenizer=load_tokenizer(eval_tokenizer_path), eos_id=0, train_length=64,
                     provenance={"model": "random tiny (test)", "kind": "test", "tokenizer": eval_tokenizer_path})
