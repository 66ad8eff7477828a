"""Eval hooks: the config's `evals` suites run on checkpoints as training saves them.

    RUN_DIR/evals/step_00000200/ppl/results.json   written by `braid eval ppl RUN_DIR --step 200 --out ...`
    RUN_DIR/evals/step_00000200/ppl.log            that command's output (read it when an eval failed)
    RUN_DIR/evals/logged.json                      results already logged to metrics.jsonl
    RUN_DIR/slurm/eval-step_00000200.sbatch        slurm mode: the job that runs the suites of that step
    RUN_DIR/evals/step_00000200/PENDING            slurm mode: the job has not finished; checkpoint
                                                   pruning keeps step_00000200 until it has

Only rank 0 acts. Inline mode runs each suite as a subprocess (its memory and RNG stay out of training;
the other ranks wait at their next collective) and logs its scores at once; slurm mode submits one
job per checkpoint and does not wait. Finished results not yet logged are picked up at the start,
at log steps (slurm mode) and at the end, and logged as {"step": N, "eval/SUITE/NAME": value}
at the checkpoint's step N; logged.json and metrics.jsonl's own eval records keep a restart from
logging them twice. A failed eval
is one line on stderr; training goes on.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable

from .config import TrainConfig

LOGGED = "logged.json"
PENDING = "PENDING"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "evals", f"step_{step:08d}")


def resolve_mode(mode: str) -> str:
    """auto -> slurm inside a Slurm job that can submit (SLURM_JOB_ID set, sbatch on PATH), else inline."""
    if mode != "auto":
        return mode
    return "slurm" if os.environ.get("SLURM_JOB_ID") and shutil.which("sbatch") else "inline"


def _warn(line: str) -> None:
    """One line on stderr, on a line of its own even while training's progress bar is drawn."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


