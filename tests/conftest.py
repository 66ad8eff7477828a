import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
