"""Who owns a run directory: `RUN_DIR/owner.json`, written when a launch claims it.

Two jobs writing one run directory would interleave their checkpoints, so a launch first claims it:

    {"launcher": "slurm", "job_id": "1234"}                               # braid launch slurm / the job itself
    {"launcher": "local", "host": "node7", "pid": 4242, "started": 1.7e9}  # braid launch local

A claim is refused while the recorded owner still runs: a Slurm job that `squeue` lists in a live state
(a requeued job keeps its id, so the job claiming for itself is always allowed), or a local launcher
whose process (same pid and start time, so a reused pid does not count) is alive on this host. What
cannot be checked from here (no `squeue`, another host) counts as not running.

`python -m launch.owner RUN_DIR` claims the directory for $SLURM_JOB_ID: the first line of work in
the sbatch script that `braid launch slurm` writes.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Any

import psutil

OWNER_FILE = "owner.json"
# squeue states after which a job holds nothing any more (every other listed state is live)
FINISHED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "TIMEOUT"}


def owner_path(run_dir: str) -> str:
    return os.path.join(run_dir, OWNER_FILE)


def read_owner(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(owner_path(run_dir)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):   # none yet, or a torn write of a claim that died
        return None


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it; None when squeue is missing or no longer knows the job."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "--noheader", "--jobs", str(job_id), "--format=%T"], capture_output=True, text=True)
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def live_owner(run_dir: str, job_id: str | None = None) -> str | None:
    """Who else holds `run_dir` right now, in words; None when it is free (or held by Slurm job `job_id`)."""
    owner = read_owner(run_dir)
    if owner is None:
        return None
    if owner.get("launcher") == "slurm":
        recorded = str(owner.get("job_id"))
        if job_id is not None and recorded == str(job_id):
            return None
        state = slurm_job_state(recorded)
        if state is None or state in FINISHED_STATES:
            return None
        return f"Slurm job {recorded} ({state}): wait for it, `scancel {recorded}`"
    if owner.get("launcher") == "local" and owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", 0))
        started = _process_started(pid) if pid > 0 else None
        if started is None or abs(started - float(owner.get("started", 0))) > 1e-3 or pid == os.getpid():
            return None
        return f"`braid launch local` (pid {pid} on {owner['host']}): wait for it, stop it"
    return None


def claim(run_dir: str, record: dict[str, Any], job_id: str | None = None) -> None:
    """Record `record` as the owner of `run_dir`, or raise ValueError naming the live owner."""
    os.makedirs(run_dir, exist_ok=True)
    path = owner_path(run_dir)
    # check-then-write under a lock: two launches racing for one directory cannot both pass the check
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holder = live_owner(run_dir, job_id)
        if holder is not None:
            raise ValueError(f"{run_dir}: run directory in use by {holder} or choose another run_dir")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
            f.write("\n")
        os.replace(path + ".tmp", path)


def claim_for_slurm_job(run_dir: str, job_id: str) -> None:
    claim(run_dir, {"launcher": "slurm", "job_id": str(job_id)}, job_id=str(job_id))


def claim_for_this_process(run_dir: str) -> None:
    """A local launch: the claim lasts as long as this process (checked by pid and start time)."""
    pid = os.getpid()
    claim(run_dir, {"launcher": "local", "host": socket.gethostname(), "pid": pid, "started": _process_started(pid)},
          job_id=os.environ.get("SLURM_JOB_ID"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or "SLURM_JOB_ID" not in os.environ:
        print("usage: python -m launch.owner RUN_DIR   (inside a Slurm job: claims RUN_DIR for $SLURM_JOB_ID)",
              file=sys.stderr)
        return 2
    try:
        claim_for_slurm_job(argv[0], os.environ["SLURM_JOB_ID"])
    except ValueError as err:
        print(f"braid: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
