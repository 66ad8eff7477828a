"""`braid eval SUITE MODEL [options]` and `braid eval report RUN_DIR` (routed here by launch/cli.py).

MODEL is a run directory (its latest checkpoint), a step_* checkpoint folder or a converted
Hugging Face folder. Results go to --out, by default beside the model:
    RUN_DIR/evals/SUITE/              a run directory
    RUN_DIR/evals/step_00000200/SUITE/   one of its checkpoints (this is where training's eval hooks write)
    HF_DIR/evals/SUITE/               a converted folder
Each suite module (evals/<suite>.py) has SUITE, SMOKE, add_arguments(parser) and run(lm, out_dir, **options).
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

SUITES = ("passkey", "niah", "ruler", "phonebook", "ppl", "speed", "harness")
_COMMON = ("suite", "model", "out", "step", "device", "dtype")


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown eval suite {name!r} (known: {', '.join(SUITES)})")
    return importlib.import_module(f"evals.{name}")


def default_out_dir(model: str, suite: str, step: int | None = None) -> str:
    from conversion.checkpoint import resolve_tag
    model = os.path.abspath(model.rstrip("/"))
    if os.path.isfile(os.path.join(model, "config.json")):
        return os.path.join(model, "evals", suite)
    tag = resolve_tag(model, step)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag)))
    if step is None and os.path.abspath(tag) != model:        # a run directory: its latest checkpoint
        return os.path.join(run_dir, "evals", suite)
    return os.path.join(run_dir, "evals", os.path.basename(tag), suite)


def add_parsers(commands: Any) -> None:
    """`eval` and its per-suite subcommands, on launch/cli.py's subparsers."""
    evaluate = commands.add_parser("eval", help="long-context suites, perplexity, speed, lm-eval; `report` gathers")
    suites = evaluate.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        module = suite_module(name)
        doc = (module.__doc__ or name).strip().splitlines()[0]
        parser = suites.add_parser(name, help=doc, description=doc)
        parser.add_argument("model", help="run directory, step_* checkpoint, or converted Hugging Face folder")
        module.add_arguments(parser)
        parser.add_argument("--out", help="results folder (default: beside the model, see `braid eval --help`)")
        parser.add_argument("--step", type=int, help="a run directory's checkpoint of this step (default: latest)")
        parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default fp32)")
    report = suites.add_parser("report", help="one Markdown page of a run's (or folder's) eval results and plots")
    report.add_argument("model", help="run directory or converted folder whose evals/ to gather")
    report.add_argument("--out", help="Markdown file (default: MODEL/evals/REPORT.md)")


def run(args: argparse.Namespace) -> int:
    if args.suite == "report":
        from evals.report import write_report
        path = write_report(args.model, args.out)
        print(f"report: {path}")
        return 0
    import torch

    from evals.common import load_eval_model
    module = suite_module(args.suite)
    options = {k: v for k, v in vars(args).items() if k not in _COMMON and k not in ("command", "handler",
                                                                                      "overrides")}
    out_dir = args.out or default_out_dir(args.model, args.suite, args.step)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lm = load_eval_model(args.model, step=args.step, dtype=dtype, device=args.device)
    record = module.run(lm, out_dir, **options)
    print(f"{args.suite}: {os.path.join(out_dir, 'results.json')}")
    print(summary_line(args.suite, record.get("scores", {})))
    return 0


def summary_line(suite: str, scores: dict[str, Any]) -> str:
    """The headline numbers of a suite's scores, for the terminal and for training's metrics."""
    flat = headline_scores(suite, scores)
    return "  " + ("  ".join(f"{k} {v:.4g}" for k, v in flat.items()) if flat else "(see results.json)")


def headline_scores(suite: str, scores: dict[str, Any]) -> dict[str, float]:
    """Numbers worth a line in metrics.jsonl: top-level numeric scores, and one level down for per-task dicts."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
        elif isinstance(value, dict) and suite == "harness":
            for metric, number in value.items():
                if isinstance(number, (int, float)) and "stderr" not in metric:
                    flat[f"{key}/{metric.split(',')[0]}"] = float(number)
    return flat
