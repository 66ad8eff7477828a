"""Serving proof on CPU: native exports -> GGUF (llama.cpp's own converter) -> llama.cpp gives Braid's tokens.

Opt-in: `make test-gguf` builds llama-cpp-python from its source package (llama.cpp compiled for this
CPU) and unpacks that package's llama.cpp tree (convert_hf_to_gguf.py, gguf-py) to .cache/llama-cpp/;
then runs this file with BRAID_REQUIRE_LLAMA_CPP=1, so a missing build fails instead of skipping.
Without them (plain `make test`) every test here skips.

Per class: the fp32 export converted to an f32 GGUF (by llama.cpp's converter under transformers
4.57.6, the version llama.cpp pins for it), llama.cpp's greedy continuation of a prompt (its own KV /
recurrent cache in f32, one token per decode) equals Braid's `generate`, its logits are within 1e-4 of
Braid's, and it tokenizes text as the exported tokenizer does. Also pinned down: the two places where
llama.cpp computes something else, which `braid convert to-hf` prints as notes.
"""
import os

import numpy as np
import pytest
import torch

from conftest import REPO, small_preset
from conversion.gguf import convert
from conversion.hf import to_hf
from model import HybridLM
from model.generation import generate
from test_hf_remote import weights_checkpoint

LLAMA_CPP_TREE = os.environ.get("BRAID_LLAMA_CPP") or os.path.join(
    REPO, ".cache", "llama-cpp", "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
# the converter's interpreter: llama.cpp pins transformers 4.57.6 for it (conversion/gguf.py says why)
CONVERTER_PYTHON = os.environ.get("BRAID_GGUF_PYTHON") or os.path.join(REPO, ".venv-hf4", "bin", "python")


def _llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (make test-gguf builds it)"
    if not os.path.isfile(os.path.join(LLAMA_CPP_TREE, "convert_hf_to_gguf.py")):
        return f"no llama.cpp tree at {LLAMA_CPP_TREE} (make test-gguf unpacks it)"
    if not os.path.isfile(CONVERTER_PYTHON):
        return f"no {CONVERTER_PYTHON} for llama.cpp's converter (make env-hf4)"
    return None


MISSING = _llama_cpp_missing()
if MISSING and os.environ.get("BRAID_REQUIRE_LLAMA_CPP"):
    raise RuntimeError(f"BRAID_REQUIRE_LLAMA_CPP is set but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# case -> (model config, the class --format native picks)
CASES = {
    "nemotron-h": (dict(preset="nemotron-h"), "NemotronHForCausalLM"),
    "granite-no-rope": (dict(preset="mamba2-hybrid", pattern="MM*-M*-", attn=dict(rope=False)),
                        "GraniteMoeHybridForCausalLM"),
    "mamba2": (dict(preset="mamba2-hybrid", pattern="MMMM"), "Mamba2ForCausalLM"),
    "mamba": (dict(preset="tiny", pattern="MMMM"), "MambaForCausalLM"),
    "llama": (dict(preset="tiny", pattern="*-*-"), "LlamaForCausalLM"),
    "mistral-inside-window": (dict(preset="tiny", pattern="S-S-", attn=dict(window=64)), "MistralForCausalLM"),
}
PROMPT, NEW = 17, 32


def exported_gguf(tmp_path, cfg, tokenizer: str, scale_qk: float = 1.0):
    """(Braid model, llama.cpp model, class name) of `cfg` with random weights (q/k scaled by `scale_qk`)."""
    from llama_cpp import GGML_TYPE_F32, Llama
    state = weights_checkpoint(tmp_path / "run", cfg)
    if scale_qk != 1.0:                     # larger attention logits: positions then change the output a lot
        state = {k: v * scale_qk if k.endswith(("q_proj.weight", "k_proj.weight")) else v for k, v in state.items()}
        from pretrain.checkpoint import save_weights_only
        save_weights_only(str(tmp_path / "scaled"), [state], cfg.to_dict(), {"tp": 1, "pp": 1}, source="test")
    run = tmp_path / ("scaled" if scale_qk != 1.0 else "run")
    summary = to_hf(str(run), str(tmp_path / "hf"), fmt="native", tokenizer=tokenizer, progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "model.gguf"), LLAMA_CPP_TREE, outtype="f32", python=CONVERTER_PYTHON)
    ours = HybridLM(cfg).eval()
    ours.load_state_dict(state)
    llm = Llama(str(tmp_path / "model.gguf"), n_ctx=128, n_batch=128, n_threads=1, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    return ours, llm, summary


def llama_cpp_greedy(llm, prompt: list[int], new: int) -> list[int]:
    llm.eval(prompt)                                       # one prefill, then one token per decode
    tokens = []
    for _ in range(new):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return tokens


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_generates_braids_greedy_tokens(tmp_path, case, eval_tokenizer_path):
    changes = dict(CASES[case][0])
    cfg = small_preset(changes.pop("preset"), vocab_size=512, **changes)
    ours, llm, summary = exported_gguf(tmp_path, cfg, eval_tokenizer_path)
    assert summary["format"] == CASES[case][1]
    prompt = torch.randint(2, 512, (PROMPT,)).tolist()
    expected = generate(ours, [prompt], NEW)[0]
    assert llama_cpp_greedy(llm, prompt, NEW) == expected
    with torch.no_grad():
        reference = ours(torch.tensor([prompt + expected]))[0].numpy()
    assert np.abs(np.asarray(llm.scores[:PROMPT + NEW]) - reference).max() < 1e-4

    from tokenizers import Tokenizer
    text = "the quick brown fox jumps over 1234 lazy dogs"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
        Tokenizer.from_file(eval_tokenizer_path).encode(text).ids


@pytest.mark.parametrize("changes, note", [
    (dict(preset="mamba2-hybrid", pattern="MM*-M*-"), "without RoPE"),      # RoPE on, written off
    (dict(preset="tiny", pattern="S-S-"), "without the sliding window"),    # window 8 < 49 tokens
])
def test_llama_cpp_differs_where_the_export_notes_say(tmp_path, changes, note, eval_tokenizer_path):
    cfg = small_preset(changes.pop("preset"), vocab_size=512, **changes)
    ours, llm, summary = exported_gguf(tmp_path, cfg, eval_tokenizer_path, scale_qk=20.0)
    assert any(note in line for line in summary["notes"])
    prompt = torch.randint(2, 512, (PROMPT,)).tolist()
    theirs = llama_cpp_greedy(llm, prompt, NEW)
    with torch.no_grad():
        reference = ours(torch.tensor([prompt + theirs]))[0].numpy()
    assert np.abs(np.asarray(llm.scores[:PROMPT + NEW]) - reference).max() > 0.1
