"""Configs: presets as documented, and every broken rule gives one line naming the field."""
import pytest
import torch

from model import PRESETS, ConfigError, HybridLM, ModelConfig, get_preset, parse_pattern, pattern_stages


def test_pattern_parsing_and_stages():
    assert parse_pattern("M-S-") == ["mamba", "mlp", "swa", "mlp"]
    assert parse_pattern("MG*R|-S") == ["mamba", "gla", "attention", "rglru", "mlp", "swa"]
    assert pattern_stages("M-|S-|R") == [[0, 1], [2, 3], [4]]
    assert pattern_stages("M-S-") == [[0, 1, 2, 3]]


@pytest.mark.parametrize("changes, field", [
    (dict(pattern="M-X-"), "model.pattern"),
    (dict(pattern=""), "model.pattern"),
    (dict(pattern="|M-"), "model.pattern"),
    (dict(pattern="M-||S-"), "model.pattern"),
    (dict(pattern="S-", attn=dict(n_heads=5)), "model.attn.n_heads"),
    (dict(pattern="S-", attn=dict(n_heads=4, n_kv_heads=3)), "model.attn.n_kv_heads"),
    (dict(pattern="S-", attn=dict(window=0)), "model.attn.window"),
    (dict(pattern="S-", attn=dict(window=-4)), "model.attn.window"),
    (dict(pattern="M-", mamba=dict(version=3)), "model.mamba.version"),
    (dict(pattern="M-", mamba=dict(version=2, head_dim=48)), "model.mamba.head_dim"),
    (dict(pattern="M-", mamba=dict(version=2, head_dim=64, n_groups=3)), "model.mamba.n_groups"),
    (dict(pattern="M-", mamba=dict(dt_min=0.2, dt_max=0.1)), "model.mamba.dt_min"),
    (dict(pattern="G-", gla=dict(n_heads=3)), "model.gla"),
    (dict(pattern="R-", rglru=dict(n_heads=5)), "model.rglru.n_heads"),
    (dict(d_model=0), "model.d_model"),
    (dict(kernels="fast"), "model.kernels"),
    (dict(mlp_activation="gelu"), "model.mlp_activation"),
    (dict(pattern="*-", attn=dict(head_dim=15)), "model.attn.head_dim"),
])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        get_preset("tiny").replace(**changes)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_attention_without_rope_takes_odd_head_dims():
    cfg = get_preset("tiny").replace(pattern="*-", attn=dict(head_dim=15, rope=False))
    assert cfg.head_dim == 15 and not cfg.attn.rope


def test_unknown_keys_and_presets():
    with pytest.raises(ConfigError, match="model: unknown key.*d_modle"):
        ModelConfig.from_dict({"preset": "tiny", "d_modle": 64})
    with pytest.raises(ConfigError, match="model.attn: unknown key.*heads"):
        ModelConfig.from_dict({"preset": "tiny", "attn": {"heads": 4}})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_dict({"preset": "samba-7b"})


def test_from_dict_merges_preset_and_overrides():
    cfg = ModelConfig.from_dict({"preset": "samba-421m", "attn": {"window": 512}, "vocab_size": 4096})
    assert cfg.attn.window == 512 and cfg.attn.n_heads == 12 and cfg.vocab_size == 4096
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_tiny_uses_every_sublayer_kind():
    assert set(get_preset("tiny").layer_types) == {"mamba", "gla", "swa", "attention", "rglru", "mlp"}


@pytest.mark.parametrize("name, expected", [("samba-421m", 421e6), ("samba-1.3b", 1.3e9)])
def test_samba_presets_have_the_published_size(name, expected):
    cfg = get_preset(name)
    with torch.device("meta"):
        n = HybridLM(cfg).num_parameters()
    assert abs(n - expected) / expected < 0.05, n
    assert cfg.pattern.count("M") == cfg.pattern.count("S") and cfg.dt_rank == -(-cfg.d_model // 16)
    assert cfg.attn.window == 2048 and cfg.head_dim == 128 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings


def test_presets_build():
    assert set(PRESETS) == {"tiny", "samba-421m", "samba-1.3b", "griffin", "mamba2-hybrid", "nemotron-h"}
    griffin = get_preset("griffin")
    assert griffin.pattern.startswith("R-R-S-") and griffin.n_kv_heads == 1
    hybrid = get_preset("mamba2-hybrid")
    assert hybrid.mamba.version == 2 and hybrid.pattern.count("M") > 3 * hybrid.pattern.count("*")
    nemotron = get_preset("nemotron-h")
    assert nemotron.mamba.version == 2 and not nemotron.attn.rope and nemotron.mlp_activation == "relu2"
    assert not nemotron.tie_embeddings
