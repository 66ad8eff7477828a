"""pretrain/flops.py: FLOP counts tied to the real modules, the Transformer formula, MFU, device peaks."""
import pytest
import torch
from torch import nn

from model import AttentionConfig, HybridLM, ModelConfig, get_preset
from model.layers import LinearSpec, build_mixer
from pretrain.flops import (DEVICE_PEAK_FLOPS, causal_keys, device_peak_flops, mfu, model_flops_per_token,
                            sublayer_flops)


def _matmul_weights(module: nn.Module) -> int:
    """Multiply-adds per token of a mixer's projections, counted from its parameters."""
    total = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    rg_lru = getattr(module, "rg_lru", None)
    if rg_lru is not None:   # block-diagonal gates: (heads, bw, bw) weights applied as matmuls
        total += rg_lru.input_gate_weight.numel() + rg_lru.recurrent_gate_weight.numel()
    return total


_CASES = [(name, kind) for name in ("tiny", "samba-421m", "griffin", "mamba2-hybrid", "nemotron-h")
          for kind in sorted(set(get_preset(name).layer_types))]


@pytest.mark.parametrize("name,kind", _CASES)
def test_matmul_flops_equal_twice_linear_weights_of_the_real_module(name, kind):
    cfg = get_preset(name)
    with torch.device("meta"):            # full-size shapes, no memory, no init cost
        module = build_mixer(kind, cfg, LinearSpec())
    assert sublayer_flops(cfg, kind, 1024)["matmul"] == 2 * _matmul_weights(module)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_pure_transformer_matches_6n_plus_attention(n_kv_heads):
    d, hidden, vocab, heads, pairs, T = 256, 688, 1000, 8, 4, 512
    cfg = ModelConfig(vocab_size=vocab, d_model=d, pattern="*-" * pairs, mlp_hidden=hidden,
                      attn=AttentionConfig(n_heads=heads, n_kv_heads=n_kv_heads))
    kv = (n_kv_heads or heads) * (d // heads)
    # N: every matmul weight, LM head included (tied to the embedding, which is a free lookup)
    n_matmul = pairs * (d * d + 2 * d * kv + d * d + 3 * d * hidden) + d * vocab
    # causal half with the diagonal: query t attends t + 1 keys -> sum = T (T + 1) / 2,
    # QK^T and PV are 2 FLOPs * d each per key, x3 for training: 6 * (T + 1) * d per layer
    expected = 6 * n_matmul + 6 * pairs * (T + 1) * d
    got = model_flops_per_token(cfg, T, training=True)
    assert got == pytest.approx(expected, rel=1e-9)
    assert model_flops_per_token(cfg, T, training=False) == pytest.approx(expected / 3, rel=1e-12)


def test_causal_keys_is_the_exact_average():
    for T, W in [(1, 4), (5, 8), (8, 8), (20, 8), (33, 1)]:
        assert causal_keys(T, W) == pytest.approx(sum(min(t + 1, W) for t in range(T)) / T)
    assert causal_keys(100) == pytest.approx(50.5)
    assert causal_keys(64, 2048) == causal_keys(64)


def test_window_is_linear_full_is_quadratic_in_seq_len():
    cfg = get_preset("samba-421m").replace(pattern="S*")
    W = cfg.attn.window
    per_seq = lambda kind, T: T * sublayer_flops(cfg, kind, T)["mixer"]     # whole-sequence mixer FLOPs
    lengths = [W, W + 512, W + 1024, W + 1536]
    swa = [per_seq("swa", T) for T in lengths]
    full = [per_seq("attention", T) for T in lengths]
    step = 4 * cfg.attn.n_heads * cfg.head_dim * W * 512          # every extra token sees W keys
    assert all(b - a == pytest.approx(step) for a, b in zip(swa, swa[1:]))
    first = [b - a for a, b in zip(full, full[1:])]
    assert all(b - a == pytest.approx(4 * cfg.attn.n_heads * cfg.head_dim * 512 ** 2) for a, b in zip(first, first[1:]))
    # per token: the window saturates, full attention keeps growing
    assert sublayer_flops(cfg, "swa", 8 * W)["mixer"] < 1.001 * sublayer_flops(cfg, "swa", 64 * W)["mixer"]
    assert sublayer_flops(cfg, "attention", 64 * W)["mixer"] > 7 * sublayer_flops(cfg, "attention", 8 * W)["mixer"]
    assert sublayer_flops(cfg, "swa", W // 2) == sublayer_flops(cfg, "attention", W // 2)


def test_recurrent_mixers_are_linear_in_seq_len_beyond_a_chunk():
    for name in ("tiny", "mamba2-hybrid", "griffin"):
        cfg = get_preset(name)
        for kind in set(cfg.layer_types) - {"swa", "attention"}:
            assert sublayer_flops(cfg, kind, 4096) == sublayer_flops(cfg, kind, 8192), (name, kind)
    with pytest.raises(ValueError, match="unknown sublayer kind 'conv'"):
        sublayer_flops(get_preset("tiny"), "conv", 128)


def test_mfu_arithmetic_and_device_peaks():
    cfg = get_preset("tiny")
    per_token = model_flops_per_token(cfg, 256)
    assert mfu(1e6, cfg, 256, 1e15) == pytest.approx(1e6 * per_token / 1e15)
    assert mfu(2e6, cfg, 256, 1e15) == pytest.approx(2 * mfu(1e6, cfg, 256, 1e15))
    with pytest.raises(ValueError, match="peak_flops=0.0: must be positive"):
        mfu(1.0, cfg, 256, 0.0)
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == DEVICE_PEAK_FLOPS["H100 SXM"] == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA H100 NVL") == DEVICE_PEAK_FLOPS["H100 NVL"]
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == device_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    for unknown in ("cpu", "", "NVIDIA GeForce RTX 4090"):
        assert device_peak_flops(unknown) is None


@pytest.mark.parametrize("name", ["samba-421m", "samba-1.3b"])
def test_samba_is_close_to_6n_plus_window_attention(name):
    cfg, T = get_preset(name), 4096
    with torch.device("meta"):
        n_params = HybridLM(cfg).num_parameters()          # tied: the embedding counted once, as the head
    n_swa = cfg.layer_types.count("swa")
    attention = 3 * n_swa * 4 * cfg.attn.n_heads * cfg.head_dim * causal_keys(T, cfg.attn.window)
    got = model_flops_per_token(cfg, T)
    reference = 6 * n_params + attention
    assert abs(got / reference - 1) < 0.10, (
        f"{name}: {got:.4e} training FLOPs/token at T={T}, 6N + attention = {reference:.4e} (N={n_params:,})")
