"""A native export as a GGUF file for llama.cpp, written by llama.cpp's own converter.

    braid convert to-hf runs/tiny runs/tiny/native --format native
    python -m conversion.gguf runs/tiny/native model.gguf --llama-cpp PATH/TO/llama.cpp \
        [--python .venv-hf4/bin/python] [--outtype f32]

PATH/TO/llama.cpp is a llama.cpp source tree (its convert_hf_to_gguf.py, conversion/ and gguf-py/;
`make gguf` unpacks the one inside llama-cpp-python's source package to .cache/llama-cpp/). The
converter runs under `--python`: llama.cpp pins transformers 4.57.6 for it
(requirements/requirements-convert_hf_to_gguf.txt), as `.venv-hf4` has. Under transformers 5 it reads
a config through AutoConfig, whose dict lists every default, and takes a dense NemotronH for its
MoE variant (it looks for `num_experts_per_tok`).

Why a wrapper: the converter recognises a tokenizer's pre-tokenizer by hashing how it splits a
test string, and refuses one it has no hash for. Braid's tokenizers (data_pipeline/tokenizer.py)
are GPT-2's byte-level BPE: a ByteLevel pre-tokenizer with GPT-2's regex, no normalizer. llama.cpp's
`gpt-2` pre-tokenizer splits text the same way, so for such a tokenizer.json this runs the converter
with that answer; any other tokenizer is left to the converter. Nothing of llama.cpp is copied here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_RUN_CONVERTER = """
import runpy, sys
llama_cpp, gpt2 = sys.argv[1], sys.argv[2] == "gpt2"
sys.argv = [llama_cpp + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, llama_cpp)
if gpt2:
    from conversion.base import TextModel      # llama.cpp's package of that name, not Braid's
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def is_gpt2_byte_level(tokenizer_path: str) -> bool:
    """True for a byte-level BPE that pre-tokenizes with GPT-2's regex and normalizes nothing."""
    with open(tokenizer_path) as f:
        tok = json.load(f)
    pre = tok.get("pre_tokenizer") or {}
    return (tok.get("model", {}).get("type") == "BPE" and tok.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def convert(hf_dir: str, out_file: str, llama_cpp: str, outtype: str = "f32", python: str | None = None) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on a native folder under `python` (default: this one);
    its output and errors pass through."""
    script = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--llama-cpp {llama_cpp}: no convert_hf_to_gguf.py there (a llama.cpp source tree)")
    config = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{hf_dir}: no config.json (export with `braid convert to-hf ... --format native`)")
    with open(config) as f:
        if json.load(f).get("model_type") == "braid":
            raise ValueError(f"{hf_dir}: a remote-code (braid format) folder; llama.cpp converts native classes "
                             "only: export with --format native")
    tokenizer = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.json (llama.cpp needs the vocabulary; pass --tokenizer "
                                "to braid convert to-hf)")
    pre = "gpt2" if is_gpt2_byte_level(tokenizer) else "ask"
    # a clean import path: llama.cpp's `conversion` package, not this repository's
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = os.path.abspath(python) if python and os.sep in python else (python or sys.executable)
    subprocess.run([python, "-c", _RUN_CONVERTER, os.path.abspath(llama_cpp), pre, os.path.abspath(hf_dir),
                    "--outfile", os.path.abspath(out_file), "--outtype", outtype],
                   check=True, cwd=os.path.abspath(llama_cpp), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", help="a folder written by `braid convert to-hf ... --format native`")
    parser.add_argument("out_file", help="the .gguf file to write")
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (holds convert_hf_to_gguf.py)")
    parser.add_argument("--python", help="interpreter for the converter (default: this one); llama.cpp pins "
                                         "transformers 4.57.6 for it, as .venv-hf4 has")
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                        help="weight type in the file (f32: the export's numbers unchanged)")
    args = parser.parse_args(argv)
    try:
        convert(args.hf_dir, args.out_file, args.llama_cpp, args.outtype, args.python)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: llama.cpp's converter failed (exit {err.returncode}); its output is above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
