"""Sliding-window attention on CPU: blocked kernel vs dense reference, forward + backward.

    python benchmarks/bench_window_attention.py                 # L = 4K, 16K, 64K at W = 512
    python benchmarks/bench_window_attention.py --sweep-block   # also time block sizes

The point is the scaling: the blocked ``attention(window=W)`` should cost O(L * W) in
time and memory (constant time and memory per token as L grows), the dense
``attention_naive`` O(L^2). The dense one is skipped once a single float32 score matrix
would exceed --dense-max-gb (forward+backward keeps several of them alive).

Peak memory: every measurement runs in a fresh Python subprocess, which reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark of the
process's resident memory, minus the resident memory once torch is imported and the
inputs exist. torch's CPU allocator takes memory straight from malloc/mmap and large
tensors are written right away, so their pages are resident: the high-water mark sees
them, whereas tracemalloc does not see torch allocations at all. A fresh process per
measurement keeps one run's high-water mark from hiding the next one's. Two details make
the number track live tensors rather than allocator state: the child runs with glibc's
MALLOC_MMAP_THRESHOLD_ pinned to 64 KiB, so every large tensor is its own mmap returned
to the kernel on free (glibc's default adaptive threshold moves freed large blocks onto
the heap, where they stay resident and the RSS grows run after run with no new tensors);
and a tiny call of the same op runs before the baseline, so one-off library set-up is
not counted.

Timing: median of --repeats fwd+bwd runs after one warm-up run. --threads sets torch's
intra-op threads (default: torch's default). On small shared VMs a second vCPU can be
unreliable (OpenMP threads spinning at barriers while it is descheduled); --threads 1
then gives stable numbers.

Results go to --out (JSON) and a PNG plot with the same name next to it.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def run_one(
    impl: str,
    L: int,
    W: int,
    B: int,
    H: int,
    D: int,
    block_size: int | None,
    repeats: int,
    threads: int,
) -> dict:
    """Child-process body: time fwd+bwd of one configuration and report its peak memory."""
    import torch

    sys.path.insert(0, str(REPO))
    from model.ops.attention import attention, attention_naive, default_block_size

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)

    def fwd_bwd(length: int) -> Callable[[], None]:
        q, k, v = (torch.randn(B, H, length, D, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, length, D)
        if impl == "blocked":
            return lambda: attention(q, k, v, window=W, block_size=block_size).backward(do)
        return lambda: attention_naive(q, k, v, window=W).backward(do)

    fwd_bwd(64)()  # library set-up (thread pools, BLAS buffers) happens before the baseline
    fn = fwd_bwd(L)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times = []
    for i in range(repeats + 1):  # the first run is warm-up: first-touch page faults
        start = time.perf_counter()
        fn()  # q, k, v .grad accumulate in place: allocated by the warm-up, reused after
        elapsed = time.perf_counter() - start
        if i > 0:
            times.append(elapsed)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb
    return {
        "impl": impl,
        "L": L,
        "W": W,
        "block_size": (block_size or default_block_size(W)) if impl == "blocked" else None,
        "time_s": statistics.median(times),
        "time_s_all": times,
        "us_per_token": statistics.median(times) / (B * L) * 1e6,
        "peak_mem_mb": peak_kb / 1024,
        "threads": torch.get_num_threads(),
    }


def measure(
    impl: str, L: int, W: int, args: argparse.Namespace, block_size: int | None = None
) -> dict:
    """Run one configuration in a fresh subprocess (see the module docstring)."""
    cmd = [
        sys.executable, __file__, "--_child", impl, str(L), str(W), str(block_size or 0),
        "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--repeats", str(args.repeats), "--threads", str(args.threads or 0),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} L={L} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> list[dict]:
    """Growth between consecutive lengths: linear scaling gives per-token ratios of ~1."""
    out = []
    for a, b in zip(rows, rows[1:]):
        out.append({
            "impl": a["impl"],
            "from_L": a["L"],
            "to_L": b["L"],
            "length_ratio": b["L"] / a["L"],
            "time_ratio": b["time_s"] / a["time_s"],
            "time_per_token_ratio": b["us_per_token"] / a["us_per_token"],
            "memory_ratio": b["peak_mem_mb"] / a["peak_mem_mb"],
            "memory_per_token_ratio": (b["peak_mem_mb"] / b["L"]) / (a["peak_mem_mb"] / a["L"]),
        })
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("time_s", "fwd+bwd time (s)"), ("peak_mem_mb", "peak memory (MB)"))
    for ax, (key, label) in zip(axes, panels):
        for impl, style in (("blocked", "o-"), ("dense", "s--")):
            rows = [r for r in result["results"] if r["impl"] == impl]
            if rows:
                ax.plot([r["L"] for r in rows], [r[key] for r in rows], style, label=f"{impl}")
        blocked = [r for r in result["results"] if r["impl"] == "blocked"]
        if blocked:  # linear reference through the first blocked point
            x0, y0 = blocked[0]["L"], blocked[0][key]
            xs = [r["L"] for r in blocked]
            ax.plot(xs, [y0 * x / x0 for x in xs], ":", color="gray", label="linear in L")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        for skip in result["skipped"]:
            ax.axvline(skip["L"], color="C1", alpha=0.3, linestyle=":")
            ax.annotate(f"{skip['impl']} skipped", (skip["L"], 0.03), rotation=90, ha="right",
                        xycoords=("data", "axes fraction"), fontsize=8, color="C1")
        ax.legend(loc="upper left")
    c = result["config"]
    fig.suptitle(
        f"sliding-window attention, W={c['window']}, B={c['batch']} H={c['heads']} "
        f"D={c['head_dim']} fp32, CPU, {c['threads']} thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/window_attention.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs after one warm-up; the median is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--dense-max-gb", type=float, default=5.0,
                        help="skip the dense reference when one fp32 score matrix exceeds this")
    parser.add_argument("--sweep-block", action="store_true",
                        help="also time block sizes 32..512 for several windows at L=8192")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        impl, L, W, C = args._child
        row = run_one(impl, int(L), int(W), args.batch, args.heads, args.head_dim,
                      int(C) or None, args.repeats, args.threads)
        print(json.dumps(row))
        return

    W = args.window
    results, skipped = [], []
    for L in args.lengths:
        row = measure("blocked", L, W, args)
        results.append(row)
        print(f"blocked L={L:6d}: {row['time_s']:7.3f}s  {row['us_per_token']:7.2f} us/token  "
              f"{row['peak_mem_mb']:8.1f} MB peak  (C={row['block_size']})", flush=True)
        score_gb = args.batch * args.heads * L * L * 4 / 1e9
        if score_gb > args.dense_max_gb:
            note = (f"dense skipped at L={L}: one fp32 score matrix is {score_gb:.1f} GB "
                    f"(> --dense-max-gb={args.dense_max_gb}); fwd+bwd would hold several")
            skipped.append({"impl": "dense", "L": L, "reason": note})
            print(note, flush=True)
            continue
        try:
            row = measure("dense", L, W, args)
        except RuntimeError as err:  # e.g. killed for memory: record it, keep the blocked results
            skipped.append({"impl": "dense", "L": L, "reason": f"failed: {str(err)[-500:]}"})
            print(f"dense L={L} failed", flush=True)
            continue
        results.append(row)
        print(f"dense   L={L:6d}: {row['time_s']:7.3f}s  {row['us_per_token']:7.2f} us/token  "
              f"{row['peak_mem_mb']:8.1f} MB peak", flush=True)

    result = {
        "config": {"window": W, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                   "dtype": "float32", "repeats": args.repeats, "cpu_count": os.cpu_count(),
                   "threads": results[0]["threads"] if results else None,
                   "memory_method": "ru_maxrss delta in a fresh subprocess per measurement"},
        "results": results,
        "skipped": skipped,
        "ratios": {
            impl: ratios([r for r in results if r["impl"] == impl]) for impl in ("blocked", "dense")
        },
    }
    for impl, rs in result["ratios"].items():
        for r in rs:
            print(f"{impl} L {r['from_L']} -> {r['to_L']} (x{r['length_ratio']:.0f}): "
                  f"time x{r['time_ratio']:.2f}, time/token x{r['time_per_token_ratio']:.2f}, "
                  f"memory x{r['memory_ratio']:.2f}, "
                  f"memory/token x{r['memory_per_token_ratio']:.2f}")

    if args.sweep_block:
        sweep = []
        for w in (64, 256, 512, 1024, 4096):
            line = []
            for c in (32, 64, 128, 256, 512):
                row = measure("blocked", 8192, w, args, block_size=c)
                sweep.append(row)
                line.append(f"C={c}: {row['time_s']:.3f}s/{row['peak_mem_mb']:.0f}MB")
            print(f"sweep L=8192 W={w}: " + "  ".join(line), flush=True)
        result["block_sweep"] = sweep

    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
