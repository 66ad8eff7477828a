"""The `braid` command line. Each subcommand lives with its part of the stack; this file only routes.

    braid data prepare RECIPE.yaml [k=v ...]
    braid data tokenizer RECIPE.yaml [k=v ...]
    braid train CONFIG.yaml [k=v ...]
"""
from __future__ import annotations

import argparse
import sys


def _data(args: argparse.Namespace) -> int:
    from data_pipeline import cli as data_cli
    return data_cli.run(args.action, args.recipe, args.overrides)


def _train(args: argparse.Namespace) -> int:
    from pretrain import train
    return train.run(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braid", description="Pretraining stack for hybrid language models")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="prepare corpora: tokenizer training, datatrove -> MDS shards")
    data.add_argument("action", choices=["prepare", "tokenizer"])
    data.add_argument("recipe", help="recipe YAML (see configs/data/)")
    data.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    data.set_defaults(handler=_data)
    train = commands.add_parser("train", help="train a model (one process, or one per rank under torchrun/srun)")
    train.add_argument("config", help="training YAML (see configs/tiny.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    train.set_defaults(handler=_train)
    parser.subcommands = commands.choices
    return parser


# What to do with a finished run, shown by `braid train` for the subcommands this install has.
NEXT_STEPS = {
    "convert": "braid convert to-hf {run_dir} {run_dir}/hf",
    "eval": "braid eval ppl {run_dir}",
}


def next_steps(run_dir: str) -> list[str]:
    commands = build_parser().subcommands
    return [line.format(run_dir=run_dir) for name, line in NEXT_STEPS.items() if name in commands]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as err:   # config and input errors: one line, no traceback
        print(f"braid: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
