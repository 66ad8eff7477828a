"""Loop overhead: tokens/s of `braid train` against a bare forward/backward/step loop.

    python benchmarks/bench_train_loop.py [--config configs/tiny.yaml] [--steps 60] [--repeats 2]
                                          [--out benchmarks/results/train_loop.json]

Both train the same model (same preset, seed, initial weights) on the same batches of the
same loader, with AdamW over the same parameter groups, gradient clipping and the same LR
schedule. `braid train` adds DeepSpeed (ZeRO-1 engine), metrics.jsonl, TensorBoard, the stop
check and the final checkpoint; validation is off. Tokens/s is counted over windows of
`--window` steps, the first window (warm-up) dropped, median of the rest; the two loops run
in turn, `--repeats` times, in one process. Needs the bundled corpus (`make train` prepares it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader  # noqa: E402
from launch.config_io import load_config  # noqa: E402
from model import HybridLM  # noqa: E402
from pretrain.config import TrainConfig, train_config  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402
from pretrain.schedule import build_scheduler  # noqa: E402
from pretrain.parallel import loss_fn  # noqa: E402
from pretrain.train import train  # noqa: E402


def braid_tokens_per_s(cfg: TrainConfig) -> list[float]:
    """Per-window tokens/s of `braid train` (the loop's own metrics), first window dropped."""
    train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        return [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r][1:]


def bare_tokens_per_s(cfg: TrainConfig, window: int) -> list[float]:
    """Per-window tokens/s of the plain PyTorch loop on the same model, batches and optimizer."""
    torch.manual_seed(cfg.seed)
    model = HybridLM(cfg.model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.max_steps)
    loader = build_train_loader(LoaderConfig(streams=[StreamSource(path=s.path) for s in cfg.data.train],
                                             seq_len=cfg.data.seq_len, batch_size=cfg.data.micro_batch,
                                             seed=cfg.seed))
    batches = loader.batches()
    rates, start = [], time.perf_counter()
    for step in range(1, cfg.train.max_steps + 1):
        batch = next(batches)
        loss = loss_fn(model(batch["input_ids"], doc_ids=batch["doc_ids"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % window == 0:
            loss.item()
            rates.append(window * cfg.data.micro_batch * cfg.data.seq_len / (time.perf_counter() - start))
            start = time.perf_counter()
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_loop.json"))
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            cfg = train_config(load_config(args.config, [
                f"run_dir={tmp}/run{repeat}", f"train.max_steps={args.steps}", f"train.log_every={args.window}",
                "train.val_every=0", "data.val=null", f"checkpoint.every={args.steps}"]))
            bare = statistics.median(bare_tokens_per_s(cfg, args.window))
            braid = statistics.median(braid_tokens_per_s(cfg))
            runs.append({"bare_tokens_per_s": bare, "braid_tokens_per_s": braid, "ratio": braid / bare})
            print(f"repeat {repeat}: bare {bare:,.0f} tok/s, braid train {braid:,.0f} tok/s, "
                  f"ratio {braid / bare:.3f}", flush=True)
    result = {"config": args.config, "steps": args.steps, "window": args.window,
              "batch": cfg.data.micro_batch, "seq_len": cfg.data.seq_len, "runs": runs,
              "median_ratio": statistics.median(r["ratio"] for r in runs),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median ratio braid/bare {result['median_ratio']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
