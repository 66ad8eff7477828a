"""CPU timings of the chunked scans against their naive loops (forward + backward).

    python benchmarks/bench_scans.py [--length 4096] [--repeats 3] [--out benchmarks/results/scans.json]

Each case times both implementations side by side in the same process on the same
inputs, alternating between them so that any load from other processes hits both alike,
and reports the median over the repeats (after one warm-up call each) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.ops.linear_attention import chunk_linear_attention, linear_attention_naive  # noqa: E402
from model.ops.scan import linear_scan, linear_scan_naive  # noqa: E402


def scan_inputs(batch: int, length: int, state: tuple[int, ...]) -> list[torch.Tensor]:
    a = torch.rand(batch, length, *state).mul_(0.5).add_(0.5)   # decays in [0.5, 1)
    b = torch.randn(batch, length, *state)
    return [a.requires_grad_(), b.requires_grad_()]


def attention_inputs(batch: int, heads: int, length: int, dk: int, dv: int, decay_dim: int) -> list[torch.Tensor]:
    q = torch.randn(batch, heads, length, dk) * dk ** -0.5
    k = torch.randn(batch, heads, length, dk)
    v = torch.randn(batch, heads, length, dv)
    g = torch.nn.functional.logsigmoid(torch.randn(batch, heads, length, decay_dim)) / 8
    return [x.requires_grad_() for x in (q, k, v, g)]


def time_fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> float:
    """Seconds for fn(*inputs) and a backward pass through all of its outputs."""
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().mean() for o in out).backward()
    return time.perf_counter() - start


def compare(chunked: Callable, naive: Callable, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Median seconds of chunked and naive, measured alternately."""
    time_fwd_bwd(chunked, inputs), time_fwd_bwd(naive, inputs)   # warm-up
    times = [(time_fwd_bwd(chunked, inputs), time_fwd_bwd(naive, inputs)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scans.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    length, chunk = args.length, args.chunk_size

    cases = [
        ("linear_scan  Mamba-1 (B=1, D=256, N=16)", scan_inputs(1, length, (256, 16)),
         lambda a, b: linear_scan(a, b, chunk_size=chunk), linear_scan_naive),
        ("linear_scan  RG-LRU  (B=1, D=1024)", scan_inputs(1, length, (1024,)),
         lambda a, b: linear_scan(a, b, chunk_size=chunk), linear_scan_naive),
        ("linear_attn  GLA (B=1, H=4, K=64, V=128, vector decay)", attention_inputs(1, 4, length, 64, 128, 64),
         lambda *x: chunk_linear_attention(*x, chunk_size=chunk), linear_attention_naive),
        ("linear_attn  SSD (B=1, H=8, K=64, V=64, scalar decay)", attention_inputs(1, 8, length, 64, 64, 1),
         lambda *x: chunk_linear_attention(*x, chunk_size=chunk), linear_attention_naive),
    ]

    rows = []
    print(f"forward+backward, L={length}, chunk={chunk}, median of {args.repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<58}{'chunked ms':>12}{'naive ms':>12}{'speed-up':>10}")
    for name, inputs, chunked, naive in cases:
        t_chunked, t_naive = compare(chunked, naive, inputs, args.repeats)
        rows.append({"case": name, "chunked_ms": 1e3 * t_chunked, "naive_ms": 1e3 * t_naive,
                     "speedup": t_naive / t_chunked})
        print(f"{name:<58}{1e3 * t_chunked:>12.1f}{1e3 * t_naive:>12.1f}{t_naive / t_chunked:>9.1f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"length": length, "chunk_size": chunk, "repeats": args.repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
