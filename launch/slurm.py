"""`braid launch slurm CONFIG --nodes N --gpus-per-node G [...] [k=v ...]`: an sbatch script, written and submitted.

The script goes to RUN_DIR/slurm/job.sbatch with the config as resolved at submission
(RUN_DIR/slurm/config.yaml, overrides applied), so a requeue or a later `sbatch RUN_DIR/slurm/job.sbatch`
trains exactly what was submitted, and resumes from the run directory's checkpoint. The job:

  1. claims the run directory for its job id (launch.owner; a requeued job keeps its id);
  2. runs one srun task per node, each a torchrun with a static rendezvous: node rank = SLURM_NODEID,
     master = the first node of the allocation, port = launch.master_port + job id % 1000;
  3. on USR1 (`--signal=B:USR1@launch.signal_seconds` before the time limit, or
     `scancel --signal=USR1 --batch JOB`), forwards it to the training step, whose ranks save a
     checkpoint at their next step boundary and exit; once they have, it requeues itself
     (`--requeue`; `--open-mode=append` keeps one log across restarts).

With `--cpu`, G is the number of ranks per node on CPU (gloo) and no GPUs are requested.
The one task of a node runs all G ranks, so it asks for their CPUs (launch.slurm.cpus_per_task;
else whole nodes for GPU jobs, one CPU per rank with --cpu) and memory (--mem=0 unless sbatch_args
names one). Every node must see the run directory, the data and the interpreter at the same paths:
a shared filesystem.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import yaml

from launch import owner
from launch.local import check_process_layout, load_train_config
from launch.settings import LaunchConfig, slurm_time_seconds

SCRIPT_NAME = "job.sbatch"
CONFIG_NAME = "config.yaml"
# sbatch options the script sets itself, and what sets them
RESERVED_OPTIONS = {
    "nodes": "--nodes", "ntasks": "--nodes (one task per node)", "ntasks-per-node": "--nodes (one task per node)",
    "gpus": "--gpus-per-node", "gpus-per-node": "--gpus-per-node", "gres": "--gpus-per-node",
    "gpus-per-task": "--gpus-per-node", "chdir": "braid launch slurm (the submission directory)",
    "output": "braid launch slurm (RUN_DIR/slurm/slurm-%j.out)", "error": "braid launch slurm (one log)",
    "open-mode": "braid launch slurm (append)", "requeue": "braid launch slurm", "no-requeue": "braid launch slurm",
    "signal": "launch.signal_seconds",
}
MEMORY_OPTIONS = {"mem", "mem-per-cpu", "mem-per-gpu"}
_MAX_SIGNAL_SECONDS = 65535              # sbatch's limit for --signal=...@seconds


def job_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "slurm")


def check_launch(launch: LaunchConfig) -> None:
    launch.slurm.check("launch.slurm", reserved=RESERVED_OPTIONS)
    if not 0 < launch.signal_seconds <= _MAX_SIGNAL_SECONDS:
        raise ValueError(f"launch.signal_seconds={launch.signal_seconds}: must be in 1..{_MAX_SIGNAL_SECONDS}")
    if launch.slurm.time is not None:
        limit = slurm_time_seconds(launch.slurm.time, "launch.slurm.time")
        if launch.signal_seconds >= limit:
            raise ValueError(f"launch.signal_seconds={launch.signal_seconds} is not shorter than the time limit "
                             f"launch.slurm.time={launch.slurm.time} ({limit} s): the job would be signalled at start")
    if not 1024 <= launch.master_port <= 65535 - 1000:
        raise ValueError(f"launch.master_port={launch.master_port}: must be in 1024..{65535 - 1000} "
                         "(the job id adds up to 999)")


def render_script(launch: LaunchConfig, run_dir: str, nodes: int, per_node: int, request_gpus: bool, python: str,
                  workdir: str) -> str:
    """The sbatch script: deterministic for given arguments (no time stamps; the port comes from the job id)."""
    slurm = launch.slurm
    directory = job_dir(run_dir)
    options: dict[str, str | None] = {"job-name": slurm.job_name or os.path.basename(os.path.normpath(run_dir)),
                                      "nodes": str(nodes), "ntasks-per-node": "1"}
    if request_gpus:
        options["gpus-per-node"] = str(per_node)
    options.update(slurm.sbatch_options())
    # One task per node runs torchrun and every rank of the node, so it needs their CPUs and memory
    # (Slurm's default is one CPU and the site's default memory per task).
    cpus = slurm.cpus_per_task or (None if request_gpus else per_node)
    if cpus is not None:
        options["cpus-per-task"] = str(cpus)            # GPU jobs without a count: whole nodes (below)
    elif "exclusive" not in slurm.sbatch_args:         # exclusive: false keeps shared nodes
        options["exclusive"] = None
    if not MEMORY_OPTIONS & set(options):
        options["mem"] = "0"                             # all of each node's memory
    options.update({"chdir": workdir, "output": os.path.join(directory, "slurm-%j.out"), "open-mode": "append",
                    "requeue": None, "signal": f"B:USR1@{launch.signal_seconds}"})
    header = [f"#SBATCH --{name}" if value is None else f"#SBATCH --{name}={value}" for name, value in options.items()]
    environment = slurm.environment_lines()
    q = shlex.quote
    step_cpus = f" --cpus-per-task={cpus}" if cpus is not None else " --whole"
    lines = [
        "#!/bin/bash",
        f"# Written by `braid launch slurm`. `sbatch {q(os.path.join(directory, SCRIPT_NAME))}` resubmits it; "
        "the run resumes from its checkpoint.",
        *header,
        "set -uo pipefail",
        "",
        *(["# environment: launch.slurm.setup, launch.slurm.env", *environment, ""] if environment else []),
        f"RUN_DIR={q(run_dir)}",
        f"export BRAID_PYTHON={q(python)}",
        f"export BRAID_CONFIG={q(os.path.join(directory, CONFIG_NAME))}",
        "",
        "# USR1 (time limit near, or `scancel --signal=USR1 --batch`): pass it to the training step, whose ranks",
        "# save a checkpoint at their next step boundary and exit; then requeue (below)",
        "PREEMPTED=0",
        "SRUN_PID=",
        "forward_usr1() {",
        "  PREEMPTED=1",
        '  echo "braid: USR1: asking the ranks to save a checkpoint and stop"',
        '  if [ -n "$SRUN_PID" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null; fi',
        "}",
        "trap forward_usr1 USR1",
        "",
        "# the run directory belongs to this job (a requeued job keeps its id); another live job there stops us",
        '"$BRAID_PYTHON" -m launch.owner "$RUN_DIR" || exit 1',
        "",
        "# static rendezvous: node rank = SLURM_NODEID; master = the first node, at the address Slurm itself uses",
        "# for it (NodeAddr); the port follows the job id, so jobs sharing a first node do not collide",
        'MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_ADDR=$(scontrol show node \"$MASTER_NODE\" --oneliner | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')",
        'export MASTER_ADDR=${MASTER_ADDR:-$MASTER_NODE}',
        f"export MASTER_PORT=$(({launch.master_port} + SLURM_JOB_ID % 1000))",
        'echo "braid: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' master $MASTER_ADDR:$MASTER_PORT"',
        "",
        'if [ "$PREEMPTED" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; exit 0; fi   # signalled before the start',
        "# one task per node. torchrun ignores USR1: Slurm signals every process of the step, and torchrun would",
        "# die of it; the ranks catch it. --kill-on-bad-exit=0: a node that stops first must not cut rank 0's save",
        "# The task gets its CPUs explicitly (since Slurm 22.05 srun does not take --cpus-per-task from sbatch;",
        "# --whole: all of the node's), and each rank an equal share of them as threads unless OMP_NUM_THREADS is set",
        f"srun --ntasks-per-node=1{step_cpus} --kill-on-bad-exit=0 bash -c 'trap \"\" USR1; "
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(\"$BRAID_PYTHON\" -m launch.threads {per_node})}}; "
        "exec \"$BRAID_PYTHON\" -m launch.torchrun \\",
        f'    --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node={per_node} \\',
        '    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \\',
        "    -m launch.cli train \"$BRAID_CONFIG\"' &",
        "SRUN_PID=$!",
        "# a trapped signal ends `wait` early: wait again while srun runs",
        "while :; do",
        '  wait "$SRUN_PID"; STATUS=$?',
        '  if [ "$STATUS" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi',
        "  break",
        "done",
        "",
        'if [ "$PREEMPTED" = 1 ] && [ "$STATUS" -ne 0 ]; then',
        '  echo "braid: the ranks stopped (status $STATUS): requeueing job $SLURM_JOB_ID, which resumes from'
        ' the last checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'echo "braid: training ended with status $STATUS"',
        'exit "$STATUS"',
    ]
    return "\n".join(lines) + "\n"


def partition_gpus(partition: str | None) -> tuple[int, str] | None:
    """The most GPUs a node of `partition` (None: the default one) has, with sinfo's gres text; None if unknown."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "--noheader", "--format=%P %G"] + (["--partition", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    best, text = 0, ""
    for line in out.stdout.splitlines():
        name, _, gres = line.partition(" ")
        if partition is None and not name.endswith("*"):          # sinfo marks the default partition with *
            continue
        # gres like "gpu:8", "gpu:a100:4(S:0-1)", "gpu:a100:4,gpu:v100:2", "(null)"
        count = sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        if count >= best:
            best, text = count, gres
    return best, text


