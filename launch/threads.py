"""CPU threads per rank: one rule for `braid train` and the launchers, printed at start-up.

torch's default is one intra-op thread per core of the machine, whatever else runs there: N ranks on
one node then ask for N times the cores, and OpenMP threads that spin-wait for a busy core slow every
step down several times over. So, unless OMP_NUM_THREADS is set, each rank takes an equal share of
the cores it may run on (its CPU affinity and cgroup quota: a Slurm allocation, a container limit).
The count depends only on the machine and the number of ranks, never on the load of the moment, so a
resumed run computes with the same number of threads as the run it continues. On a machine shared
with other work, OMP_WAIT_POLICY=PASSIVE (set by launch/cli.py before torch loads OpenMP, unless
set) lets a waiting thread sleep instead of spinning on a core another thread needs: 12.5x the
tokens/s of torch's defaults on a 2-core machine at load 7 (benchmarks/bench_threads.py).
"""
from __future__ import annotations

import math
import os


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (v2 or v1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    """The cgroup's CPU quota in CPUs (cpu.max, or cfs_quota_us / cfs_period_us); None: unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:                     # cgroup v2: "quota period" or "max period"
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:        # cgroup v1; -1: unlimited
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def threads_per_rank(local_ranks: int) -> int:
    """An equal share of the usable cores for each of `local_ranks` ranks on this machine (at least 1)."""
    return max(1, usable_cores() // max(1, local_ranks))


def configure_threads(local_ranks: int) -> str:
    """Set this rank's intra-op threads (OMP_NUM_THREADS if set, else `threads_per_rank`) and say how they
    were chosen, in one line for the start-up summary."""
    import torch

    given = os.environ.get("OMP_NUM_THREADS")
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    if given and given.isdigit() and int(given) > 0:
        torch.set_num_threads(int(given))
        return f"{given} per rank (OMP_NUM_THREADS={given} from the environment; OMP_WAIT_POLICY={wait})"
    threads = threads_per_rank(local_ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)          # for the processes this rank starts (inline evals)
    torch.set_num_threads(threads)
    ranks = f"{local_ranks} rank{'s' if local_ranks > 1 else ''}"
    return (f"{threads} per rank ({usable_cores()} usable cores / {ranks} on this machine; OMP_WAIT_POLICY={wait}; "
            "set OMP_NUM_THREADS to choose)")


if __name__ == "__main__":      # `python -m launch.threads N`: the threads per rank for N ranks here (sbatch script)
    import sys
    print(threads_per_rank(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
