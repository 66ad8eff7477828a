"""model.config.transformer_twin: the Llama-style twin of a hybrid, same width and depth."""
import pytest
import torch

from model import HybridLM, get_preset, transformer_twin


@pytest.mark.parametrize("name,params,twin_params", [("samba-421m", 421_793_280, 388_929_024),
                                                     ("samba-1.3b", 1_330_207_488, 1_220_431_104)])
def test_twin_of_samba_keeps_width_and_depth_and_is_within_ten_percent(name, params, twin_params):
    cfg = get_preset(name)
    twin = transformer_twin(cfg)
    assert set(twin.pattern) <= {"*", "-", "|"}
    assert twin.n_sublayers == cfg.n_sublayers and twin.d_model == cfg.d_model
    assert [k == "mlp" for k in twin.layer_types] == [k == "mlp" for k in cfg.layer_types]
    assert (twin.attn, twin.mlp_hidden, twin.vocab_size) == (cfg.attn, cfg.mlp_hidden, cfg.vocab_size)
    with torch.device("meta"):            # full-size shapes, no memory
        n_hybrid, n_twin = HybridLM(cfg).num_parameters(), HybridLM(twin).num_parameters()
    # the counts the docstring of transformer_twin quotes
    assert (n_hybrid, n_twin) == (params, twin_params)
    assert 0.9 < n_twin / n_hybrid < 0.95


def test_twin_keeps_stage_marks():
    cfg = get_preset("tiny").replace(pattern="M-G-|S-R-*-")
    assert transformer_twin(cfg).pattern == "*-*-|*-*-*-"
