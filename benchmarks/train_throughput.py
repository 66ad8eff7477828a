"""Training throughput of the Samba presets against their same-size Transformer twins, side by side.

For each preset and its `transformer_twin` (all mixers -> full attention, same width,
depth and MLPs), the timed step is the training step itself: `ParallelEngine.train_step`
(DeepSpeed engine, ZeRO-1, gradient clipping, AdamW, LR schedule) on batches from the
training loader (`build_train_loader`) over MDS rows in which documents of random lengths
(`--mean-doc-len`) are packed, so every step carries doc_ids as training's do; bf16 is
training's too (DeepSpeed torch autocast, fp32 parameters; fp32 on CPU). Warm-up steps run
first; the timed window is bracketed by CUDA events and synchronised only at its ends.
Hybrid and twin alternate `--repeats` times in one process, each turn with a fresh engine
so peak memory is its own. Reports tokens/s, step time, peak memory, MFU
(`pretrain.flops.mfu`, the model's own FLOPs, recomputation not counted), the ratio
hybrid/twin of tokens/s, and the path each sublayer's ops took in the timed steps (the
dispatch record: a kernel name, or "reference" for a block that left its fast path).
Every run's raw window (seconds, steps, tokens, documents) is in the JSON.

    python benchmarks/train_throughput.py [--presets samba-421m samba-1.3b] [--seq-len 4096]
        [--micro-batch 1] [--recompute none|all|mamba,mlp,...] [--compile] [--kernels cuda|auto|reference]
        [--mean-doc-len 1024] [--out benchmarks/results/train_throughput.json]

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
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import HybridLM, ModelConfig, get_preset, transformer_twin  # noqa: E402
from model.config import SUBLAYERS  # noqa: E402
from model.kernels import bypasses, dispatch_record  # noqa: E402
from pretrain.flops import device_peak_flops, mfu, model_flops_per_token  # noqa: E402

VERSIONED_PACKAGES = ("torch", "triton", "deepspeed", "fla-core", "mamba-ssm", "causal-conv1d", "flash-attn")


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


def recompute_flag(flag: str, cfg: ModelConfig) -> bool | str:
    """--recompute none | all | comma-separated sublayer kinds -> train.activation_checkpointing."""
    if flag in ("none", "all"):
        return flag == "all"
    kinds = set(flag.split(","))
    return "".join(symbol for symbol, kind in SUBLAYERS.items() if kind in kinds and kind in cfg.layer_types) or False


def autocast(device: torch.device):
    # bf16 autocast is the GPU setting; CPU runs stay fp32 (a smoke test, not a measurement).
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def packed_rows(out: str, vocab: int, seq_len: int, rows: int, mean_doc_len: int, seed: int = 0) -> str:
    """MDS rows of seq_len + 1 random tokens, each packed with documents of exponentially distributed
    lengths (mean `mean_doc_len`), in the format `braid data prepare` writes."""
    import numpy as np

    from data_pipeline.mds import MDSWriter
    rng = np.random.default_rng(seed)
    with MDSWriter(out=out, columns={"tokens": "ndarray:uint16", "doc_starts": "ndarray:int32"}) as writer:
        for _ in range(rows):
            lengths = np.maximum(1, rng.exponential(mean_doc_len, size=seq_len + 1).astype(int))
            starts = np.concatenate([[0], np.cumsum(lengths)])
            writer.write({"tokens": rng.integers(0, vocab, seq_len + 1).astype(np.uint16),
                          "doc_starts": starts[starts < seq_len + 1].astype(np.int32)})
    return out


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


def measure_training(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, data: str) -> dict[str, Any]:
    """One engine's warm-up and timed window of `ParallelEngine.train_step` on loader batches."""
    from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader
    from pretrain.config import train_config
    from pretrain.parallel import Layout, ParallelEngine
    from pretrain.train import deepspeed_config

    reset_device_memory(device)
    train_cfg = train_config({
        "run_dir": os.path.join(os.path.dirname(data), "run"), "seed": 0, "model": cfg.to_dict(),
        "data": {"train": [data], "seq_len": args.seq_len, "micro_batch": args.micro_batch},
        "optim": {"lr": 1e-4, "weight_decay": 0.1}, "parallel": {"zero_stage": 1},
        "train": {"max_steps": args.warmup + args.steps, "val_every": 0,
                  "activation_checkpointing": recompute_flag(args.recompute, cfg)}})
    engine = ParallelEngine(train_cfg, Layout(tp=1, pp=1, dp=1), 0, deepspeed_config(train_cfg, bf16=device.type == "cuda"))
    if args.compile:
        engine.ds.compile()
    loader = build_train_loader(LoaderConfig(streams=[StreamSource(path=data)], seq_len=args.seq_len,
                                             batch_size=args.micro_batch, seed=0), dp_rank=0, dp_world_size=1)
    source = loader.batches()
    seen = {"tokens": 0, "documents": 0}

    def batches():
        while True:
            batch = next(source)
            seen["tokens"] += batch["input_ids"].numel()
            seen["documents"] += int((batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]).sum()) + len(batch["doc_ids"])
            yield batch

    stream = batches()
    for _ in range(args.warmup):
        engine.train_step(stream)
    seen.update(tokens=0, documents=0)
    with Timer(device) as timer:
        for _ in range(args.steps):
            last_loss = engine.train_step(stream)
    step_s = timer.seconds / args.steps
    tokens_per_s = seen["tokens"] / timer.seconds
    peak = device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    record = dispatch_record(engine.module)
    result = dict(window_s=timer.seconds, steps=args.steps, tokens=seen["tokens"], documents=seen["documents"],
                  step_s=step_s, tokens_per_s=tokens_per_s, peak_memory_bytes=peak_memory_bytes(device),
                  mfu=mfu(tokens_per_s, cfg, args.seq_len, peak) if peak else None, final_loss=float(last_loss),
                  parameters=sum(p.numel() for p in engine.module.parameters()), dispatch=record)
    del engine, loader, source, stream
    return result


