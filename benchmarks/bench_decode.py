"""CPU decode tokens/s at long context: a Samba-style tiny hybrid against its full-attention twin.

Which hybrid: the `tiny` preset is `M-G-S-R-*-`, one of whose five mixers is full
attention `*`, so its KV cache and decode cost still grow with the context; it is not
Samba-style. The default model here is `samba-tiny`: the `tiny` preset's widths (d_model
128, MLP 384, 4 heads / 2 kv heads, Mamba-1 d_state 16) with Samba's pattern `M-S-` x 3
and Samba's window of 2048 tokens. `--models tiny` adds the preset as it is, for reference.
The twin is `model.config.transformer_twin` of each (every mixer -> `*`, same widths).
Weights are random (decode cost does not depend on them), fp32, batch 1.

At each context length L both models are prefilled with the same L random token ids,
`--prefill-chunk` tokens per forward through the cache (the twin's 32K prefill in one
forward is slow on CPU; chunks give the same cache). Prefill is not timed. Then, after
two warm-up steps, `--repeats` windows of `--decode-tokens` greedy single-token steps are
timed for the hybrid and the twin in turn (side by side, same process); the reported
tokens/s is the median window, and the ratio is hybrid / twin (also given: the median
over repeats of each back-to-back pair's ratio, which resists load changing during the run).

    python benchmarks/bench_decode.py [--lengths 16384 32768] [--decode-tokens 32] [--repeats 5]
        [--models samba-tiny tiny] [--threads N] [--out benchmarks/results/decode.json] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.speed import decode_steps, prefill  # noqa: E402
from model import HybridLM, ModelConfig, get_preset, transformer_twin  # noqa: E402


def model_config(name: str) -> ModelConfig:
    base = get_preset("tiny").replace(kernels="reference")
    if name == "samba-tiny":
        return base.replace(pattern="M-S-" * 3, attn=dict(window=2048))
    if name == "tiny":
        return base
    raise SystemExit(f"--models: unknown model {name!r} (samba-tiny, tiny)")


def time_steps(model: HybridLM, state: dict, steps: int) -> float:
    t0 = time.perf_counter()
    state["logits"] = decode_steps(model, state["cache"], state["logits"], steps)
    return time.perf_counter() - t0


def summarize(hybrid: dict, twin: dict, decode_tokens: int) -> dict:
    """Fill each side's tokens/s (median window) and ms/token from its `runs_s`; return the ratios
    hybrid / twin: of the medians, and the median of each back-to-back pair's ratio (which resists
    load changing during the run)."""
    for side in (hybrid, twin):
        side["tokens_per_s"] = decode_tokens / statistics.median(side["runs_s"])
        side["ms_per_token"] = 1000 / side["tokens_per_s"]
    return {"ratio_tokens_per_s": hybrid["tokens_per_s"] / twin["tokens_per_s"],
            "ratio_median_of_pairs": statistics.median(t / h for h, t in zip(hybrid["runs_s"], twin["runs_s"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=["samba-tiny"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    parser.add_argument("--smoke", action="store_true", help="short contexts, to test the script")
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.decode_tokens, args.repeats, args.prefill_chunk = [256, 512], 4, 2, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="model.kernels")

    results = {}
    for name in args.models:
        cfg = model_config(name)
        torch.manual_seed(0)
        models = {"hybrid": HybridLM(cfg).eval(), "twin": HybridLM(transformer_twin(cfg)).eval()}
        results[name] = {"hybrid_pattern": cfg.pattern, "twin_pattern": transformer_twin(cfg).pattern,
                         "window": cfg.attn.window, "lengths": {}}
        for length in args.lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
            states, entry = {}, {}
            for kind, model in models.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    cache, logits = prefill(model, ids, args.prefill_chunk)
                states[kind] = {"cache": cache, "logits": logits}
                time_steps(model, states[kind], 2)                           # warm-up
                entry[kind] = {"prefill_s_untimed_reference": time.perf_counter() - t0, "runs_s": []}
            for _ in range(args.repeats):
                for kind, model in models.items():                           # alternate: side by side
                    entry[kind]["runs_s"].append(time_steps(model, states[kind], args.decode_tokens))
            entry.update(summarize(entry["hybrid"], entry["twin"], args.decode_tokens))
            for kind in models:
                entry[kind]["cache_bytes"] = states[kind]["cache"].nbytes()
            results[name]["lengths"][str(length)] = entry
            h, t = entry["hybrid"], entry["twin"]
            print(f"{name} L={length}: hybrid {h['tokens_per_s']:.1f} tok/s "
                  f"({h['cache_bytes'] / 2**20:.1f} MiB cache), "
                  f"twin {t['tokens_per_s']:.1f} tok/s ({t['cache_bytes'] / 2**20:.1f} MiB cache), "
                  f"ratio {entry['ratio_tokens_per_s']:.2f}x", flush=True)
            del states

    meta = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "device": "cpu",
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32", "batch": 1,
            "decode_tokens": args.decode_tokens, "repeats": args.repeats, "prefill_chunk": args.prefill_chunk,
            "timed": "only the decode steps (greedy single-token forwards through the cache); prefill untimed"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
