"""Serving proof on CPU: native exports -> GGUF (llama.cpp's own converter) -> llama.cpp gives Braid's tokens.

Opt-in: `make test-gguf` builds llama-cpp-python from its source package (llama.cpp compiled for this
CPU) and unpacks that package's llama.cpp tree (convert_hf_to_gguf.py, gguf-py) to .cache/llama-cpp/;
then runs this file with BRAID_REQUIRE_LLAMA_CPP=1, so a missing build fails instead of skipping.
Without them (plain `make test`) every test here skips.

Per class: the fp32 export converted to an f32 GGUF, llama.cpp's greedy continuation of a prompt
(its own KV/recurrent cache, one token per decode) equals Braid's `generate`, its logits are within
1e-3 of Braid's, and it tokenizes text as the exported tokenizer does.
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


def _llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (make test-gguf builds it)"
    if not os.path.isfile(os.path.join(LLAMA_CPP_TREE, "convert_hf_to_gguf.py")):
        return f"no llama.cpp tree at {LLAMA_CPP_TREE} (make test-gguf unpacks it)"
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
}
PROMPT, NEW = 17, 32


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_generates_braids_greedy_tokens(tmp_path, case, eval_tokenizer_path):
    from llama_cpp import Llama
    changes = dict(CASES[case][0])
    cfg = small_preset(changes.pop("preset"), vocab_size=512, **changes)
    state = weights_checkpoint(tmp_path / "run", cfg)
    summary = to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), fmt="native", tokenizer=eval_tokenizer_path,
                    progress=False)
    assert summary["format"] == CASES[case][1]
    convert(str(tmp_path / "hf"), str(tmp_path / "model.gguf"), LLAMA_CPP_TREE, outtype="f32")

    ours = HybridLM(cfg).eval()
    ours.load_state_dict(state)
    llm = Llama(str(tmp_path / "model.gguf"), n_ctx=128, n_batch=128, n_threads=1, logits_all=True, verbose=False)
    prompt = torch.randint(2, 512, (PROMPT,)).tolist()
    expected = generate(ours, [prompt], NEW)[0]

    llm.eval(prompt)                                       # one prefill, then one token per decode
    theirs = []
    for _ in range(NEW):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    assert theirs == expected

    with torch.no_grad():
        reference = ours(torch.tensor([prompt + expected]))[0].numpy()
    logits = np.asarray(llm.scores[:PROMPT + NEW])
    assert np.abs(logits - reference).max() < 1e-3

    from tokenizers import Tokenizer
    text = "the quick brown fox jumps over 1234 lazy dogs"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
        Tokenizer.from_file(eval_tokenizer_path).encode(text).ids
