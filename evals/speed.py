"""`speed` suite: prefill and decode tokens/s and decode memory against context length, for the model and
for its same-size full-attention twin (`model.config.transformer_twin`).

Why: the point of recurrent and window layers is that decoding costs the same at any
context while a Transformer's KV cache and per-token attention grow with it. Both models
are measured side by side in one process, so the ratio hybrid/twin is the number to read.
The twin has random weights (speed and memory do not depend on them).

Per context length L (random token ids, `--batch-size` rows), `--repeats` times, the models taking
turns within each repeat (the order alternates between repeats), so that a change in the machine's
load falls on both and each repeat gives one hybrid/twin ratio:
  prefill: one forward of L tokens into a fresh cache (or `--prefill-chunk` tokens at a time
           through the cache), wall time.
  decode : after a prefill of L tokens, `--decode-tokens` single-token steps through the
           cache (greedy argmax fed back, as generation does); only the steps are timed.
Reported: the median over repeats, with the minimum and maximum beside it, for each model's times and
for the ratios (`*_speedup_vs_twin` is the median of the per-repeat ratios, `*_range` their min and
max); a range wider than 2x is also said on stderr: the machine was too busy for one number.
  memory : see MEMORY_MEASURE (recorded in results.json settings.memory_measure), measured for one
           model at a time.
One warm-up prefill and two warm-up decode steps per model run before any timing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from model import HybridLM, transformer_twin

from .common import EvalModel, figure_title, with_defaults, write_results

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
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="timed repeats, models in turn (median reported, min and max beside)")
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
def memory_point(model: HybridLM, length: int, decode_tokens: int, batch_size: int = 1, prefill_chunk: int = 0,
                 seed: int = 0) -> dict[str, Any]:
    """Decode memory of one model at one context length (MEMORY_MEASURE), with no other model's cache alive."""
    device = next(model.parameters()).device
    ids = _token_ids(model, length, batch_size, seed)
    gc.collect()
    cache, logits = prefill(model, ids, prefill_chunk)
    logits = decode_steps(model, cache, logits, 2)                   # warm-up of the step path
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    decode_steps(model, cache, logits, decode_tokens)
    _sync(device)
    cache_bytes, w_bytes = cache.nbytes(), weights_bytes(model)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else w_bytes + cache_bytes
    return {"length": length, "decode_memory_bytes": int(memory), "cache_bytes": int(cache_bytes),
            "weights_bytes": int(w_bytes)}


def _token_ids(model: HybridLM, length: int, batch_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch_size, length), generator=gen)
    return ids.to(next(model.parameters()).device)


@torch.inference_mode()
def time_side_by_side(models: dict[str, HybridLM], length: int, decode_tokens: int, repeats: int = 1,
                      batch_size: int = 1, prefill_chunk: int = 0, seed: int = 0,
                      time_prefill: bool = True) -> dict[str, dict[str, list[float]]]:
    """Seconds of each repeat, {model: {"prefill": [...], "decode": [...]}}, the models taking turns within
    every repeat (order alternating), so that both see the same machine."""
    names = list(models)
    ids = {name: _token_ids(m, length, batch_size, seed) for name, m in models.items()}
    state = {}
    for name, m in models.items():                                  # each model's decode cache, warmed up
        cache, logits = prefill(m, ids[name], prefill_chunk)
        state[name] = (cache, decode_steps(m, cache, logits, 2))
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            m, device = models[name], next(models[name].parameters()).device
            if time_prefill:
                gc.collect()
                _sync(device)
                t0 = time.perf_counter()
                fresh = prefill(m, ids[name], prefill_chunk)
                _sync(device)
                times[name]["prefill"].append(time.perf_counter() - t0)
                del fresh
            cache, logits = state[name]
            _sync(device)
            t0 = time.perf_counter()
            logits = decode_steps(m, cache, logits, decode_tokens)
            _sync(device)
            times[name]["decode"].append(time.perf_counter() - t0)
            state[name] = (cache, logits)
    return times


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_point(length: int, times: dict[str, list[float]], decode_tokens: int, batch_size: int,
                    memory: dict[str, Any]) -> dict[str, Any]:
    """One model's row at one length: tokens/s from the median time, the min/max over repeats beside it."""
    decode = _spread(times["decode"])
    point = {**memory, "length": length, "repeats": len(times["decode"]),
             "decode_tokens_per_s": batch_size * decode_tokens / decode["median"],
             "decode_tokens_per_s_min": batch_size * decode_tokens / decode["max"],
             "decode_tokens_per_s_max": batch_size * decode_tokens / decode["min"],
             "decode_ms_per_step": 1000 * decode["median"] / decode_tokens,
             "decode_s_repeats": times["decode"]}
    if times["prefill"]:
        pre = _spread(times["prefill"])
        point.update(prefill_tokens_per_s=batch_size * length / pre["median"],
                     prefill_tokens_per_s_min=batch_size * length / pre["max"],
                     prefill_tokens_per_s_max=batch_size * length / pre["min"],
                     prefill_s=pre["median"], prefill_s_repeats=times["prefill"])
    return point


