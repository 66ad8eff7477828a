"""Initialisation schemes (`model.init`): `samba` draws every parameter kind as microsoft/Samba trains
(lit_gpt/model.py `_init_weights` with `mamba_init`), `normal` is the earlier N(0, init_std) scheme."""
import math

import pytest
import torch

from model import HybridLM, get_preset
from model.config import ConfigError


def kaiming_std(fan_in: int) -> float:
    """PyTorch's default Linear init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(3 * fan_in)


def test_samba_scale_at_samba_421m():
    # the numbers the Samba code gives at samba-421m (d 1536, d_inner 3072, mlp 4096, 12 blocks = 24 sublayers)
    cfg = get_preset("samba-421m")
    assert cfg.init == "samba" and get_preset("samba-1.3b").init == "samba"
    depth = math.sqrt(cfg.n_sublayers)
    assert kaiming_std(1536) == pytest.approx(0.0147, abs=1e-4)              # q/k/v, in_proj, gate/up
    assert kaiming_std(1536) / depth == pytest.approx(0.0030, abs=1e-4)      # o_proj
    assert kaiming_std(3072) / depth == pytest.approx(0.0021, abs=1e-4)      # Mamba out_proj
    assert kaiming_std(4096) / depth == pytest.approx(0.0018, abs=1e-4)      # MLP down_proj


def test_samba_init_std_of_every_parameter_kind():
    # samba-421m's structure (M-S- x 6 = 24 sublayers, 128-dim heads) at width 256, so it builds in a second
    torch.manual_seed(0)
    cfg = get_preset("samba-421m").replace(vocab_size=1024, d_model=256, mlp_hidden=640, attn={"n_heads": 2})
    lm = HybridLM(cfg)
    d, d_inner, n = cfg.d_model, cfg.d_inner, cfg.n_sublayers
    depth = math.sqrt(n)
    expected = {   # parameter name (after "layers.N.mixer.") -> (std, uniform bound or None)
        "in_proj.weight": kaiming_std(d), "x_proj.weight": kaiming_std(d_inner),
        "out_proj.weight": kaiming_std(d_inner) / depth,
        "dt_proj.weight": cfg.dt_rank ** -0.5 / math.sqrt(3),
        "conv1d.weight": kaiming_std(cfg.mamba.d_conv), "conv1d.bias": kaiming_std(cfg.mamba.d_conv),
        "q_proj.weight": kaiming_std(d), "k_proj.weight": kaiming_std(d), "v_proj.weight": kaiming_std(d),
        "o_proj.weight": kaiming_std(cfg.attn.n_heads * cfg.head_dim) / depth,
        "gate_proj.weight": kaiming_std(d), "up_proj.weight": kaiming_std(d),
        "down_proj.weight": kaiming_std(cfg.mlp_hidden) / depth,
    }
    seen = set()
    for name, p in lm.named_parameters():
        kind = name.split(".mixer.", 1)[-1]
        if kind in expected:
            seen.add(kind)
            std = expected[kind]
            assert p.std().item() == pytest.approx(std, rel=0.05), name
            assert p.abs().max().item() <= std * math.sqrt(3) * (1 + 1e-6), name      # uniform, not normal
            assert abs(p.mean().item()) < 0.05 * std + 3 * std / math.sqrt(p.numel()), name
        elif kind == "A_log":
            assert torch.equal(p, torch.log(torch.arange(1, 17.0)).expand_as(p)), name
        elif kind == "D" or name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif kind == "dt_proj.bias":           # softplus(bias) = dt, log-uniform in [dt_min, dt_max]
            dt = torch.nn.functional.softplus(p)
            assert dt.min() >= cfg.mamba.dt_min * 0.999 and dt.max() <= cfg.mamba.dt_max * 1.001, name
            assert dt.log().mean().item() == pytest.approx(
                (math.log(cfg.mamba.dt_min) + math.log(cfg.mamba.dt_max)) / 2, abs=0.3)
        elif name == "embed.weight":
            assert p.std().item() == pytest.approx(cfg.init_std, rel=0.02) and lm.lm_head.weight is p
        else:
            raise AssertionError(f"{name}: a parameter kind this test does not know")
    assert seen == set(expected)


def test_normal_init_is_the_earlier_scheme():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    assert cfg.init == "normal"
    lm = HybridLM(cfg)
    out_std = cfg.init_std / math.sqrt(cfg.n_sublayers)
    for name, p in lm.named_parameters():
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "linear_out.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.1), name
        elif name.endswith(("q_proj.weight", "in_proj.weight", "gate_proj.weight", "embed.weight")):
            assert p.std().item() == pytest.approx(cfg.init_std, rel=0.05), name
    # samba init on the same preset draws other values, and both schemes reset the same parameter set
    torch.manual_seed(0)
    samba = HybridLM(cfg.replace(init="samba"))
    assert samba.layers[0].mixer.in_proj.weight.std() > 2 * lm.layers[0].mixer.in_proj.weight.std()


def test_bad_init_names_the_field():
    with pytest.raises(ConfigError, match=r"^model.init='xavier': must be one of normal, samba$"):
        get_preset("tiny").replace(init="xavier")
