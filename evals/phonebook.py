"""`braid eval phonebook MODEL`: look up one person's number in a phonebook of N entries.

Scores: {"accuracy": overall, "accuracy_by_entries": {N: accuracy}}; PNG: accuracy vs N.
"""
from __future__ import annotations

import argparse
from typing import Any

from evals import retrieval
from evals.common import EvalModel, figure_title
from evals.tasks import Sample, derive_seed
from evals.tasks import phonebook as task

SUITE = "phonebook"
SMOKE = {"entries": [4, 8], "samples": 2, "batch_size": 4, "progress": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, nargs="+", default=[10, 25, 50, 100, 200],
                        help="phonebook sizes (lines) to test")
    retrieval.add_common_arguments(parser, task.MAX_NEW_TOKENS, samples=10)
    retrieval.add_repeat_argument(parser, "so the prompt grows with the copies")


def build_samples(lm: EvalModel, entries: list[int], samples: int, seed: int,
                  repeat_context: int = 1) -> list[Sample]:
    """The same phonebooks and questions for every repeat_context (the seed does not depend on it)."""
    retrieval.check_options(entries=entries, samples=[samples])
    return [task.make_sample(lm.count_tokens, n, derive_seed(seed, SUITE, n, i), repeat_context) for n in entries
            for i in range(samples)]


def run(lm: EvalModel, out_dir: str, entries: list[int] = (10, 25, 50, 100, 200), samples: int = 10, seed: int = 0,
        batch_size: int = 8, max_new_tokens: int = task.MAX_NEW_TOKENS, progress: bool = True,
        repeat_context: int = 1) -> dict[str, Any]:
    """Run the suite, write out_dir/results.json and phonebook.png, return the record."""
    retrieval.check_options(batch_size=[batch_size], max_new_tokens=[max_new_tokens])
    rows = retrieval.evaluate(lm, build_samples(lm, entries, samples, seed, repeat_context), task.score,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc=SUITE)
    by_entries = retrieval.group_mean(rows, "entries")
    scores = {"accuracy": retrieval.mean(r["score"] for r in rows), "accuracy_by_entries": by_entries}
    prompt_tokens = retrieval.group_mean([{**r, "score": r["prompt_tokens"]} for r in rows], "entries")
    settings = {"entries": list(entries), "samples": samples, "seed": seed,
                "sample_seeds": "sha256(seed:phonebook:entries:index)", "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "stop": "eos or newline",
                **retrieval.repeat_settings(repeat_context), "prompt_tokens": prompt_tokens}
    return retrieval.finish(out_dir, SUITE, scores, settings, lm, rows,
                            lambda path: retrieval.line_plot(path, {"phonebook": by_entries}, "entries",
                                                             "accuracy",
                                                             figure_title("phonebook lookup", lm)))
