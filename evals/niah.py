"""`braid eval niah MODEL`: needle in a haystack (generated prose filler) over a grid of lengths x depths.

Scores: {"accuracy": overall, "grid": {length: {depth: accuracy}}}; PNG: depth x length heatmap.
"""
from __future__ import annotations

import argparse
from typing import Any

from evals import retrieval
from evals.common import EvalModel
from evals.tasks import niah as task

SUITE = "niah"
SMOKE = {"lengths": [512, 1024], "depths": [0.0, 0.5, 1.0], "samples": 1, "batch_size": 6, "progress": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    retrieval.add_grid_arguments(parser, task.MAX_NEW_TOKENS)


def run(lm: EvalModel, out_dir: str, lengths: list[int] = (1024, 2048, 4096),
        depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 5, seed: int = 0, batch_size: int = 8,
        max_new_tokens: int = task.MAX_NEW_TOKENS, progress: bool = True, repeat_context: int = 1) -> dict[str, Any]:
    """Run the suite, write out_dir/results.json and niah.png, return the record."""
    return retrieval.run_grid(lm, out_dir, SUITE, task, lengths=lengths, depths=depths, samples=samples, seed=seed,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                              repeat_context=repeat_context)