def launch_slurm(config_path: str, nodes: int, gpus_per_node: int, overrides: list[str], *, cpu: bool = False,
                 partition: str | None = None, time: str | None = None, account: str | None = None,
                 dry_run: bool = False) -> int:
    mapping, cfg = load_train_config(config_path, overrides)
    launch = cfg.launch
    for name, value in (("partition", partition), ("time", time), ("account", account)):
        if value is not None:            # a flag beats the config's launch.slurm value
            setattr(launch.slurm, name, value)
    if nodes < 1:
        raise ValueError(f"--nodes={nodes}: must be >= 1")
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node={gpus_per_node}: must be >= 1")
    check_launch(launch)
    check_process_layout(cfg, nodes, gpus_per_node, "--gpus-per-node")
    script = render_script(launch, cfg.run_dir, nodes, gpus_per_node, request_gpus=not cpu,
                           python=launch.python or sys.executable, workdir=os.getcwd())
    if dry_run:
        sys.stdout.write(script)
        return 0

    if shutil.which("sbatch") is None:
        raise FileNotFoundError("`sbatch` not found on PATH: braid launch slurm submits from a Slurm login node "
                                "(--dry-run prints the script without submitting)")
    holder = owner.live_owner(cfg.run_dir, os.environ.get("SLURM_JOB_ID"))
    if holder is not None:
        raise ValueError(f"{cfg.run_dir}: run directory in use by {holder} or choose another run_dir")
    if not cpu:
        known = partition_gpus(launch.slurm.partition)
        if known is not None and gpus_per_node > known[0]:
            where = f"partition {launch.slurm.partition}" if launch.slurm.partition else "the default partition"
            raise ValueError(f"--gpus-per-node={gpus_per_node}: the nodes of {where} have at most {known[0]} GPU(s) "
                             f"(sinfo gres: {known[1]}); use --cpu to run ranks on CPUs")

    directory = job_dir(cfg.run_dir)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        yaml.safe_dump(mapping, f, sort_keys=False)
    script_path = os.path.join(directory, SCRIPT_NAME)
    with open(script_path, "w") as f:
        f.write(script)
    out = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True)
    if out.returncode != 0:
        reason = "; ".join(line for line in (out.stderr + out.stdout).splitlines() if line.strip())
        raise ValueError(f"sbatch {script_path} failed ({out.returncode}): {reason}")
    job_id = out.stdout.strip().split(";")[0]          # --parsable: "id" or "id;cluster"
    owner.claim_for_slurm_job(cfg.run_dir, job_id)
    print(f"submitted Slurm job {job_id}: {nodes} node(s) x {gpus_per_node} {'CPU rank' if cpu else 'GPU'}(s)\n"
          f"script {script_path}\nlog    {os.path.join(directory, f'slurm-{job_id}.out')}", flush=True)
    return 0
