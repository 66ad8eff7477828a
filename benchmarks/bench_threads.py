"""CPU threads: training tokens/s of the tiny model under three OpenMP settings, in turn.

    python benchmarks/bench_threads.py [--config configs/tiny.yaml] [--steps 10] [--rounds 3] [--ranks 1]
                                       [--out benchmarks/results/threads.json]

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads it):
  torch    torch's defaults: OMP_NUM_THREADS and OMP_WAIT_POLICY unset (a thread per core, spinning waits)
  one      OMP_NUM_THREADS=1 (what torchrun sets for several ranks)
  braid    what `braid train` chooses (launch/threads.py): a share of the usable cores for `--ranks`
           ranks on this machine, OMP_WAIT_POLICY=PASSIVE
The process trains the config's model (forward, backward, AdamW) on random batches of the config's
micro-batch x seq_len: 2 warm-up steps, then `--steps` timed. The settings run in turn, `--rounds`
times, the order rotating, so a change in the machine's load falls on all of them; reported: each
setting's median tokens/s and the per-round ratios to `torch` (median, min, max).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = ("torch", "one", "braid")
_OMP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def environment(setting: str, ranks: int) -> dict[str, str]:
    from launch.threads import threads_per_rank
    env = {k: v for k, v in os.environ.items() if k not in _OMP}
    env["PYTHONPATH"] = str(REPO)
    if setting == "one":
        env["OMP_NUM_THREADS"] = "1"
    elif setting == "braid":
        env.update(OMP_NUM_THREADS=str(threads_per_rank(ranks)), OMP_WAIT_POLICY="PASSIVE")
    return env


def child(config: str, steps: int) -> None:
    """Time `steps` training steps in this process; print {"tokens_per_s", "threads"} as JSON."""
    import torch

    from launch.config_io import load_config
    from model import HybridLM
    from pretrain.config import train_config
    from pretrain.parallel import loss_fn
    cfg = train_config(load_config(config, ["train.val_every=0", "data.val=null"]))
    torch.manual_seed(0)
    model = HybridLM(cfg.model.replace(kernels="reference"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))

    def step() -> None:
        loss = loss_fn(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": steps * cfg.data.micro_batch * cfg.data.seq_len / elapsed,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=1, help="ranks sharing this machine (braid's share)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "threads.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.config, args.steps)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    loads = []
    for r in range(args.rounds):
        order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
        loads.append(os.getloadavg()[0])
        for setting in order:
            out = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, "--steps",
                                  str(args.steps)], env=environment(setting, args.ranks), cwd=REPO,
                                 capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {setting:>5}: {runs[setting][-1]['tokens_per_s']:8.0f} tokens/s "
                  f"({runs[setting][-1]['threads']} threads)", flush=True)
    result = {"meta": {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "load_1min_per_round": loads,
                       "platform": platform.platform(), "steps": args.steps, "rounds": args.rounds,
                       "ranks": args.ranks},
              "runs": runs, "median_tokens_per_s": {}, "ratio_to_torch": {}}
    for setting in SETTINGS:
        rates = [run["tokens_per_s"] for run in runs[setting]]
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[setting], runs["torch"])]
        result["median_tokens_per_s"][setting] = statistics.median(rates)
        result["ratio_to_torch"][setting] = {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios)}
        print(f"{setting:>5}: median {statistics.median(rates):8.0f} tokens/s, x{statistics.median(ratios):.2f} "
              f"torch's defaults (rounds: {min(ratios):.2f}..{max(ratios):.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