def print_dispatch(label: str, record: dict[str, dict[str, str]]) -> None:
    """The path of each sublayer's ops, one line per block, and whether any left its fast path."""
    for block, ops in record.items():
        print(f"  {label} {block:20s} " + "  ".join(f"{op}={path}" for op, path in ops.items()), flush=True)
    off = bypasses(record)
    print(f"  {label} " + ("every sublayer on a kernel" if not off else
                           f"{sum(map(len, off.values()))} op(s) of {len(off)} block(s) on the reference path"), flush=True)


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


def side_by_side(preset: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device,
                 data: str) -> dict[str, Any]:
    models = {"hybrid": cfg, "twin": transformer_twin(cfg)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model_cfg in models.items():       # alternate, so drift hits both alike
            runs[name].append(measure_training(model_cfg, args, device, data))
    out: dict[str, Any] = {}
    for name, model_cfg in models.items():
        out[name] = dict(pattern=model_cfg.pattern, parameters=runs[name][0]["parameters"],
                         train_flops_per_token=model_flops_per_token(model_cfg, args.seq_len),
                         tokens_per_s=median_of(runs[name], "tokens_per_s"), step_s=median_of(runs[name], "step_s"),
                         peak_memory_bytes=max((r["peak_memory_bytes"] for r in runs[name]
                                                if r["peak_memory_bytes"] is not None), default=None),
                         mfu=median_of(runs[name], "mfu"), dispatch=runs[name][-1]["dispatch"], runs=runs[name])
        print(f"{preset:12s} {name:6s} {out[name]['tokens_per_s']:12.0f} tok/s  step {out[name]['step_s'] * 1e3:9.1f} ms"
              f"  mfu {out[name]['mfu'] if out[name]['mfu'] is None else round(out[name]['mfu'], 3)}", flush=True)
        print_dispatch(f"{preset} {name}", out[name]["dispatch"])
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
    parser.add_argument("--mean-doc-len", type=int, default=1024, help="mean length of the packed documents")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and lengths on CPU, to test the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.warmup, args.steps, args.repeats, args.mean_doc_len = 64, 1, 2, 1, 16
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
    if not args.long_context:
        from pretrain.train import init_distributed
        init_distributed()            # one rank: the engine's process group
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = get_preset(preset).replace(kernels=kernels)
            if args.smoke:
                cfg = smoke_sized(cfg)
            if args.long_context:
                results[preset] = long_context_side_by_side(preset, cfg, args, device)
            else:
                rows = max(256, args.micro_batch * (args.warmup + args.steps) * 2)   # the loader wants 64+ per node
                data = packed_rows(os.path.join(tmp, preset, "train"), cfg.vocab_size, args.seq_len, rows,
                                   args.mean_doc_len)
                results[preset] = side_by_side(preset, cfg, args, device, data)
    meta = dict(
        command=shlex.join([sys.executable, *sys.argv]), mode="long_context" if args.long_context else "train",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        peak_flops=device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
        dtype=("bfloat16 autocast" if args.long_context else "bfloat16 (DeepSpeed torch autocast, fp32 parameters)")
        if device.type == "cuda" else "float32", kernels=kernels,
        versions=package_versions(), python=platform.python_version(), threads=torch.get_num_threads(),
        smoke=args.smoke, **{k: getattr(args, k) for k in ("seq_len", "micro_batch", "recompute", "compile",
                                                           "warmup", "steps", "repeats", "mean_doc_len")})
    if args.long_context:
        meta.update(prefill_lengths=args.prefill_lengths, decode_context=args.decode_context,
                    decode_tokens=args.decode_tokens)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
