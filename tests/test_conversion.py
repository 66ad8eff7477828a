"""`braid convert`: training checkpoints <-> Hugging Face folders.

Round trips are bitwise; the exported folder loads with transformers' AutoModelForCausalLM
(remote code, no Braid import needed) and computes Braid's logits and greedy tokens; Mamba-only
patterns export to transformers' own MambaForCausalLM; a from-hf checkpoint continues training
at another TP/PP with the same first loss.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import small_preset
from conversion.checkpoint import load_training_checkpoint
from conversion.hf import from_hf, read_hf_folder, to_hf
from model import HybridLM, ModelConfig
from test_hf_remote import hf_model, weights_checkpoint
from test_train import ROOT, braid_train, losses, torchrun, write_config


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---- round trips ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """A 3-step single-process run (vocabulary 512, so the test tokenizer fits)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp, shards, max_steps=3)
    out = braid_train(config, "model.vocab_size=512")
    assert out.returncode == 0, out.stdout[-2000:]
    return str(tmp / "run")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 4)], ids=["single", "tp2xpp2"])
def test_checkpoint_to_hf_to_checkpoint_is_bitwise(tmp_path, shards, layout):
    tp, pp, nproc = layout
    config = write_config(tmp_path, shards, max_steps=2)
    out = (torchrun(config, nproc, f"parallel.tp={tp}", f"parallel.pp={pp}") if nproc > 1 else braid_train(config))
    assert out.returncode == 0, out.stderr[-3000:]
    run = str(tmp_path / "run")
    original, cfg, _ = load_training_checkpoint(run)
    to_hf(run, str(tmp_path / "hf"), progress=False)
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.lm_head.weight" not in stored                      # tied: stored once
    for back_tp, back_pp in dict.fromkeys([(tp, pp), (1, 1), (2, 1)]):
        dest = tmp_path / f"back-{back_tp}-{back_pp}"
        from_hf(str(tmp_path / "hf"), str(dest), tp=back_tp, pp=back_pp)
        state, back_cfg, info = load_training_checkpoint(str(dest))
        assert back_cfg == cfg and info["layout"] == {"tp": back_tp, "pp": back_pp} and info["weights_only"]
        assert_bitwise(state, original)
    to_hf(str(tmp_path / "back-2-1"), str(tmp_path / "hf-again"), progress=False)
    assert_bitwise(load_file(str(tmp_path / "hf-again" / "model.safetensors")), stored)


@pytest.mark.slow
def test_from_hf_continues_training_at_another_layout_with_the_same_first_loss(tmp_path, shards, trained):
    to_hf(trained, str(tmp_path / "hf"), progress=False)
    first = {}
    for tp, pp, nproc in ((1, 1, 1), (2, 2, 4)):
        run = tmp_path / f"run-{tp}x{pp}"
        from_hf(str(tmp_path / "hf"), str(run), tp=tp, pp=pp)
        (tmp_path / f"cfg-{tp}x{pp}").mkdir()
        config = write_config(tmp_path / f"cfg-{tp}x{pp}", shards, max_steps=1)
        overrides = [f"run_dir={run}", "model.vocab_size=512", f"parallel.tp={tp}", f"parallel.pp={pp}"]
        out = torchrun(config, nproc, *overrides) if nproc > 1 else braid_train(config, *overrides)
        assert out.returncode == 0, out.stderr[-3000:]
        first[(tp, pp)] = losses(str(run))[1]
    # the loss of the converted weights on the first batch, computed here
    state, cfg, _ = load_training_checkpoint(trained)
    model = HybridLM(cfg)
    model.load_state_dict(state)
    from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader
    loader = build_train_loader(LoaderConfig(streams=[StreamSource(path=shards, proportion=None)], seq_len=32,
                                             batch_size=2, seed=0), dp_rank=0, dp_world_size=1)
    batch = next(loader.batches())
    with torch.no_grad():
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                     ignore_index=-100).item()
    assert abs(first[(1, 1)] - expected) < 1e-5 * expected
    assert abs(first[(2, 2)] - expected) < 1e-5 * expected

    # the model in the training config must be the converted one; the TP split must be the run's
    run = tmp_path / "run-1x1"
    from_hf(str(tmp_path / "hf"), str(run), overwrite=True)
    out = braid_train(config, f"run_dir={run}", "model.vocab_size=512", "model.mlp_hidden=128")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith("was converted for model.mlp_hidden=96, this run's config "
                                                        "has model.mlp_hidden=128")
    out = torchrun(config, 2, f"run_dir={run}", "model.vocab_size=512", "parallel.tp=2")
    assert out.returncode != 0 and "holds weights split for tp=1, this run has tp=2" in out.stderr


