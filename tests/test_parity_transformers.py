"""Our mixers against implementations nobody here wrote: `transformers`' Mamba, Mamba-2 and RecurrentGemma.

Weights are copied across by name (our parameter names follow theirs) and both run
the same float32 input; outputs and input gradients must agree to 1e-4.
"""
import pytest
import torch
from transformers import MambaConfig as HFMambaConfig
from transformers import Mamba2Config as HFMamba2Config
from transformers import RecurrentGemmaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock

from model import ModelConfig
from model.layers import Mamba, Mamba2, RecurrentBlock
from model.layers.common import LinearSpec
from model.sequence import sequence_info


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours, theirs_forward, d_model, length):
    x = torch.randn(2, length, d_model, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = ours(x, sequence_info((2, length), x.device))
    y_ref = theirs_forward(x_ref)
    assert rel_err(y, y_ref) < 1e-4
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_err(x.grad, x_ref.grad) < 1e-4


@pytest.mark.parametrize("length", [1, 37, 130])
def test_mamba1_matches_transformers_torch_path(length):
    cfg = ModelConfig(d_model=64, pattern="M", mamba=dict(version=1, d_state=16, d_conv=4, expand=2, chunk_size=16))
    ours = Mamba(cfg, LinearSpec())
    hf = MambaMixer(HFMambaConfig(hidden_size=64, state_size=16, conv_kernel=4, expand=2, time_step_rank=cfg.dt_rank,
                                  use_bias=False, use_conv_bias=True, hidden_act="silu", use_mambapy=False), layer_idx=0)
    with torch.no_grad():   # random, not init, values so every parameter matters
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.load_state_dict(ours.state_dict())
    compare(ours, hf, 64, length)          # transformers 5: one forward, its PyTorch path without mamba_ssm


@pytest.mark.parametrize("length", [1, 45, 100])
def test_mamba2_matches_transformers_torch_path(length):
    # transformers normalises over the whole d_inner; mamba_ssm (and we) per group: equal at n_groups=1
    cfg = ModelConfig(d_model=64, pattern="M", mamba=dict(version=2, d_state=16, head_dim=16, n_groups=1, chunk_size=16))
    ours = Mamba2(cfg, LinearSpec())
    hf = Mamba2Mixer(HFMamba2Config(hidden_size=64, num_heads=cfg.mamba2_heads, head_dim=16, state_size=16, expand=2,
                                    n_groups=1, conv_kernel=4, use_bias=False, use_conv_bias=True, chunk_size=16,
                                    layer_norm_epsilon=1e-5, time_step_limit=(0.0, float("inf"))), layer_idx=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.load_state_dict(ours.state_dict())
    compare(ours, hf, 64, length)


@pytest.mark.parametrize("length", [1, 50])
def test_rglru_block_matches_recurrent_gemma(length):
    cfg = ModelConfig(d_model=64, pattern="R", rglru=dict(n_heads=4, d_conv=4))
    ours = RecurrentBlock(cfg, LinearSpec())
    hf = RecurrentGemmaRecurrentBlock(RecurrentGemmaConfig(hidden_size=64, lru_width=64, num_attention_heads=4,
                                                           conv1d_width=4, hidden_activation="gelu_pytorch_tanh"),
                                      layer_idx=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.load_state_dict(ours.state_dict())
    positions = torch.arange(length).expand(2, length)
    compare(ours, lambda x: hf(x, positions, None, use_cache=False)[0], 64, length)   # (output, None)