class EvalHook:
    """Runs or submits the evals of a saved checkpoint and logs finished results (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, active: bool, log: Callable[[dict[str, Any]], None],
                 warn: Callable[[str], None] | None = None) -> None:
        self.cfg, self.log = cfg, log
        self.active = active and cfg.evals.every > 0
        self.warn = warn or _warn
        if not self.active:
            return
        self.mode = resolve_mode(cfg.evals.mode)
        self.commands = cfg.evals.commands()
        self.python = cfg.launch.python or sys.executable
        self.root = os.path.join(cfg.run_dir, "evals")
        os.makedirs(self.root, exist_ok=True)

    def due(self, step: int) -> bool:
        return self.active and step % self.cfg.evals.every == 0

    # ---- running -------------------------------------------------------------------------------

    def command(self, suite: str, step: int) -> list[str]:
        """`braid eval SUITE RUN_DIR --step N --out RUN_DIR/evals/step_N/SUITE [suite options]`."""
        cmd = [self.python, "-m", "launch.cli", "eval", suite, self.cfg.run_dir, "--step", str(step),
               "--out", os.path.join(step_dir(self.cfg.run_dir, step), suite), "--device", self.device()]
        if self.cfg.evals.tokenizer:
            cmd += ["--tokenizer", self.cfg.evals.tokenizer]
        return cmd + self.commands[suite]

    def device(self) -> str:
        if self.cfg.evals.device:
            return self.cfg.evals.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def after_save(self, step: int, preempted: bool = False) -> None:
        """Called on rank 0 after checkpoint `step` is saved: run (inline) or submit (slurm) its suites."""
        if not self.due(step):
            return
        if self.mode == "slurm":
            self.submit(step)
        elif preempted:
            self.warn(f"braid: evals of step {step} deferred: preempted (they run when training resumes)")
        else:
            self.run_inline(step)
            self.collect()

    def catch_up(self, step: int) -> None:
        """On resume: checkpoint `step` was due evals that never started (the save was a preemption's)."""
        if not self.due(step) or step == 0 or os.path.isdir(step_dir(self.cfg.run_dir, step)):
            return
        self.after_save(step)

    def run_inline(self, step: int) -> None:
        os.makedirs(step_dir(self.cfg.run_dir, step), exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
        for suite in self.commands:
            log_path = os.path.join(step_dir(self.cfg.run_dir, step), f"{suite}.log")
            with open(log_path, "w") as log:
                code = subprocess.run(self.command(suite, step), stdout=log, stderr=subprocess.STDOUT,
                                      env=env).returncode
            if code != 0:
                self.warn(f"braid: eval {suite} at step {step} failed (exit {code}); see {log_path}")

    def script(self, step: int) -> str:
        """The sbatch script of one checkpoint's evals: launch.slurm's partition/account/time/setup, one task."""
        slurm = self.cfg.launch.slurm
        name = slurm.job_name or os.path.basename(os.path.normpath(self.cfg.run_dir))
        options: dict[str, str | None] = {"job-name": f"{name}-eval", "nodes": "1", "ntasks": "1"}
        if self.device().startswith("cuda"):
            options["gpus"] = "1"
        options.update(slurm.sbatch_options())
        options.update({"chdir": os.getcwd(), "requeue": None, "open-mode": "append",
                        "output": os.path.join(self.cfg.run_dir, "slurm", f"eval-step_{step:08d}-%j.out")})
        header = [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in options.items()]
        q = shlex.quote
        lines = ["#!/bin/bash", f"# Written by braid train (evals.every={self.cfg.evals.every}): the evals of "
                 f"checkpoint step {step}; `sbatch` this file to run them again.", *header, "set -uo pipefail", "",
                 *slurm.environment_lines(), f"export PYTHONPATH={q(_REPO)}${{PYTHONPATH:+:$PYTHONPATH}}",
                 f"mkdir -p {q(step_dir(self.cfg.run_dir, step))}", "STATUS=0"]
        for suite in self.commands:
            log_path = os.path.join(step_dir(self.cfg.run_dir, step), f"{suite}.log")
            lines.append(f"{shlex.join(self.command(suite, step))} > {q(log_path)} 2>&1 || "
                         f"{{ STATUS=1; echo \"braid: eval {suite} at step {step} failed; see {log_path}\" >&2; }}")
        lines.append(f"rm -f {q(os.path.join(step_dir(self.cfg.run_dir, step), PENDING))}   # the checkpoint may go now")
        lines.append('exit "$STATUS"')
        return "\n".join(lines) + "\n"

    def submit(self, step: int) -> None:
        """Write RUN_DIR/slurm/eval-step_N.sbatch and sbatch it (after this job started, when in one)."""
        directory = os.path.join(self.cfg.run_dir, "slurm")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"eval-step_{step:08d}.sbatch")
        with open(path, "w") as f:
            f.write(self.script(step))
        os.makedirs(step_dir(self.cfg.run_dir, step), exist_ok=True)
        marker = os.path.join(step_dir(self.cfg.run_dir, step), PENDING)
        with open(marker, "w") as f:
            f.write(path + "\n")
        cmd = ["sbatch", "--parsable"]
        if os.environ.get("SLURM_JOB_ID"):
            cmd.append(f"--dependency=after:{os.environ['SLURM_JOB_ID']}")
        try:
            out = subprocess.run([*cmd, path], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            os.remove(marker)
            self.warn(f"braid: evals of step {step} not submitted ({err}); script {path}")
            return
        if out.returncode != 0:
            os.remove(marker)
            reason = "; ".join(line for line in (out.stderr + out.stdout).splitlines() if line.strip())
            self.warn(f"braid: evals of step {step} not submitted: sbatch failed ({out.returncode}): {reason}")
            return
        from tqdm import tqdm
        tqdm.write(f"braid: evals of step {step}: Slurm job {out.stdout.strip().split(';')[0]} ({path})")

    def pending_tags(self) -> set[str]:
        """Checkpoint tags whose submitted eval job has not finished (not to be pruned yet)."""
        if not self.active:
            return set()
        return {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(self.root, "step_*", PENDING))}

    def on_log_step(self) -> None:
        """Slurm mode: results of submitted jobs land in metrics.jsonl at the next log step after they finish."""
        if self.active and self.mode == "slurm":
            self.collect()

    # ---- logging ---------------------------------------------------------------------------------

    def _logged(self) -> set[str]:
        """step_N/SUITE keys already logged: logged.json, and eval records in metrics.jsonl itself (a kill
        between writing the record and logged.json must not log it twice)."""
        logged: set[str] = set()
        try:
            with open(os.path.join(self.root, LOGGED)) as f:
                logged.update(json.load(f))
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(self.cfg.run_dir, "metrics.jsonl")) as f:
                for line in f:
                    if '"eval/' not in line:
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue            # a torn last line
                    logged.update(f"step_{record['step']:08d}/{key.split('/')[1]}" for key in record
                                  if key.startswith("eval/"))
        except OSError:
            pass
        return logged

    def _save_logged(self, logged: set[str]) -> None:
        path = os.path.join(self.root, LOGGED)
        with open(path + ".tmp", "w") as f:
            json.dump(sorted(logged), f, indent=1)
        os.replace(path + ".tmp", path)

    def collect(self) -> int:
        """Log every finished RUN_DIR/evals/step_N/SUITE/results.json not logged before; returns how many."""
        if not self.active:
            return 0
        from evals.cli import headline_scores
        logged = self._logged()
        found: dict[int, dict[str, Any]] = {}
        keys = []
        for path in sorted(glob.glob(os.path.join(self.root, "step_*", "*", "results.json"))):
            suite_dir = os.path.dirname(path)
            key = os.path.relpath(suite_dir, self.root).replace(os.sep, "/")
            if key in logged:
                continue
            try:
                step = int(os.path.basename(os.path.dirname(suite_dir)).split("_", 1)[1])
                with open(path) as f:
                    record = json.load(f)
                suite = record.get("suite") or os.path.basename(suite_dir)
                scores = headline_scores(suite, record.get("scores") or {})
            except (OSError, ValueError, IndexError, AttributeError) as err:
                self.warn(f"braid: {path}: not a results file ({err}); not logged")
                continue
            found.setdefault(step, {}).update({f"eval/{suite}/{name}": value for name, value in scores.items()})
            keys.append(key)
        for step in sorted(found):
            if found[step]:
                self.log({"step": step, **found[step]})
        if keys:
            self._save_logged(logged | set(keys))
        return len(keys)
