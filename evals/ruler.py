"""`braid eval ruler MODEL`: RULER's offline tasks (niah_single_1, niah_multikey_2, niah_multikey_3, vt,
cwe, fwe) at each length, scored with RULER's string_match_all (as a fraction, not a percentage).

Scores: {"average": mean over lengths, "per_length": {length: {task: score, "average": mean over tasks}}};
PNG: score vs length per task.
"""
from __future__ import annotations

import argparse
from typing import Any

from evals import retrieval
from evals.common import EvalModel, figure_title
from evals.tasks import Sample, derive_seed
from evals.tasks import ruler as ruler_tasks

SUITE = "ruler"
SMOKE = {"lengths": [2048], "samples": 1, "max_new_tokens": 8, "batch_size": 6, "progress": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="context lengths in the model's tokens, answer included")
    parser.add_argument("--tasks", nargs="+", default=list(ruler_tasks.TASKS), help="RULER tasks to run")
    retrieval.add_common_arguments(parser, 0, samples=5)
    parser.set_defaults(max_new_tokens=0)


def new_tokens(task: str, max_new_tokens: int) -> int:
    """The answer budget of a task: RULER's tokens_to_generate unless overridden (> 0)."""
    return max_new_tokens if max_new_tokens > 0 else ruler_tasks.TASKS[task][1]


def build_samples(lm: EvalModel, lengths: list[int], task_names: list[str], samples: int, seed: int,
                  max_new_tokens: int = 0) -> list[Sample]:
    retrieval.check_options(lengths=lengths, samples=[samples])
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: {max_new_tokens} is negative (0 = RULER's per-task budget)")
    ruler_tasks.check_tasks(task_names)
    return [ruler_tasks.make_sample(name, lm.count_tokens, length, derive_seed(seed, SUITE, name, length, i),
                              retrieval.reserve_tokens(lm, new_tokens(name, max_new_tokens)))
            for name in task_names for length in lengths for i in range(samples)]


def run(lm: EvalModel, out_dir: str, lengths: list[int] = (1024, 2048, 4096),
        tasks: list[str] = tuple(ruler_tasks.TASKS),
        samples: int = 5, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Run the suite, write out_dir/results.json and ruler.png, return the record."""
    retrieval.check_options(batch_size=[batch_size])
    built = build_samples(lm, lengths, list(tasks), samples, seed, max_new_tokens)
    rows: list[dict[str, Any]] = []
    for name in tasks:           # one generation budget per task
        mine = [s for s in built if s.meta["task"] == name]
        rows += retrieval.evaluate(lm, mine, ruler_tasks.score, max_new_tokens=new_tokens(name, max_new_tokens),
                                   batch_size=batch_size, progress=progress, desc=f"{SUITE} {name}")
    per_length = retrieval.group_mean(rows, "length", "task")
    for scores_at in per_length.values():
        scores_at["average"] = retrieval.mean(scores_at[name] for name in tasks)
    scores = {"average": retrieval.mean(v["average"] for v in per_length.values()), "per_length": per_length}
    settings = {"lengths": list(lengths), "tasks": list(tasks), "samples": samples, "seed": seed,
                "sample_seeds": "sha256(seed:ruler:task:length:index)", "batch_size": batch_size,
                "max_new_tokens": {name: new_tokens(name, max_new_tokens) for name in tasks},
                "metric": "string_match_all (fraction)", "stop": "eos or newline",
                "prompt_tokens": retrieval.group_mean([{**r, "score": r["prompt_tokens"]} for r in rows],
                                                      "task", "length")}
    series = {name: {length: v[name] for length, v in per_length.items()} for name in [*tasks, "average"]}
    return retrieval.finish(out_dir, SUITE, scores, settings, lm, rows,
                            lambda path: retrieval.line_plot(path, series, "context length (tokens)",
                                                             "string_match_all",
                                                             figure_title("RULER (offline tasks)", lm)))
