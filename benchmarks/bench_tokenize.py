"""Tokenize-and-write throughput of one `braid data prepare` worker against plain `encode_batch`.

    python benchmarks/bench_tokenize.py [--recipe configs/data/tiny.yaml] [--repeats 3]
                                        [--out benchmarks/results/tokenize.json]

All cases run in this process on the same documents (the recipe's bundled corpus) with the
recipe's tokenizer: (a) `Tokenizer.encode_batch` over the documents in chunks of
`tokenizer.batch_size` (ids only, nothing kept); (a') the same with `encode_batch_fast`, the call the
pipeline makes (it skips offsets); (b) the pipeline's MDSTokenWriter step, which encodes the same
chunks, packs the ids into rows with document starts and writes zstd MDS shards.
Reported: tokens/s of each (median of the repeats after a warm-up), (b)/(a) and (b)/(a').
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datatrove.data import Document  # noqa: E402

from data_pipeline.corpus import ensure_corpus  # noqa: E402
from data_pipeline.pipeline import MDSTokenWriter, build_readers  # noqa: E402
from data_pipeline.recipe import load_recipe  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, tokenizer_info  # noqa: E402


def plain_encode(texts: list[str], tokenizer_path: str, batch_size: int, method: str) -> tuple[float, int]:
    tokenizer = load_tokenizer(tokenizer_path)
    encode = getattr(tokenizer, method)
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
        tokens += sum(len(enc.ids) for enc in encode(texts[i:i + batch_size], add_special_tokens=False))
    return time.perf_counter() - start, tokens


def pipeline_write(texts: list[str], step_kwargs: dict) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        step = MDSTokenWriter(output_dir=out, **step_kwargs)
        docs = (Document(text=t, id=str(i)) for i, t in enumerate(texts))
        start = time.perf_counter()
        for _ in step.run(docs, rank=0, world_size=1):
            pass
        elapsed = time.perf_counter() - start
        # documents' tokens without the EOS the step adds, so both sides count the same ids
        tokens = int(step.stats["train_tokens"].total) - len(texts)
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/data/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/tokenize.json")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    ensure_corpus(recipe)
    info = tokenizer_info(recipe.tokenizer)   # needs `braid data tokenizer` to have run
    texts = [doc.text for reader in build_readers(recipe, progress=False) for doc in reader.run(None, 0, 1)]
    chars = sum(len(t) for t in texts)
    batch_size = recipe.tokenizer.batch_size
    step_kwargs = dict(tokenizer_path=info.path, eos_id=info.eos_id, row_length=recipe.shards.row_length,
                       token_dtype=info.token_dtype, validation=0.0, size_limit=recipe.size_limit_bytes,
                       compression=recipe.shards.compression, batch_size=batch_size)

    results = {}
    cases = {"encode_batch": lambda: plain_encode(texts, info.path, batch_size, "encode_batch"),
             # what the pipeline calls (no offsets); shown so the comparison hides nothing
             "encode_batch_fast": lambda: plain_encode(texts, info.path, batch_size, "encode_batch_fast"),
             "pipeline": lambda: pipeline_write(texts, step_kwargs)}
    for name, fn in cases.items():
        fn()   # warm-up
        runs = [fn() for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        results[name] = {"seconds": round(seconds, 4), "tokens": runs[0][1],
                         "tokens_per_s": round(runs[0][1] / seconds)}
        print(f"{name:<17} {results[name]['tokens']:>10,} tokens in {seconds:6.2f}s = "
              f"{results[name]['tokens_per_s']:>12,} tokens/s")
    ratio = results["pipeline"]["tokens_per_s"] / results["encode_batch"]["tokens_per_s"]
    ratio_fast = results["pipeline"]["tokens_per_s"] / results["encode_batch_fast"]["tokens_per_s"]
    print(f"pipeline / encode_batch = {ratio:.2f}   pipeline / encode_batch_fast = {ratio_fast:.2f}")

    report = {
        "benchmark": "tokenize_and_write",
        "corpus": {"documents": len(texts), "chars": chars},
        "tokenizer": {"path": info.path, "vocab_size": info.vocab_size},
        "batch_size": batch_size, "row_length": recipe.shards.row_length, "repeats": args.repeats,
        "results": results, "ratio": round(ratio, 3), "ratio_vs_encode_batch_fast": round(ratio_fast, 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": __import__("os").cpu_count()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
