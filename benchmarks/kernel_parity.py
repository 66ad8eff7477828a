"""Kernel parity under training: the same run with the CUDA kernels and with the reference path.

    python benchmarks/kernel_parity.py [--config configs/tiny.yaml] [--steps 200] [--tolerance 0.02]
                                       [--fast cuda] [--fast-override k=v ...]
                                       [--out benchmarks/results/kernel_parity.json] [k=v ...]

Trains `--config` twice for `--steps` steps from the same seed on the same data, once with
`model.kernels=<--fast>` (cuda on a GPU: mamba-ssm, causal-conv1d, flash-attn, fla) and once
with `model.kernels=reference`, then compares the logged loss curves step by step: the
largest |difference| relative to the reference loss must stay under `--tolerance` (bf16
rounding differs between kernels and reference, so curves match to a few percent, not
bitwise). Writes the JSON and a PNG of both curves. Exits 1 when the curves part.
`--fast-override k=v` changes the fast run only: on CPU (where `--fast auto` is the
reference path) a perturbation such as `optim.lr=...` shows that the comparison catches a
difference; `compare_curves` is the comparison itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_losses(config: str, run_dir: str, kernels: str, steps: int, overrides: list[str]) -> dict[int, float]:
    """Losses by step of one `braid train` run in a fresh process."""
    cmd = [sys.executable, "-m", "launch.cli", "train", config, f"run_dir={run_dir}", f"model.kernels={kernels}",
           f"train.max_steps={steps}", "train.log_every=1", f"checkpoint.every={steps}", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r.get("loss") is not None}


def compare_curves(fast: dict[int, float], reference: dict[int, float], tolerance: float) -> dict:
    """Step-by-step |fast - reference| / |reference| over the steps both logged: the worst, where,
    and whether it stays under `tolerance`. A step one run logged and the other did not, or a
    non-finite loss, fails the comparison."""
    steps = sorted(set(fast) & set(reference))
    missing = sorted(set(fast) ^ set(reference))
    if not steps:
        raise ValueError("no step was logged by both runs")
    deviation = {s: abs(fast[s] - reference[s]) / abs(reference[s]) for s in steps}
    worst = max(steps, key=lambda s: (not math.isfinite(deviation[s]), deviation[s]))
    passed = not missing and all(math.isfinite(d) for d in deviation.values()) and deviation[worst] < tolerance
    return {"steps": steps, "missing_steps": missing, "max_relative_deviation": deviation[worst], "at_step": worst,
            "tolerance": tolerance, "passed": passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fast", default="cuda", help="model.kernels of the run checked against reference")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--fast-override", action="append", default=[], metavar="K=V",
                        help="an override for the fast run only (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_parity.json"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for both runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        fast = train_losses(args.config, f"{tmp}/fast", args.fast, args.steps, args.overrides + args.fast_override)
        reference = train_losses(args.config, f"{tmp}/reference", "reference", args.steps, args.overrides)
    comparison = compare_curves(fast, reference, args.tolerance)
    steps, worst = comparison.pop("steps"), comparison["at_step"]
    deviation = comparison["max_relative_deviation"]
    result = {"config": args.config, "steps": args.steps, "fast": args.fast, **comparison,
              "losses": {"fast": [fast[s] for s in steps], "reference": [reference[s] for s in steps]},
              "overrides": args.overrides, "fast_overrides": args.fast_override}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, result["losses"]["reference"], label="reference path")
    ax.plot(steps, result["losses"]["fast"], label=f"kernels={args.fast}", linestyle="--")
    ax.set(xlabel="step", ylabel="training loss",
           title=f"kernel parity: max relative deviation {deviation:.2%} at step {worst}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"max relative loss deviation {deviation:.3%} at step {worst} "
          f"({'within' if result['passed'] else 'OVER'} {args.tolerance:.1%}) -> {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
