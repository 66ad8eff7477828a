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
EVAL_HELP = "long-context suites, perplexity, speed, lm-eval; `report` gathers"
_COMMON = ("suite", "model", "out", "step", "device", "dtype", "tokenizer")


def suite_module(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown eval suite {name!r} (known: {', '.join(SUITES)})")
    return importlib.import_module(f"evals.{name}")


def suite_parser(name: str) -> argparse.ArgumentParser:
    """A parser of the suite's own options only (no MODEL, no common options): what a config may set."""
    parser = argparse.ArgumentParser(prog=f"braid eval {name}", add_help=False)
    suite_module(name).add_arguments(parser)
    return parser


def suite_options(name: str, value: Any, where: str) -> dict[str, Any]:
    """A config's settings of one suite -> run() keyword arguments. `smoke`, null or {} mean the suite's
    SMOKE settings; other keys must be the suite's options (ValueError naming `where`.KEY otherwise)."""
    module = suite_module(name)
    if value in (None, "smoke") or value == {}:
        return dict(module.SMOKE)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {value!r} is not a mapping of {name} options or `smoke`")
    dests = {a.dest for a in suite_parser(name)._actions}
    for key in value:
        if key not in dests:
            raise ValueError(f"{where}.{key}: unknown option of the {name} suite "
                             f"(known: {', '.join(sorted(dests))})")
    return dict(value)


def suite_argv(name: str, options: dict[str, Any], where: str = "options") -> list[str]:
    """run() keyword arguments -> the `braid eval SUITE` command-line options that give them; checked by
    parsing them back (ValueError naming `where` with argparse's message if they do not parse)."""
    import contextlib
    import io

    parser = suite_parser(name)
    actions = {a.dest: a for a in parser._actions}
    argv: list[str] = []
    for key, value in options.items():
        action = actions.get(key)
        if action is None:
            raise ValueError(f"{where}.{key}: unknown option of the {name} suite")
        flag = action.option_strings[-1] if action.option_strings else None
        if flag is None:
            raise ValueError(f"{where}.{key}: not an option of the {name} suite")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(value) != bool(action.default):
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, (list, tuple)) else [value]:
                argv += [flag, str(item)]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            argv += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(argv)
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid options"
        raise ValueError(f"{where}: {message}") from None
    return argv


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


def suite_summary(name: str) -> str:
    """A suite's one-sentence help: the first paragraph of its module docstring on one line, without the
    "`braid eval NAME MODEL`:" or "`NAME` suite:" it starts with (argparse wraps it at word boundaries)."""
    doc = (suite_module(name).__doc__ or name).strip()
    paragraph = " ".join(line.strip() for line in doc.split("\n\n", 1)[0].splitlines())
    for prefix in (f"`braid eval {name} MODEL`:", f"`{name}` suite:"):
        paragraph = paragraph.removeprefix(prefix).strip()
    return paragraph


def add_parsers(commands: Any) -> None:
    """`eval` and its per-suite subcommands, on launch/cli.py's subparsers."""
    evaluate = commands.add_parser("eval", help=EVAL_HELP)
    suites = evaluate.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        doc = suite_summary(name)
        parser = suites.add_parser(name, help=doc, description=doc)
        parser.add_argument("model", help="run directory, step_* checkpoint, or converted Hugging Face folder")
        suite_module(name).add_arguments(parser)
        parser.add_argument("--out", help="results folder (default: beside the model, see `braid eval --help`)")
        parser.add_argument("--step", type=int, help="a run directory's checkpoint of this step (default: latest)")
        parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (default fp32)")
        parser.add_argument("--tokenizer", help="tokenizer.json to use instead of the model's own (the one its "
                                                "run's data was made with, or the converted folder's)")
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
    lm = load_eval_model(args.model, step=args.step, dtype=dtype, device=args.device, tokenizer=args.tokenizer)
    record = module.run(lm, out_dir, **options)
    print(f"{args.suite}: {os.path.join(out_dir, 'results.json')}")
    print(summary_line(args.suite, record.get("scores", {})))
    return 0


def summary_line(suite: str, scores: dict[str, Any]) -> str:
    """The headline numbers of a suite's scores, for the terminal and for training's metrics."""
    flat = headline_scores(suite, scores)
    return "  " + ("  ".join(f"{k} {v:.4g}" for k, v in flat.items()) if flat else "(see results.json)")


def headline_scores(suite: str, scores: dict[str, Any]) -> dict[str, float]:
    """Numbers worth a line in metrics.jsonl: top-level numeric scores; per-task metrics of the harness
    (`task/metric`); one-level maps of numbers such as speed-up per length (`name@length`)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    flat: dict[str, float] = {}
    for key, value in scores.items():
        if number(value):
            flat[key] = float(value)
        elif isinstance(value, dict) and suite == "harness":
            for metric, x in value.items():
                if number(x) and "stderr" not in metric:
                    flat[f"{key}/{metric.split(',')[0]}"] = float(x)
        elif isinstance(value, dict) and value and all(number(x) for x in value.values()):
            flat.update({f"{key}@{sub}": float(x) for sub, x in value.items()})
    return flat
