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

from conftest import SMALL_PRESETS, small_preset
from conversion.checkpoint import load_training_checkpoint
from conversion.hf import from_hf, load_hf_folder, read_hf_folder, remote_code, to_hf
from model import HybridLM, ModelConfig
from model.generation import generate
from pretrain.checkpoint import save_weights_only
from test_train import ROOT, braid_train, losses, torchrun, write_config


def weights_checkpoint(run_dir, cfg: ModelConfig, seed=0) -> dict:
    """A run directory whose latest checkpoint holds a random HybridLM(cfg); returns its state dict."""
    torch.manual_seed(seed)
    model = HybridLM(cfg)
    with torch.no_grad():                       # away from the init, so a dropped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    save_weights_only(str(run_dir), [state], cfg.to_dict(), {"tp": 1, "pp": 1}, source="test")
    return state


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---- remote code, logits and generation, every preset --------------------------------------

def test_remote_code_imports_only_torch_and_its_own_files():
    files = remote_code()
    assert {"configuration_braid.py", "modeling_braid.py", "braid_hybrid.py", "braid_cache.py"} <= set(files)
    from transformers.dynamic_module_utils import get_imports, get_relative_imports
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        for name in files:
            path = os.path.join(tmp, name)
            assert set(get_imports(path)) <= {"torch", "transformers", "math", "dataclasses", "functools",
                                              "importlib", "warnings", "typing", "collections", "__future__",
                                              "re", "contextlib", "os"}, name
            for module in get_relative_imports(path):
                assert module + ".py" in files, (name, module)
        # the model file names every module, so transformers copies them all into its cache
        assert set(get_relative_imports(os.path.join(tmp, "modeling_braid.py"))) >= {
            n.removesuffix(".py") for n in files if n.startswith("braid_")}


@pytest.mark.parametrize("preset", sorted(SMALL_PRESETS))
def test_hf_logits_and_greedy_generation_equal_braid(tmp_path, preset):
    cfg = small_preset(preset, vocab_size=64)
    weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    model = hf_model(tmp_path / "hf")
    native, _ = load_hf_folder(str(tmp_path / "hf"))
    native.eval()
    assert type(model).__name__ == "BraidForCausalLM" and model.dtype == torch.float32

    tokens = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        theirs, ours = model(tokens).logits, native(tokens)
    assert (theirs - ours).abs().max().item() < 1e-5

    # greedy, 64 new tokens, prompts of two lengths (left padding): far past the window of 8
    prompts = [torch.randint(2, 64, (12,)).tolist(), torch.randint(2, 64, (5,)).tolist()]
    ids = torch.tensor([prompts[0], [1] * 7 + prompts[1]])
    mask = torch.tensor([[1] * 12, [0] * 7 + [1] * 5])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                         pad_token_id=1, eos_token_id=None)
    expected = generate(native, prompts, 64)
    assert out[:, 12:].tolist() == expected


def test_generation_cache_is_constant_without_full_attention(tmp_path):
    cfg = small_preset("samba-421m", vocab_size=64)                # M-S- only: no growing layer
    weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    model = hf_model(tmp_path / "hf")
    sizes = []
    for new in (16, 96):
        out = model.generate(input_ids=torch.randint(0, 64, (1, 20)), max_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=1)
        assert type(out.past_key_values).__name__ == "HybridCache"
        sizes.append(out.past_key_values.nbytes())
    assert sizes[0] == sizes[1] > 0


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
    assert config["layer_types"] == ModelConfig.from_dict(config["braid"]).layer_types
    assert config["torch_dtype"] == "bfloat16" and config["training"]["step"] == 3
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
    model = hf_model(hf)
    assert model.dtype == torch.float32        # transformers' default; torch_dtype="auto" gives bf16
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


def test_transformers_version_is_the_pinned_one():
    import transformers
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert f'"transformers=={transformers.__version__}"' in pyproject


def test_beam_search_reorders_the_hybrid_cache(tmp_path):
    cfg = small_preset("tiny", vocab_size=64)
    weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    model = hf_model(tmp_path / "hf")
    ids = torch.randint(2, 64, (2, 10))
    kwargs = dict(input_ids=ids, num_beams=3, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)
    with_cache = model.generate(**kwargs)
    recomputed = model.generate(**kwargs, use_cache=False)            # every step from scratch: no cache to reorder
    assert with_cache.tolist() == recomputed.tolist()
