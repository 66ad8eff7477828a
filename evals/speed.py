"""`speed` suite: prefill and decode tokens/s and decode memory against context length,
for the model and for its same-size full-attention twin (`model.config.transformer_twin`).

Why: the point of recurrent and window layers is that decoding costs the same at any
context while a Transformer's KV cache and per-token attention grow with it. Both models
are measured side by side in one process, so the ratio hybrid/twin is the number to read.
The twin has random weights (speed and memory do not depend on them).

Per model and context length L (random token ids, `--batch-size` rows):
  prefill: one forward of L tokens into a fresh cache (or `--prefill-chunk` tokens at a
           time through the cache); median over `--repeats` of the wall time.
  decode : after a prefill of L tokens, `--decode-tokens` single-token steps through the
           cache (greedy argmax fed back, as generation does); median over `--repeats`
           windows of those steps. Only the steps are timed, never the prefill.
  memory : see MEMORY_MEASURE (recorded in results.json settings.memory_measure).
One warm-up prefill and two warm-up decode steps per model run before any timing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

import torch

from model import HybridLM, transformer_twin

from .common import EvalModel, write_results, with_defaults

SUITE = "speed"
SMOKE: dict[str, Any] = {"lengths": [32, 64], "decode_tokens": 4, "repeats": 1, "batch_size": 1,
                         "prefill_chunk": 0, "twin": True}
DEFAULTS: dict[str, Any] = {"lengths": [1024, 2048, 4096, 8192, 16384], "decode_tokens": 32, "repeats": 3,
                            "batch_size": 1, "prefill_chunk": 0, "twin": True, "seed": 0}

MEMORY_MEASURE = {
    "cuda": "decode_memory_bytes = torch.cuda.max_memory_allocated() over the timed decode steps, the peak "
            "statistic reset after the prefill (weights + cache + per-step activations; the prefill's logits "
            "are freed before the reset)",
    "cpu": "decode_memory_bytes = weights_bytes + cache_bytes: the parameters plus HybridCache.nbytes() after "
           "the decode steps (every tensor the cache holds, allocated capacity included: the full-attention "
           "KV buffer doubles when full). Per-step transient activations (a few vectors of d_model per "
           "sublayer at batch 1, plus one row of attention scores per cached key) are not included.",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's options (dest names are run()'s keyword arguments)."""
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULTS["lengths"],
                        help="context lengths to measure")
    parser.add_argument("--decode-tokens", type=int, default=DEFAULTS["decode_tokens"],
                        help="single-token decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="timed repeats (median)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="sequences per forward")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULTS["prefill_chunk"],
                        help="prefill this many tokens per forward through the cache (0: one forward)")
    parser.add_argument("--no-twin", dest="twin", action="store_false",
                        help="skip the full-attention twin")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the token ids and twin weights")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.inference_mode()
def prefill(model: HybridLM, ids: torch.Tensor, chunk: int = 0):
    """Fresh cache filled with ids (B, L), one forward or `chunk` tokens at a time; -> (cache, last logits)."""
    cache = model.new_cache()
    step = chunk if chunk and chunk > 0 else ids.shape[1]
    logits = None
    for start in range(0, ids.shape[1], step):
        logits = model(ids[:, start:start + step], cache=cache)[:, -1]
    return cache, logits


@torch.inference_mode()
def decode_steps(model: HybridLM, cache, logits: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy single-token steps through the cache; returns the last logits."""
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
    return logits


@torch.inference_mode()
def measure_point(model: HybridLM, length: int, decode_tokens: int, repeats: int = 1, batch_size: int = 1,
                  prefill_chunk: int = 0, seed: int = 0, time_prefill: bool = True) -> dict[str, Any]:
    """Prefill/decode tokens/s and decode memory of one model at one context length (see module doc)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, length), generator=gen).to(device)
    prefill_times = []
    for _ in range(repeats if time_prefill else 0):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        cache, logits = prefill(model, ids, prefill_chunk)
        _sync(device)
        prefill_times.append(time.perf_counter() - t0)
        del cache, logits
    gc.collect()
    cache, logits = prefill(model, ids, prefill_chunk)
    logits = decode_steps(model, cache, logits, 2)                   # warm-up of the step path
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    decode_times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        logits = decode_steps(model, cache, logits, decode_tokens)
        _sync(device)
        decode_times.append(time.perf_counter() - t0)
    cache_bytes = cache.nbytes()
    w_bytes = weights_bytes(model)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else w_bytes + cache_bytes
    point = {"length": length,
             "decode_tokens_per_s": batch_size * decode_tokens / statistics.median(decode_times),
             "decode_ms_per_step": 1000 * statistics.median(decode_times) / decode_tokens,
             "decode_memory_bytes": int(memory), "cache_bytes": int(cache_bytes), "weights_bytes": int(w_bytes)}
    if prefill_times:
        point["prefill_tokens_per_s"] = batch_size * length / statistics.median(prefill_times)
        point["prefill_s"] = statistics.median(prefill_times)
    return point


