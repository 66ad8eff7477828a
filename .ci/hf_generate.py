"""Smoke check of a converted folder: transformers loads it and generates what Braid generates.

    python .ci/hf_generate.py HF_DIR RUN_DIR

Loads HF_DIR the way a user does (AutoModelForCausalLM with trust_remote_code, AutoTokenizer),
generates 32 tokens greedily from a code prompt, and compares them with Braid's own `generate`
on RUN_DIR's latest checkpoint. Exits 1 when they differ or the folder generates nothing.
"""
from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.common import load_eval_model
from model import generate

PROMPT = "def main():\n    "
NEW_TOKENS = 32


def main(hf_dir: str, run_dir: str) -> int:
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).float().eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None)   # Braid's generate does not stop at EOS either
    hf_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()

    braid = load_eval_model(run_dir)
    with torch.no_grad():
        braid_tokens = generate(braid.model, [inputs["input_ids"][0].tolist()], NEW_TOKENS)[0]
    braid_tokens = braid_tokens[:len(hf_tokens)]
    print(f"transformers generated: {tokenizer.decode(hf_tokens)!r}")
    if len(hf_tokens) != NEW_TOKENS or hf_tokens != braid_tokens:
        print(f"MISMATCH: transformers {hf_tokens}\n          braid        {braid_tokens}", file=sys.stderr)
        return 1
    print(f"ok: {NEW_TOKENS} greedy tokens equal to Braid's generate on {run_dir}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
