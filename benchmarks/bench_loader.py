"""Training-loader throughput (tokens/s in one process) from local MDS shards, next to numpy.

    python benchmarks/bench_loader.py [--tokens 8e6] [--repeats 3] [--compression zstd]
                                      [--out benchmarks/results/loader.json]

For seq_len 256 and 4096, batch 8, 0 and 2 DataLoader workers, it writes one local MDS
dataset of random token rows (with document starts about every 1000 tokens, as the prepare
side writes them), then times `build_train_loader` over it (shuffled, one rank). Side by
side, on the same rows in a random order:
  numpy gather   rows gathered from one uncompressed in-memory (rows, seq_len + 1) uint16
                 array and made int64 tensors: the floor of reading;
  numpy + batch  the same, plus building the batch dict with `make_batch` (the loader's
                 own code for labels and doc_ids), so what is left is streaming's share.
A loader pass is one epoch after building the loader; its first batch (worker start-up,
shard opening) is timed apart as `first_batch_ms`, and tokens/s counts the rest. Median
over the repeats, the three measured in turn. With workers, tokens/s is what the main
process receives.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.mds import MDSWriter  # noqa: E402
from data_pipeline.streaming import LoaderConfig, build_train_loader, make_batch  # noqa: E402

BATCH = 8
VOCAB = 32000
MEAN_DOC = 1000


def write_dataset(out: Path, rows: int, row_length: int, compression: str | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random rows as MDS shards in `out`; returns them in memory too: (rows, row_length), starts."""
    tokens = rng.integers(0, VOCAB, (rows, row_length), dtype=np.uint16)
    stream_starts = np.cumsum(rng.geometric(1 / MEAN_DOC, rows * row_length // MEAN_DOC * 2))
    stream_starts = stream_starts[stream_starts < rows * row_length]
    starts = []
    columns = {"tokens": "ndarray:uint16", "doc_starts": "ndarray:int32"}
    with MDSWriter(out=str(out), columns=columns, compression=compression) as writer:
        for i in range(rows):
            begin, end = np.searchsorted(stream_starts, [i * row_length, (i + 1) * row_length])
            row_starts = (stream_starts[begin:end] - i * row_length).astype(np.int32)
            starts.append(row_starts)
            writer.write({"tokens": tokens[i],
                          "doc_starts": row_starts if len(row_starts) else np.array([row_length], np.int32)})
    return tokens, starts


def time_loader(data: Path, seq_len: int, workers: int) -> tuple[float, float, int]:
    """(seconds for the first batch, seconds for the rest, batches) of one epoch."""
    loader = build_train_loader(LoaderConfig(streams=[str(data)], seq_len=seq_len, batch_size=BATCH,
                                             num_workers=workers, seed=1))
    batches = 0
    start = time.perf_counter()
    first = 0.0
    for _ in loader:
        batches += 1
        if batches == 1:
            first = time.perf_counter() - start
            start = time.perf_counter()
    return first, time.perf_counter() - start, batches


def time_numpy(tokens: np.ndarray, starts: list[np.ndarray], order: np.ndarray, with_batch: bool) -> float:
    """Seconds to produce batches of the rows `order` (but the first batch) from the array."""
    start = time.perf_counter()
    for i in range(BATCH, len(order), BATCH):
        idx = order[i:i + BATCH]
        rows = tokens[idx]
        if with_batch:
            make_batch(rows, [starts[j] for j in idx])
        else:
            torch.from_numpy(rows.astype(np.int64))
    return time.perf_counter() - start


def time_tiny_training(data: Path, steps: int = 5) -> float:
    """Tokens/s a bare forward/backward/AdamW loop on the `tiny` preset consumes from this loader
    (batch 8, seq_len 256): the rate the loader has to sustain."""
    from model import HybridLM, get_preset
    cfg = get_preset("tiny")
    lm = HybridLM(cfg)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    loader = build_train_loader(LoaderConfig(streams=[str(data)], seq_len=256, batch_size=BATCH))
    batches = loader.batches()
    elapsed = []
    for _ in range(steps + 1):                       # the first step warms up
        batch = next(batches)
        start = time.perf_counter()
        labels = batch["labels"]                     # the synthetic ids are folded into the preset's vocabulary
        labels = torch.where(labels >= 0, labels % cfg.vocab_size, labels)
        logits = lm(batch["input_ids"] % cfg.vocab_size, doc_ids=batch["doc_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elapsed.append(time.perf_counter() - start)
    return BATCH * 256 / statistics.median(elapsed[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=8e6, help="tokens per dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    print(f"batch {BATCH}, {args.tokens:.0e} tokens per dataset, median of {args.repeats}, "
          f"compression {args.compression}, {os.cpu_count()} cores")
    print(f"{'seq_len':>8}{'workers':>8}{'loader tok/s':>14}{'first ms':>10}{'numpy+batch':>13}"
          f"{'numpy gather':>14}{'÷ +batch':>10}{'÷ gather':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in (256, 4096):
            rows = int(args.tokens // (seq_len + 1))
            data = Path(tmp) / f"rows_{seq_len}"
            tokens, starts = write_dataset(data, rows, seq_len + 1, args.compression, rng)
            if seq_len == 256:
                train_tps = time_tiny_training(data)
                print(f"tiny training consumes {train_tps:.3g} tokens/s (bare fwd/bwd/AdamW, batch {BATCH}x256)")
            for workers in (0, 2):
                runs, batch_s, gather_s = [], [], []
                for _ in range(args.repeats):     # alternating, so that load from elsewhere hits all alike
                    runs.append(time_loader(data, seq_len, workers))
                    order = rng.permutation(rows)[:runs[-1][2] * BATCH]   # as scattered as a shuffle gets
                    batch_s.append(time_numpy(tokens, starts, order, True))
                    gather_s.append(time_numpy(tokens, starts, order, False))
                n_tokens = (runs[0][2] - 1) * BATCH * seq_len
                loader_s = statistics.median(r[1] for r in runs)
                batch_s, gather_s = statistics.median(batch_s), statistics.median(gather_s)
                row = {"seq_len": seq_len, "batch_size": BATCH, "workers": workers, "rows": rows,
                       "tokens_timed": n_tokens,
                       "loader_tokens_per_s": n_tokens / loader_s,
                       "first_batch_ms": 1e3 * statistics.median(r[0] for r in runs),
                       "numpy_batch_tokens_per_s": n_tokens / batch_s,
                       "numpy_gather_tokens_per_s": n_tokens / gather_s}
                results.append(row)
                print(f"{seq_len:>8}{workers:>8}{row['loader_tokens_per_s']:>14.3g}{row['first_batch_ms']:>10.0f}"
                      f"{row['numpy_batch_tokens_per_s']:>13.3g}{row['numpy_gather_tokens_per_s']:>14.3g}"
                      f"{row['numpy_batch_tokens_per_s'] / row['loader_tokens_per_s']:>9.1f}x"
                      f"{row['numpy_gather_tokens_per_s'] / row['loader_tokens_per_s']:>9.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tiny_training_tokens_per_s": train_tps,
            "loader_headroom_over_tiny_training": results[0]["loader_tokens_per_s"] / train_tps,
            "batch_size": BATCH, "tokens_per_dataset": args.tokens, "repeats": args.repeats,
            "compression": args.compression, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average_after": os.getloadavg()}   # other processes on the machine skew the numbers
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
