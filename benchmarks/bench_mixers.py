"""CPU forward+backward time of each reference mixer against its sequential-loop twin, side by side.

For every mixer the same module runs twice per repeat: with its chunked reference op,
and with that op swapped for the naive per-token loop (what a plain PyTorch
implementation does). The Mamba-1 mixer is also timed against `transformers`'
MambaMixer slow path with identical weights. Ratios come from one run, interleaved.

    python benchmarks/bench_mixers.py [--length 4096] [--d-model 256] [--out benchmarks/results/mixers.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig  # noqa: E402
from model.layers import build_mixer  # noqa: E402
from model.layers.common import LinearSpec  # noqa: E402
from model.ops import attention as attention_ops, linear_attention, scan, selective_scan  # noqa: E402
from model.sequence import sequence_info  # noqa: E402

# module -> (attribute, naive replacement) to turn a mixer into its sequential twin
SEQUENTIAL = {
    "mamba": [("model.layers.mamba", "selective_scan", selective_scan.selective_scan_naive)],
    "mamba2": [("model.layers.mamba2", "chunk_linear_attention", linear_attention.linear_attention_naive)],
    "gla": [("model.layers.gla", "chunk_linear_attention", linear_attention.linear_attention_naive)],
    "rglru": [("model.layers.rglru", "linear_scan", scan.linear_scan_naive)],
    "swa": [("model.layers.attention", "attention", attention_ops.attention_naive)],
}


@contextlib.contextmanager
def swapped(patches):
    saved = []
    for module_name, attr, replacement in patches:
        module = sys.modules[module_name]
        saved.append((module, attr, getattr(module, attr)))
        fn = replacement
        if attr == "linear_scan":      # the naive scan has no chunk_size argument
            fn = lambda a, b, h0=None, chunk_size=None, _f=replacement: _f(a, b, h0)
        elif attr == "selective_scan":
            fn = lambda *args, chunk_size=None, _f=replacement: _f(*args)
        elif attr == "chunk_linear_attention":
            fn = lambda *args, chunk_size=None, _f=replacement, **kw: _f(*args, **kw)
        elif attr == "attention":
            fn = lambda q, k, v, block_size=None, _f=replacement, **kw: _f(q, k, v, **kw)
        setattr(module, attr, fn)
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def fwd_bwd(fn, x) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/mixers.json")
    parser.add_argument("--only", nargs="*", help="mixers to run (default: all)")
    parser.add_argument("--transformers-repeats", type=int, default=1,
                        help="repeats of the transformers slow path (minutes each at L=4096)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    d, L = args.d_model, args.length
    cfg = ModelConfig(d_model=d, pattern="MGSR-", kernels="reference",
                      attn=dict(n_heads=d // 64, window=512), gla=dict(n_heads=max(1, d // 128)))
    cases = {
        "mamba": build_mixer("mamba", cfg, LinearSpec()),
        "mamba2": build_mixer("mamba", cfg.replace(mamba=dict(version=2, d_state=64, head_dim=64)), LinearSpec()),
        "gla": build_mixer("gla", cfg, LinearSpec()),
        "rglru": build_mixer("rglru", cfg, LinearSpec()),
        "swa": build_mixer("swa", cfg, LinearSpec()),
    }
    seq = sequence_info((1, L), torch.device("cpu"))
    x = torch.randn(1, L, d)
    results = {}
    for name, mixer in cases.items():
        if args.only and name not in args.only:
            continue
        chunked, sequential = [], []
        for _ in range(args.repeats):
            chunked.append(fwd_bwd(lambda t: mixer(t, seq), x))
            with swapped(SEQUENTIAL[name]):
                sequential.append(fwd_bwd(lambda t: mixer(t, seq), x))
        results[name] = dict(reference_s=statistics.median(chunked), sequential_s=statistics.median(sequential))
        results[name]["speedup"] = results[name]["sequential_s"] / results[name]["reference_s"]
        print(f"{name:7s} reference {results[name]['reference_s']:.3f}s  sequential {results[name]['sequential_s']:.3f}s"
              f"  x{results[name]['speedup']:.1f}", flush=True)

    from transformers import MambaConfig as HFMambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer
    hf = MambaMixer(HFMambaConfig(hidden_size=d, state_size=16, conv_kernel=4, expand=2, time_step_rank=cfg.dt_rank,
                                  use_bias=False, use_conv_bias=True, use_mambapy=False), layer_idx=0)
    hf.load_state_dict(cases["mamba"].state_dict())
    ours_t, hf_t = [], []
    for _ in range(args.transformers_repeats):
        ours_t.append(fwd_bwd(lambda t: cases["mamba"](t, seq), x))
        hf_t.append(fwd_bwd(lambda t: hf.slow_forward(t), x))
    results["mamba_vs_transformers"] = dict(ours_s=statistics.median(ours_t), transformers_slow_s=statistics.median(hf_t))
    results["mamba_vs_transformers"]["speedup"] = statistics.median(hf_t) / statistics.median(ours_t)
    print(f"mamba-1 vs transformers slow path: ours {statistics.median(ours_t):.3f}s  transformers "
          f"{statistics.median(hf_t):.3f}s  x{results['mamba_vs_transformers']['speedup']:.1f}")

    meta = dict(length=L, d_model=d, batch=1, repeats=args.repeats, torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