def _check(options: dict[str, Any]) -> None:
    lengths = options["lengths"]
    if not isinstance(lengths, (list, tuple)) or not lengths or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
        raise ValueError(f"lengths={lengths!r}: must be a non-empty list of positive integers")
    for name, low in (("decode_tokens", 1), ("repeats", 1), ("batch_size", 1), ("prefill_chunk", 0)):
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def plot(points: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """tokens/s (prefill, decode) and decode memory against context length, both models."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rows) in enumerate(points.items()):
        x, c = [r["length"] for r in rows], f"C{i}"        # one colour per model
        if all("prefill_tokens_per_s" in r for r in rows):
            ax_t.plot(x, [r["prefill_tokens_per_s"] for r in rows], marker="o", color=c, label=f"{name} prefill")
        ax_t.plot(x, [r["decode_tokens_per_s"] for r in rows], marker="s", linestyle="--", color=c,
                  label=f"{name} decode")
        ax_m.plot(x, [r["decode_memory_bytes"] / 2**20 for r in rows], marker="o", color=c,
                  label=f"{name} decode memory")
        ax_m.plot(x, [r["cache_bytes"] / 2**20 for r in rows], marker="x", linestyle=":", color=c,
                  label=f"{name} cache")
    for ax, ylabel in ((ax_t, "tokens/s"), (ax_m, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(lm: EvalModel, out_dir: str, **options: Any) -> dict:
    """Measure model and twin at every length; write out_dir/results.json and out_dir/speed.png."""
    options = with_defaults(SUITE, options, DEFAULTS)
    _check(options)
    model = lm.model.eval()
    param = next(model.parameters())
    models = {"model": model}
    if options["twin"]:
        torch.manual_seed(options["seed"])
        models["twin"] = HybridLM(transformer_twin(model.cfg)).to(device=param.device, dtype=param.dtype).eval()
    kw = {k: options[k] for k in ("decode_tokens", "repeats", "batch_size", "prefill_chunk", "seed")}
    points: dict[str, list[dict[str, Any]]] = {}
    for name, m in models.items():
        measure_point(m, min(options["lengths"]), 2, 1, options["batch_size"], options["prefill_chunk"])  # warm-up
        points[name] = [measure_point(m, length, **kw) for length in options["lengths"]]
    scores: dict[str, Any] = {"points": points}
    if "twin" in points:
        scores["decode_speedup_vs_twin"] = {
            str(a["length"]): a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            for a, b in zip(points["model"], points["twin"])}
        scores["prefill_speedup_vs_twin"] = {
            str(a["length"]): a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
            for a, b in zip(points["model"], points["twin"])}
        scores["decode_memory_ratio_twin_over_model"] = {
            str(a["length"]): b["decode_memory_bytes"] / a["decode_memory_bytes"]
            for a, b in zip(points["model"], points["twin"])}
    settings = {**{k: options[k] for k in DEFAULTS}, "device": str(param.device), "dtype": str(param.dtype),
                "threads": torch.get_num_threads(), "pattern": model.cfg.pattern,
                "twin_pattern": transformer_twin(model.cfg).pattern if options["twin"] else None,
                "memory_measure": MEMORY_MEASURE["cuda" if param.device.type == "cuda" else "cpu"],
                "timing": "prefill: wall time of the forward(s) into a fresh cache; decode: wall time of "
                          "decode_tokens single-token steps after a prefill of `length` tokens; median of repeats"}
    path = write_results(out_dir, SUITE, scores, settings, lm)
    plot(points, os.path.join(out_dir, "speed.png"), f"speed: {model.cfg.pattern} vs full-attention twin")
    with open(path) as f:
        return json.load(f)
