"""The `braid` command line. Each subcommand lives with its part of the stack; this file only routes.

    braid data prepare RECIPE.yaml [k=v ...]
    braid data tokenizer RECIPE.yaml [k=v ...]
    braid train CONFIG.yaml [k=v ...]
    braid launch local CONFIG.yaml --nproc N [k=v ...]
    braid launch slurm CONFIG.yaml --nodes N --gpus-per-node G [--cpu] [--partition P] [--time T]
                       [--account A] [--dry-run] [k=v ...]
    braid convert to-hf RUN_DIR_OR_CHECKPOINT OUT_DIR [--step N] [--dtype auto|bf16|fp32] [--format braid|native|FAMILY]
                        [--license ID]
    braid convert from-hf HF_DIR OUT_DIR [--tp N] [--pp M]
    braid eval SUITE MODEL [options]      SUITE: passkey niah ruler phonebook ppl speed harness
    braid eval report RUN_DIR
"""
from __future__ import annotations

import argparse
import os
import sys

# Before anything imports torch (OpenMP reads it once, at load): threads that wait sleep rather than spin
# on cores other threads or processes need (launch/threads.py). The user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _data(args: argparse.Namespace) -> int:
    from data_pipeline import cli as data_cli
    return data_cli.run(args.action, args.recipe, args.overrides)


def _train(args: argparse.Namespace) -> int:
    from launch.config_io import load_config
    from pretrain.train import run
    result = run(load_config(args.config, args.overrides))
    if result["rank"] == 0 and result["exit_code"] == 0:
        print(f"done: step {result['step']}, checkpoint {result['checkpoint']}", flush=True)
        for line in next_steps(result["run_dir"]):
            print(f"  next: {line}", flush=True)
    return result["exit_code"]


def _launch(args: argparse.Namespace) -> int:
    if args.launcher == "local":
        from launch.local import launch_local
        return launch_local(args.config, args.nproc, args.overrides)
    from launch.slurm import launch_slurm
    return launch_slurm(args.config, args.nodes, args.gpus_per_node, args.overrides, cpu=args.cpu,
                        partition=args.partition, time=args.time, account=args.account, dry_run=args.dry_run)


def _convert(args: argparse.Namespace) -> int:
    from conversion.cli import run
    return run(args)


def _eval(args: argparse.Namespace) -> int:
    from evals.cli import run
    return run(args)


def build_parser(eval_suites: bool = True) -> argparse.ArgumentParser:
    """The whole command line; eval_suites=False leaves `eval`'s own options out (a fast `braid --help`)."""
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

    launch = commands.add_parser("launch", help="start `braid train` ranks: torchrun here, or an sbatch job")
    launchers = launch.add_subparsers(dest="launcher", required=True)
    local = launchers.add_parser("local", help="torchrun with N ranks on this machine (nccl on GPUs, gloo on CPU)")
    local.add_argument("config", help="training YAML (see configs/tiny.yaml)")
    local.add_argument("--nproc", type=int, required=True, help="ranks (at most the visible GPUs on a GPU machine)")
    local.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    slurm = launchers.add_parser("slurm", help="write RUN_DIR/slurm/job.sbatch and submit it (requeued on USR1)")
    slurm.add_argument("config", help="training YAML; its launch: section holds the Slurm settings")
    slurm.add_argument("--nodes", type=int, required=True, help="nodes; one srun task (a torchrun) per node")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="GPUs requested per node, one rank each")
    slurm.add_argument("--cpu", action="store_true",
                       help="request no GPUs: --gpus-per-node ranks per node on CPU (gloo)")
    slurm.add_argument("--partition", help="overrides launch.slurm.partition")
    slurm.add_argument("--time", help="overrides launch.slurm.time (Slurm format, e.g. 24:00:00)")
    slurm.add_argument("--account", help="overrides launch.slurm.account")
    slurm.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    slurm.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    launch.set_defaults(handler=_launch)

    convert = commands.add_parser("convert", help="training checkpoints <-> Hugging Face folders")
    directions = convert.add_subparsers(dest="direction", required=True)
    to_hf = directions.add_parser("to-hf", help="a checkpoint (any TP/PP/ZeRO layout) -> a Hugging Face folder")
    to_hf.add_argument("source", help="run directory (its latest checkpoint) or a step_* checkpoint folder")
    to_hf.add_argument("out_dir", help="folder to create (written to a temporary folder, then moved into place)")
    to_hf.add_argument("--step", type=int, help="the run's checkpoint of this step instead of the latest")
    to_hf.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                       help="weight dtype (auto: as saved)")
    to_hf.add_argument("--format", dest="fmt", default="braid",
                       choices=["braid", "native", "mamba", "mamba2", "llama", "mistral", "qwen2", "nemotron_h",
                                "granitemoehybrid"],
                       help="braid: remote code, any pattern; native: transformers' own class that represents the "
                            "pattern exactly (served by vLLM and llama.cpp); or that class by name")
    to_hf.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one the run's data was made with)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (default 5GB)")
    to_hf.add_argument("--license", default="other",
                       help="the model card's licence (a Hugging Face licence id such as apache-2.0; default other)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    from_hf = directions.add_parser("from-hf", help="a Braid or native Hugging Face folder -> a run directory to "
                                                    "continue training from, split for --tp/--pp")
    from_hf.add_argument("hf_dir", help="folder written by `braid convert to-hf` (or a native Mamba folder)")
    from_hf.add_argument("out_dir", help="run directory to create; train with run_dir=OUT_DIR")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the training run")
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the training run")
    from_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    convert.set_defaults(handler=_convert)

    if eval_suites:
        from evals.cli import add_parsers
        add_parsers(commands)
    else:       # the suites' options import the suites (torch, lm-eval): only `braid eval ...` needs them
        from evals.cli import EVAL_HELP         # evals/cli.py imports no suite until asked
        commands.add_parser("eval", help=EVAL_HELP, add_help=False)
    commands.choices["eval"].set_defaults(handler=_eval)
    parser.subcommands = commands.choices
    return parser


# What to do with a finished run, shown by `braid train`.
NEXT_STEPS = ("braid convert to-hf {run_dir} {run_dir}/hf --overwrite", "braid eval ppl {run_dir}")


def next_steps(run_dir: str) -> list[str]:
    return [line.format(run_dir=run_dir) for line in NEXT_STEPS]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(eval_suites=argv[:1] == ["eval"])
    # options may stand between CONFIG and the overrides (`launch local CONFIG --nproc 2 k=v`): argparse
    # leaves the overrides after them unparsed, so they are collected here
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(arg.startswith("-") for arg in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides += rest
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:   # config and input errors: one line, no traceback
        print(f"braid: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
