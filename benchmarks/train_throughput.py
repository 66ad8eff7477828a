"""Training throughput of the Samba presets against their same-size Transformer twins, side by side.

For each preset and its `transformer_twin` (all mixers -> full attention, same width,
depth and MLPs), one training step is forward + `loss_fn` + backward + gradient clipping
+ AdamW step on random tokens, bf16 autocast on CUDA (fp32 on CPU). Warm-up steps run
first; the timed window is bracketed by CUDA events and synchronised only at its ends
(nothing inside a step waits for the device). Hybrid and twin alternate `--repeats`
times in one process; each turn builds its model afresh so peak memory is its own.
Reports tokens/s, step time, peak memory and MFU (`pretrain.flops.mfu`, the model's own
FLOPs, recomputation not counted) and the ratio hybrid/twin of tokens/s.

    python benchmarks/train_throughput.py [--presets samba-421m samba-1.3b] [--seq-len 4096]
        [--micro-batch 1] [--recompute none|all|mamba,mlp,...] [--compile] [--kernels cuda|reference]
        [--out benchmarks/results/train_throughput.json]

`--long-context` measures inference instead (issue 9, item 5): prefill tokens/s of one
sequence at each `--prefill-lengths` and decode tokens/s at a `--decode-context`-token
context, through the cache API (`model(ids, cache=...)` as `model.generate` does, but
greedy on the device so no step waits for the host). Prefill returns full float32
logits, (L, vocab): 16 GB at 128K tokens. Default output: benchmarks/results/long_context.json.

`--smoke` runs tiny widths (d_model 64, sequence 64, 2 steps) on CPU, to test the script.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import HybridLM, ModelConfig, get_preset, transformer_twin  # noqa: E402
from pretrain.flops import device_peak_flops, mfu, model_flops_per_token  # noqa: E402
from pretrain.parallel import loss_fn  # noqa: E402

VERSIONED_PACKAGES = ("torch", "triton", "mamba-ssm", "causal-conv1d", "flash-attn", "flash-linear-attention")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def smoke_sized(cfg: ModelConfig) -> ModelConfig:
    """The preset's pattern and kinds at CPU-test widths (window below the sequence, so it is exercised)."""
    return cfg.replace(vocab_size=256, d_model=64, mlp_hidden=128, attn=dict(n_heads=2, n_kv_heads=None, window=32))


def build(cfg: ModelConfig, device: torch.device, recompute: set[str], seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).to(device)
    model.checkpointed_kinds = set(recompute)
    return model


def recompute_kinds(flag: str, cfg: ModelConfig) -> set[str]:
    """--recompute none | all | comma-separated sublayer kinds (mamba, swa, attention, mlp, ...)."""
    if flag == "none":
        return set()
    if flag == "all":
        return set(cfg.layer_types)
    return set(flag.split(","))


