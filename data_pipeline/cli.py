"""`braid data prepare|tokenizer RECIPE.yaml [k=v ...]` (routed here by launch/cli.py).

ValueError / FileNotFoundError raised from here are printed by launch/cli.py as one
`braid: error: ...` line with exit status 2.
"""
from __future__ import annotations

import json
from typing import Any

from data_pipeline.recipe import load_recipe


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report of `braid data prepare`."""
    if "submitted" in summary:
        jobs = ", ".join(f"{name}={job}" for name, job in summary["submitted"].items())
        return f"submitted Slurm jobs: {jobs}\nsummary will be written to {summary['output']}/stats.json"
    lines = [
        f"documents read        {summary['documents_read']:>12,}",
        f"malformed lines       {summary['malformed_lines']:>12,}",
    ]
    if summary.get("documents_without_text"):
        lines.append(f"records without text  {summary['documents_without_text']:>12,}  (recipe inputs' text_key)")
    for name, n in summary["dropped"].items():
        lines.append(f"dropped by {name:<11}{n:>12,}")
    lines.append(f"duplicates            {summary['duplicates']:>12,}")
    for split, s in summary["splits"].items():
        lines.append(f"{split:<5} documents       {s['documents']:>12,}")
        lines.append(f"{split:<5} tokens          {s['tokens']:>12,}  ({s['rows']:,} rows, {s['shards']} shards, "
                     f"{s['dropped_tail_tokens']:,} tail tokens dropped)")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.get("stage_time_s", {}).items())
    lines.append(f"time                  {summary['time_s']:>11.1f}s  ({stages})")
    return "\n".join(lines)


def run(action: str, recipe_path: str, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    if action == "tokenizer":
        from data_pipeline.tokenizer import train_from_recipe
        result = train_from_recipe(recipe)
        print(f"tokenizer: {result['path']} ({result['vocab_size']} tokens, trained on {result['documents']:,} "
              f"documents in {result['time_s']:.1f}s: {result['read']:,} read, {result['filtered']:,} dropped by "
              f"filters, {result['duplicates']:,} duplicates, {result['held_out']:,} held out for validation)")
        return 0
    if action == "prepare":
        from data_pipeline.prepare import prepare
        summary = prepare(recipe)
        print(format_summary(summary))
        if "submitted" not in summary:
            print(f"wrote {recipe.output} (stats: {json.dumps(summary['splits'])})")
        return 0
    raise ValueError(f"unknown data action {action!r} (prepare, tokenizer)")