# ---- the folder: files, card, tokenizer, dtype, sharding ---------------------------------------

@pytest.mark.slow
def test_folder_contents_tokenizer_and_model_card(tmp_path, trained, eval_tokenizer_path):
    cli = [sys.executable, "-m", "launch.cli", "convert", "to-hf", trained, str(tmp_path / "hf"), "--dtype", "bf16",
           "--tokenizer", eval_tokenizer_path, "--max-shard-size", "100KB"]
    out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "bfloat16" in out.stdout and "trust_remote_code=True" in out.stdout
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "braid" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_braid.BraidForCausalLM"
    assert config["sublayer_kinds"] == ModelConfig.from_dict(config["braid"]).layer_types
    assert "layer_types" not in config          # transformers 5 checks that name against its own layer kinds
    assert config["dtype"] == "bfloat16" and config["training"]["step"] == 3
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((hf / f).is_file() for f in files)
    assert all(t.dtype == torch.bfloat16 for f in files for t in load_file(str(hf / f)).values())
    card = (hf / "README.md").read_text()
    assert "M-G-S-R-*-" in card and "parameters" in card and "tokens seen" in card and "max_steps: 3" in card

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf))
    text = "the quick brown fox 123"
    assert tok(text)["input_ids"] == __import__("tokenizers").Tokenizer.from_file(eval_tokenizer_path).encode(
        text).ids
    model = hf_model(hf, dtype=torch.float32)  # the default dtype is each version's (test_hf_remote.py)
    state, _, _ = load_training_checkpoint(trained)
    assert torch.equal(model.model.embed.weight, state["embed.weight"].bfloat16().float())


# ---- native Mamba ----------------------------------------------------------------------------

def test_mamba_format_loads_in_transformers_mamba_and_comes_back(tmp_path):
    from transformers import MambaForCausalLM
    cfg = small_preset("tiny", vocab_size=64, pattern="MMM", d_model=32)
    original = weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), fmt="mamba", progress=False)
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "hf"))
    theirs = MambaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    native = HybridLM(cfg).eval()
    native.load_state_dict(original)
    tokens = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert (theirs(tokens).logits - native(tokens)).abs().max().item() < 1e-5
    from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    state, back_cfg, _ = load_training_checkpoint(str(tmp_path / "back"))
    assert back_cfg.pattern == "MMM"
    assert_bitwise(state, original)

    with pytest.raises(ValueError, match=r"--format mamba needs a pattern of Mamba-1 mixers only .* pattern 'M-S-'"):
        weights_checkpoint(tmp_path / "hybrid", small_preset("tiny", vocab_size=64, pattern="M-S-"))
        to_hf(str(tmp_path / "hybrid"), str(tmp_path / "nope"), fmt="mamba", progress=False)
    assert not (tmp_path / "nope").exists()


# ---- safety ----------------------------------------------------------------------------------

def test_failures_leave_nothing_and_errors_name_the_tensor(tmp_path, monkeypatch):
    cfg = small_preset("tiny", vocab_size=64)
    weights_checkpoint(tmp_path / "run", cfg)
    import conversion.hf as hf

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf, "_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["run"]                      # no OUT_DIR, no staging folder
    monkeypatch.undo()

    to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out"), progress=False)

    weights = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.2.mixer.q_proj.weight"] = torch.zeros(3, 5)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"tensor layers\.2\.mixer\.q_proj\.weight has shape \(3, 5\), "
                                         r"the model config expects \(\d+, \d+\)"):
        read_hf_folder(str(tmp_path / "out"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        from_hf(str(tmp_path / "out"), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        read_hf_folder(str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        to_hf(str(tmp_path / "nothing"), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match=r"model.vocab_size=64 is not divisible by tensor-parallel size"):
        to_hf(str(tmp_path / "run"), str(tmp_path / "out2"), progress=False)
        from_hf(str(tmp_path / "out2"), str(tmp_path / "back"), tp=3)


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.cli", "convert", "to-hf", str(tmp_path / "missing"),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("braid: error: ") and "neither a checkpoint" in out.stderr