def autocast(device: torch.device):
    # bf16 autocast is the GPU training setting; CPU runs stay fp32 (a smoke test, not a measurement).
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class Timer:
    """Wall time of a window of device work: CUDA events on GPU (one sync at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_training(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    reset_device_memory(device)
    model = build(cfg, device, recompute_kinds(args.recompute, cfg))
    step_model: Callable = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), device=device,
                           generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def train_step() -> torch.Tensor:
        with autocast(device):
            logits = step_model(inputs)
        loss = loss_fn(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # returns a device tensor: no sync
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        train_step()
    with Timer(device) as timer:
        for _ in range(args.steps):
            last_loss = train_step()
    step_s = timer.seconds / args.steps
    tokens_per_s = args.micro_batch * args.seq_len / step_s
    peak = device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = dict(step_s=step_s, tokens_per_s=tokens_per_s, peak_memory_bytes=peak_memory_bytes(device),
                  mfu=mfu(tokens_per_s, cfg, args.seq_len, peak) if peak else None,
                  final_loss=float(last_loss), parameters=model.num_parameters())
    return result


@torch.no_grad()
def measure_long_context(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = build(cfg, device, set()).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)    # inference weights in bf16, as served
    generator = torch.Generator(device=device).manual_seed(2)
    prefill: dict[str, Any] = {}
    for length in args.prefill_lengths:
        reset_device_memory(device)
        ids = torch.randint(0, cfg.vocab_size, (1, length), device=device, generator=generator)
        with autocast(device):
            model(ids[:, : min(length, 256)], cache=model.new_cache())      # warm-up: kernels, allocator
        with autocast(device), Timer(device) as timer:
            model(ids, cache=model.new_cache())
        prefill[str(length)] = dict(seconds=timer.seconds, tokens_per_s=length / timer.seconds,
                                    peak_memory_bytes=peak_memory_bytes(device))
        del ids
    reset_device_memory(device)
    ids = torch.randint(0, cfg.vocab_size, (1, args.decode_context), device=device, generator=generator)
    cache = model.new_cache()
    with autocast(device):
        next_ids = model(ids, cache=cache)[:, -1:].argmax(-1)
        next_ids = model(next_ids, cache=cache)[:, -1:].argmax(-1)         # warm-up step
        with Timer(device) as timer:
            for _ in range(args.decode_tokens):
                # greedy on the device: the next input never waits for the host
                next_ids = model(next_ids, cache=cache)[:, -1:].argmax(-1)
    decode = dict(context=args.decode_context, tokens=args.decode_tokens, seconds=timer.seconds,
                  tokens_per_s=args.decode_tokens / timer.seconds, peak_memory_bytes=peak_memory_bytes(device))
    del model, cache, ids
    reset_device_memory(device)
    return dict(prefill=prefill, decode=decode)


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def side_by_side(preset: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    models = {"hybrid": cfg, "twin": transformer_twin(cfg)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model_cfg in models.items():       # alternate, so drift hits both alike
            runs[name].append(measure_training(model_cfg, args, device))
    out: dict[str, Any] = {}
    for name, model_cfg in models.items():
        out[name] = dict(pattern=model_cfg.pattern, parameters=runs[name][0]["parameters"],
                         train_flops_per_token=model_flops_per_token(model_cfg, args.seq_len),
                         tokens_per_s=median_of(runs[name], "tokens_per_s"), step_s=median_of(runs[name], "step_s"),
                         peak_memory_bytes=max((r["peak_memory_bytes"] for r in runs[name]
                                                if r["peak_memory_bytes"] is not None), default=None),
                         mfu=median_of(runs[name], "mfu"), runs=runs[name])
        print(f"{preset:12s} {name:6s} {out[name]['tokens_per_s']:12.0f} tok/s  step {out[name]['step_s'] * 1e3:9.1f} ms"
              f"  mfu {out[name]['mfu'] if out[name]['mfu'] is None else round(out[name]['mfu'], 3)}", flush=True)
    out["ratio_tokens_per_s"] = out["hybrid"]["tokens_per_s"] / out["twin"]["tokens_per_s"]
    out["ratio_mfu"] = out["hybrid"]["mfu"] / out["twin"]["mfu"] if out["twin"]["mfu"] else None
    print(f"{preset:12s} hybrid/twin tokens/s {out['ratio_tokens_per_s']:.3f}", flush=True)
    return out


def long_context_side_by_side(preset: str, cfg: ModelConfig, args: argparse.Namespace,
                              device: torch.device) -> dict[str, Any]:
    hybrid = measure_long_context(cfg, args, device)
    twin = measure_long_context(transformer_twin(cfg), args, device)
    out = dict(hybrid=hybrid, twin=twin, ratio_prefill_tokens_per_s={
        length: hybrid["prefill"][length]["tokens_per_s"] / twin["prefill"][length]["tokens_per_s"]
        for length in hybrid["prefill"]})
    out["ratio_decode_tokens_per_s"] = hybrid["decode"]["tokens_per_s"] / twin["decode"]["tokens_per_s"]
    print(f"{preset:12s} prefill hybrid/twin {out['ratio_prefill_tokens_per_s']}  "
          f"decode@{args.decode_context} hybrid/twin {out['ratio_decode_tokens_per_s']:.3f}", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["samba-421m", "samba-1.3b"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--recompute", default="none", help="none | all | comma-separated sublayer kinds")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--kernels", choices=["cuda", "reference", "auto"], default=None,
                        help="model.kernels (default: cuda on a GPU, reference on CPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long-context", action="store_true", help="prefill / decode speed instead of training")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--decode-context", type=int, default=65536)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny widths and lengths on CPU, to test the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.warmup, args.steps, args.repeats = 64, 1, 2, 1
        args.prefill_lengths, args.decode_context, args.decode_tokens = [64, 128], 64, 4
    if args.out is None:
        args.out = f"benchmarks/results/{'long_context' if args.long_context else 'train_throughput'}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    kernels = args.kernels or ("cuda" if device.type == "cuda" else "reference")
    if args.smoke:
        torch.set_num_threads(1)      # a test on a shared machine
    results = {}
    for preset in args.presets:
        cfg = get_preset(preset).replace(kernels=kernels)
        if args.smoke:
            cfg = smoke_sized(cfg)
        measure = long_context_side_by_side if args.long_context else side_by_side
        results[preset] = measure(preset, cfg, args, device)
    meta = dict(
        command=shlex.join([sys.executable, *sys.argv]), mode="long_context" if args.long_context else "train",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        peak_flops=device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        dtype="bfloat16 autocast" if device.type == "cuda" else "float32", kernels=kernels,
        versions=package_versions(), python=platform.python_version(), threads=torch.get_num_threads(),
        smoke=args.smoke, **{k: getattr(args, k) for k in ("seq_len", "micro_batch", "recompute", "compile",
                                                           "warmup", "steps", "repeats")})
    if args.long_context:
        meta.update(prefill_lengths=args.prefill_lengths, decode_context=args.decode_context,
                    decode_tokens=args.decode_tokens)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
