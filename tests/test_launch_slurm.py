"""`braid launch slurm` on a real two-node Slurm cluster started on this machine (tests/slurm_cluster.py).

Two jobs train the tiny config on 2 nodes x 1 CPU rank at once: one runs unbroken, the other is preempted
with USR1 part-way, saves, requeues itself and resumes; its losses must be the unbroken run's, bit for bit.
The cluster comes from `make slurm` (run by `make test`); without it these tests fail and say so.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import free_port
from slurm_cluster import SlurmCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = SlurmCluster.missing()
    if why:
        pytest.fail(why)
    slurm = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()                     # kills every process of the cluster by id, and checks none is left


def braid_launch(cluster, *args):
    env = {**cluster.env, "PYTHONPATH": ROOT}          # the job's ranks import this checkout
    return subprocess.run([sys.executable, "-m", "launch.cli", "launch", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def submit(cluster, run_dir, overrides):
    out = braid_launch(cluster, "slurm", TINY, "--nodes", "2", "--gpus-per-node", "1", "--cpu", *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.search(r"submitted Slurm job (\d+)", out.stdout).group(1)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def wait_until(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_gpus_beyond_what_the_nodes_have(cluster, tmp_path):
    out = braid_launch(cluster, "slurm", TINY, "--nodes", "2", "--gpus-per-node", "1", f"run_dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip() == ("braid: error: --gpus-per-node=1: the nodes of the default partition have at "
                                  "most 0 GPU(s) (sinfo gres: (null)); use --cpu to run ranks on CPUs")


def test_preempted_job_requeues_and_resumes_the_unbroken_run(cluster, tmp_path, tiny_overrides):
    max_steps = 100                # about 10 s of steps: the signal lands well before the end
    common = {"train.max_steps": max_steps, "checkpoint.every": 20,
              "launch.master_port": free_port(),             # the rendezvous ports: this + job id % 1000
              "launch.slurm.env": "{OMP_NUM_THREADS: 1}"}     # 4 ranks share 2 cores
    unbroken, broken = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    unbroken_job = submit(cluster, unbroken, tiny_overrides(unbroken, common))
    broken_job = submit(cluster, broken, tiny_overrides(broken, common))

    metrics = os.path.join(broken, "metrics.jsonl")
    wait_until(lambda: os.path.exists(metrics) and len(records(broken)) >= 3, 300, f"3 steps in {metrics}")
    cluster.run(["scancel", "--signal=USR1", "--batch", broken_job])      # as `--signal=B:USR1@...` would

    # while the job lives (saving, requeued, resumed), its run directory is its own
    again = braid_launch(cluster, "slurm", TINY, "--nodes", "1", "--gpus-per-node", "1", "--cpu",
                         *tiny_overrides(broken, common))
    local = braid_launch(cluster, "local", TINY, "--nproc", "1", *tiny_overrides(broken, common))
    for refused in (again, local):
        assert refused.returncode == 2 and f"{broken}: run directory in use by Slurm job {broken_job} (" \
            in refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]

    def finished(job):
        return cluster.job_fields(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    wait_until(lambda: finished(broken_job) and finished(unbroken_job), 400, "both jobs to finish")
    log_path = os.path.join(broken, "slurm", f"slurm-{broken_job}.out")
    with open(log_path, errors="replace") as f:      # the ranks and the shell write it at once: torn characters
        log = f.read()
    for job, restarts in ((broken_job, "1"), (unbroken_job, "0")):
        fields = cluster.job_fields(job)
        assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", restarts, "0:0"), log

    saved = int(re.search(r"preempted \(signal [^)]*\): saved step (\d+)", log).group(1))
    assert 3 <= saved < max_steps                               # part-way
    for line in (f"braid: job {broken_job} restart 0 on n[1-2]", "braid: USR1: asking the ranks",
                 f"requeueing job {broken_job}", f"braid: job {broken_job} restart 1 on n[1-2]",
                 f"braid: resumed from step {saved:,} of {max_steps:,}", "braid: training ended with status 0"):
        assert line in log, line
    # the second start resumed from step `saved`: every step is logged once (one log, appended)
    resumed, reference = records(broken), records(unbroken)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(1, max_steps + 1))
    # fp32 on CPU, same seed and data order: the losses of the unbroken run, bit for bit
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert resumed[-1]["loss"] < resumed[0]["loss"]
    with open(os.path.join(broken, "owner.json")) as f:
        assert json.load(f) == {"launcher": "slurm", "job_id": broken_job}
