"""The remote-code export (`braid convert to-hf`, format braid) under the running transformers.

`make test` runs this file twice: in the project's environment (the newest transformers 5.x) and in
`.venv-hf4` (`make test-hf4`: transformers 4.57, torch and the few libraries these tests import), so
an exported folder loads, computes Braid's logits, generates with its own cache (one token per forward
after the prompt), beam-searches, batches left-padded prompts and survives save_pretrained on both.
"""
import os
import re

import pytest
import torch
import transformers

from conftest import REPO, SMALL_PRESETS, small_preset
from conversion.hf import load_hf_folder, remote_code, to_hf
from model import HybridLM, ModelConfig
from model.generation import generate
from pretrain.checkpoint import save_weights_only

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


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


def hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kwargs).eval()


def exported(tmp_path, cfg: ModelConfig, **to_hf_args):
    weights_checkpoint(tmp_path / "run", cfg)
    to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False, **to_hf_args)
    native, _ = load_hf_folder(str(tmp_path / "hf"))
    return tmp_path / "hf", native.eval()


def forward_lengths(model) -> list[int]:
    """The input length of every forward of the wrapped HybridLM from now on."""
    lengths = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    return lengths


def test_transformers_version_is_a_pinned_one():
    """The project's environment runs pyproject.toml's pin, .venv-hf4 the Makefile's."""
    pins = re.findall(r'"transformers==([\w.]+)"', open(os.path.join(REPO, "pyproject.toml")).read())
    pins += re.findall(r"transformers==([\w.]+)", open(os.path.join(REPO, "Makefile")).read())
    assert transformers.__version__ in pins and len(set(pins)) == 2


def test_remote_code_imports_only_torch_and_its_own_files(tmp_path):
    files = remote_code()
    assert {"configuration_braid.py", "modeling_braid.py", "braid_hybrid.py", "braid_cache.py"} <= set(files)
    from transformers.dynamic_module_utils import get_imports, get_relative_imports
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        path = str(tmp_path / name)
        assert set(get_imports(path)) <= {"torch", "transformers", "math", "dataclasses", "functools",
                                          "importlib", "warnings", "typing", "collections", "__future__",
                                          "re", "contextlib", "os", "logging"}, name
        for module in get_relative_imports(path):
            assert module + ".py" in files, (name, module)
    # the model file names every module, so transformers copies them all into its cache
    assert set(get_relative_imports(str(tmp_path / "modeling_braid.py"))) >= {
        n.removesuffix(".py") for n in files if n.startswith("braid_")}


@pytest.mark.parametrize("preset", sorted(SMALL_PRESETS))
def test_hf_logits_and_greedy_generation_equal_braid(tmp_path, preset):
    hf, native = exported(tmp_path, small_preset(preset, vocab_size=64))
    model = hf_model(hf)
    assert type(model).__name__ == "BraidForCausalLM" and model.dtype == torch.float32
    config = model.config.to_dict()
    assert "layer_types" not in config and config["sublayer_kinds"] == native.cfg.layer_types

    tokens = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        theirs, ours = model(tokens).logits, native(tokens)
    assert (theirs - ours).abs().max().item() < 1e-5

    # greedy, 64 new tokens, prompts of two lengths (left padding): far past the window of 8;
    # the cache is used: one prefill of the 12 prompt columns, then one token per forward
    prompts = [torch.randint(2, 64, (12,)).tolist(), torch.randint(2, 64, (5,)).tolist()]
    ids = torch.tensor([prompts[0], [1] * 7 + prompts[1]])
    mask = torch.tensor([[1] * 12, [0] * 7 + [1] * 5])
    lengths = forward_lengths(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                         pad_token_id=1, eos_token_id=None)
    assert lengths == [12] + [1] * 63
    assert out[:, 12:].tolist() == generate(native, prompts, 64)


def test_generation_cache_is_constant_without_full_attention(tmp_path):
    hf, _ = exported(tmp_path, small_preset("samba-421m", vocab_size=64))      # M-S- only: no growing layer
    model = hf_model(hf)
    sizes = []
    for new in (16, 96):
        out = model.generate(input_ids=torch.randint(0, 64, (1, 20)), max_new_tokens=new, do_sample=False,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=1)
        cache = out.get("cache", out.get("past_key_values"))
        assert type(cache).__name__ == "HybridCache"
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_beam_search_reorders_the_hybrid_cache(tmp_path):
    hf, _ = exported(tmp_path, small_preset("tiny", vocab_size=64))
    model = hf_model(hf)
    ids = torch.randint(2, 64, (2, 10))
    kwargs = dict(input_ids=ids, num_beams=3, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)
    lengths = forward_lengths(model)
    with_cache = model.generate(**kwargs)
    assert lengths == [10] + [1] * 23
    recomputed = model.generate(**kwargs, use_cache=False)            # every step from scratch: no cache to reorder
    assert with_cache.tolist() == recomputed.tolist()


def test_save_pretrained_folder_loads_and_generates_the_same(tmp_path):
    hf, native = exported(tmp_path, small_preset("tiny", vocab_size=64, tie_embeddings=False))
    hf_model(hf).save_pretrained(str(tmp_path / "saved"))
    assert {"modeling_braid.py", "configuration_braid.py", "braid_hybrid.py"} <= set(os.listdir(tmp_path / "saved"))
    model = hf_model(tmp_path / "saved")
    tokens = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        assert (model(tokens).logits - native(tokens)).abs().max().item() < 1e-5
    out = model.generate(input_ids=tokens[:1, :9], max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
    assert out[:, 9:].tolist() == generate(native, tokens[:1, :9], 20)


def test_bf16_folder_loads_in_the_default_dtype_of_this_version(tmp_path, eval_tokenizer_path):
    """transformers 4.x loads fp32 unless asked; 5.x loads the folder's own dtype ("auto")."""
    hf, native = exported(tmp_path, small_preset("tiny", vocab_size=512), dtype="bf16", tokenizer=eval_tokenizer_path)
    model = hf_model(hf)
    assert model.dtype == (torch.bfloat16 if TRANSFORMERS_5 else torch.float32)
    assert torch.equal(model.model.embed.weight.float(), native.embed.weight.float())
    assert hf_model(hf, dtype=torch.float32).dtype == torch.float32
    # the tokenizer loads beside the config (5.x validates config.json with a generic config too), under a
    # class name 4.x and 5.x both know (5.x would write its own, TokenizersBackend)
    import json
    assert json.loads((hf / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=True)
    text = "the quick brown fox 123"
    from tokenizers import Tokenizer
    assert tok(text)["input_ids"] == Tokenizer.from_file(eval_tokenizer_path).encode(text).ids
    out = model.generate(**tok([text], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                         eos_token_id=None)
    assert out.shape == (1, len(tok(text)["input_ids"]) + 8)