def measure_point(model: HybridLM, length: int, decode_tokens: int, repeats: int = 1, batch_size: int = 1,
                  prefill_chunk: int = 0, seed: int = 0, time_prefill: bool = True) -> dict[str, Any]:
    """Prefill/decode tokens/s (median of repeats, min and max beside) and decode memory of one model alone."""
    memory = memory_point(model, length, decode_tokens, batch_size, prefill_chunk, seed)
    times = time_side_by_side({"model": model}, length, decode_tokens, repeats, batch_size, prefill_chunk, seed,
                              time_prefill)["model"]
    return summarize_point(length, times, decode_tokens, batch_size, memory)


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
    """tokens/s (prefill, decode; bars: min to max over repeats) and decode memory against context length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, (name, rows) in enumerate(points.items()):
        x, c = [r["length"] for r in rows], f"C{i}"        # one colour per model
        for kind, marker, style in (("prefill", "o", "-"), ("decode", "s", "--")):
            if not all(f"{kind}_tokens_per_s" in r for r in rows):
                continue
            y = [r[f"{kind}_tokens_per_s"] for r in rows]
            spread = [[v - r[f"{kind}_tokens_per_s_min"] for v, r in zip(y, rows)],
                      [r[f"{kind}_tokens_per_s_max"] - v for v, r in zip(y, rows)]]
            ax_t.errorbar(x, y, yerr=spread, marker=marker, linestyle=style, color=c, capsize=3,
                          label=f"{name} {kind}")
        ax_m.plot(x, [r["decode_memory_bytes"] / 2**20 for r in rows], marker="o", color=c,
                  label=f"{name} decode memory")
        ax_m.plot(x, [r["cache_bytes"] / 2**20 for r in rows], marker="x", linestyle=":", color=c,
                  label=f"{name} cache")
    repeats = next((r["repeats"] for rows in points.values() for r in rows), 1)
    for ax, ylabel in ((ax_t, f"tokens/s (median of {repeats}; bars: min-max)"), (ax_m, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ratios(model: list[float], twin: list[float]) -> list[float]:
    """Per-repeat twin time / model time: the model's speed-up in each repeat."""
    return [t / m for m, t in zip(model, twin)]


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
    common = {k: options[k] for k in ("batch_size", "prefill_chunk", "seed")}
    time_side_by_side(models, min(options["lengths"]), 2, 1, **common)                  # warm-up
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    ratios: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}}
    for length in options["lengths"]:
        times = time_side_by_side(models, length, options["decode_tokens"], options["repeats"], **common)
        for name, m in models.items():
            memory = memory_point(m, length, options["decode_tokens"], **common)
            points[name].append(summarize_point(length, times[name], options["decode_tokens"],
                                                options["batch_size"], memory))
        if "twin" in times:
            for kind in ratios:
                ratios[kind][str(length)] = _ratios(times["model"][kind], times["twin"][kind])
    scores: dict[str, Any] = {"points": points}
    if "twin" in points:
        for kind in ("decode", "prefill"):
            scores[f"{kind}_speedup_vs_twin"] = {k: statistics.median(v) for k, v in ratios[kind].items()}
            scores[f"{kind}_speedup_vs_twin_range"] = {k: [min(v), max(v)] for k, v in ratios[kind].items()}
            for length, values in ratios[kind].items():
                if max(values) > 2 * min(values):
                    print(f"speed: warning: {kind} speed-up vs twin at {length} tokens ranged {min(values):.3g}x.."
                          f"{max(values):.3g}x over {len(values)} repeats: the machine was busy; measure on an idle "
                          "one or raise --repeats", file=sys.stderr)
        scores["decode_memory_ratio_twin_over_model"] = {
            str(a["length"]): b["decode_memory_bytes"] / a["decode_memory_bytes"]
            for a, b in zip(points["model"], points["twin"])}
    settings = {**{k: options[k] for k in DEFAULTS}, "device": str(param.device), "dtype": str(param.dtype),
                "threads": torch.get_num_threads(), "pattern": model.cfg.pattern,
                "twin_pattern": transformer_twin(model.cfg).pattern if options["twin"] else None,
                "memory_measure": MEMORY_MEASURE["cuda" if param.device.type == "cuda" else "cpu"],
                "timing": "per repeat, the models in turn (order alternating): prefill = wall time of the forward(s) "
                          "into a fresh cache; decode = wall time of decode_tokens single-token steps after a "
                          "prefill of `length` tokens. Reported: median over repeats, min and max beside; speed-ups "
                          "are per-repeat ratios (median, and their range)"}
    path = write_results(out_dir, SUITE, scores, settings, lm)
    plot(points, os.path.join(out_dir, "speed.png"), figure_title(
        f"speed: {model.cfg.pattern} vs its full-attention twin, {options['repeats']} repeats", lm))
    with open(path) as f:
        return json.load(f)
