"""`braid launch`: the sbatch script (golden files), its checks and errors, run-directory ownership,
the Slurm settings shared with data recipes, and `braid launch local` end to end.

The golden scripts are tests/golden/*.sbatch; after an intended change to the script, regenerate them with
`BRAID_UPDATE_GOLDEN=1 pytest tests/test_launch.py -k golden` and review the diff.
(tests/test_launch_slurm.py runs the scripts on a real Slurm cluster.)
"""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launch import owner
from test_train import assert_resumed_from, tag_logged_records
from launch.cli import main as braid
from launch.settings import LaunchConfig, SlurmSettings, slurm_time_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
GOLDEN = os.path.join(ROOT, "tests", "golden")

GOLDEN_CASES = {
    # one node, nothing but the required flags
    "slurm_1node.sbatch": ["--nodes", "1", "--gpus-per-node", "8"],
    # four nodes with everything a site needs: partition/time/account flags, venv and module lines,
    # NCCL variables, extra sbatch options, CPUs per task, a shorter signal lead time
    "slurm_4nodes.sbatch": ["--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--time", "2-00:00:00",
                            "--account", "lm-pretrain", "run_dir=runs/samba-4n",
                            "launch.slurm.setup=[source /opt/braid/.venv/bin/activate, module load cuda/12.4]",
                            "launch.slurm.env={NCCL_DEBUG: WARN, NCCL_SOCKET_IFNAME: ib0, NCCL_IB_HCA: 'mlx5_0:1'}",
                            "launch.slurm.sbatch_args={exclusive: true, mem: 0}", "launch.slurm.cpus_per_task=32",
                            "launch.slurm.qos=high", "launch.signal_seconds=600"],
    # what tests/test_launch_slurm.py submits: ranks on CPU, no GPU request
    "slurm_2nodes_cpu.sbatch": ["--nodes", "2", "--gpus-per-node", "1", "--cpu", "run_dir=runs/cpu",
                                "launch.slurm.env={OMP_NUM_THREADS: 1}"],
}


def _dry_run(capsys, monkeypatch, tmp_path, args):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert braid(["launch", "slurm", TINY, *args, "--dry-run"]) == 0
    # the two machine-specific values: the submission directory and the interpreter
    return capsys.readouterr().out.replace(str(tmp_path), "{WORKDIR}").replace(sys.executable, "{PYTHON}")


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_dry_run_script_matches_golden(name, capsys, monkeypatch, tmp_path):
    script = _dry_run(capsys, monkeypatch, tmp_path, GOLDEN_CASES[name])
    path = os.path.join(GOLDEN, name)
    if os.environ.get("BRAID_UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
    with open(path) as f:
        assert script == f.read(), f"{name} changed: BRAID_UPDATE_GOLDEN=1 regenerates it (review the diff)"
    assert not (tmp_path / "runs").exists()           # a dry run writes nothing
    assert _dry_run(capsys, monkeypatch, tmp_path, GOLDEN_CASES[name]) == script      # deterministic


def test_script_structure(capsys, monkeypatch, tmp_path):
    script = _dry_run(capsys, monkeypatch, tmp_path, GOLDEN_CASES["slurm_4nodes.sbatch"])
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --account=lm-pretrain",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --chdir={WORKDIR}",
                 "export NCCL_IB_HCA=mlx5_0:1", "module load cuda/12.4", "trap forward_usr1 USR1"):
        assert line in lines, line
    assert '--node_rank="$SLURM_NODEID" --nproc_per_node=4' in script
    # environment lines come before anything runs Python; the SBATCH header is one block at the top
    assert lines.index("source /opt/braid/.venv/bin/activate") < next(
        i for i, line in enumerate(lines) if "BRAID_PYTHON" in line and not line.startswith("export"))
    header = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert header == list(range(header[0], header[-1] + 1))
    # the one task of a node runs every rank: it asks for their CPUs and memory, and shares the CPUs out
    assert '--cpus-per-task=32 --kill-on-bad-exit=0' in script and "#SBATCH --cpus-per-task=32" in lines
    assert 'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$("$BRAID_PYTHON" -m launch.threads 4)}' in script
    assert "-m launch.torchrun" in script and "torch.distributed.run" not in script
    whole = _dry_run(capsys, monkeypatch, tmp_path, GOLDEN_CASES["slurm_1node.sbatch"]).splitlines()
    assert "#SBATCH --exclusive" in whole and "#SBATCH --mem=0" in whole        # GPU nodes: whole nodes
    assert any(line.startswith("srun --ntasks-per-node=1 --whole ") for line in whole)
    shared = _dry_run(capsys, monkeypatch, tmp_path, ["--nodes", "1", "--gpus-per-node", "2",
                                                      "launch.slurm.cpus_per_task=16",
                                                      "launch.slurm.sbatch_args={mem-per-gpu: 80G}"]).splitlines()
    assert "#SBATCH --cpus-per-task=16" in shared and "#SBATCH --mem-per-gpu=80G" in shared
    assert "#SBATCH --exclusive" not in shared and "#SBATCH --mem=0" not in shared
    cpu = _dry_run(capsys, monkeypatch, tmp_path, GOLDEN_CASES["slurm_2nodes_cpu.sbatch"])
    assert "#SBATCH --cpus-per-task=1" in cpu.splitlines() and "#SBATCH --mem=0" in cpu.splitlines()
    assert "gpu" not in cpu.lower()


def _error(capsys, args, code=2):
    capsys.readouterr()
    assert braid(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("braid: error: "), err
    return err[0]


def test_no_sbatch_on_path(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    line = _error(capsys, ["launch", "slurm", TINY, "--nodes", "1", "--gpus-per-node", "1"])
    assert "`sbatch` not found on PATH" in line and "--dry-run" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "1"], "--nodes=0: must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node=0: must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00", "launch.signal_seconds=3600"],
     "launch.signal_seconds=3600 is not shorter than the time limit launch.slurm.time=1:00:00 (3600 s)"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "noon"], "launch.slurm.time='noon': not a Slurm time"),
    (["--nodes", "2", "--gpus-per-node", "1", "launch.slurm.sbatch_args={gres: 'gpu:8'}"],
     "launch.slurm.sbatch_args.gres: set by --gpus-per-node"),
    (["--nodes", "2", "--gpus-per-node", "1", "launch.slurm.sbatch_args={partition: a}"],
     "launch.slurm.sbatch_args.partition: use launch.slurm.partition"),
    (["--nodes", "2", "--gpus-per-node", "1", "launch.slurm.env={NCCL-DEBUG: INFO}"],
     "launch.slurm.env.NCCL-DEBUG: not a valid environment variable name"),
    (["--nodes", "2", "--gpus-per-node", "1", "launch.slurm.partitoin=gpu"], "launch.slurm.partitoin: unknown key"),
    (["--nodes", "2", "--gpus-per-node", "1", "launch.master_port=80"], "launch.master_port=80: must be in"),
])
def test_bad_slurm_settings_are_one_line_naming_the_key(capsys, args, message):
    assert message in _error(capsys, ["launch", "slurm", TINY, *args, "--dry-run"])


def test_more_ranks_than_gpus(capsys, monkeypatch):
    import launch.local
    monkeypatch.setattr(launch.local, "visible_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    line = _error(capsys, ["launch", "local", TINY, "--nproc", "4"])
    assert "--nproc=4: more ranks than the 2 GPU(s) visible here (CUDA_VISIBLE_DEVICES=0,1)" in line


@pytest.mark.parametrize("args, message", [
    (["slurm", TINY, "--nodes", "2", "--gpus-per-node", "4", "parallel.tp=8", "--dry-run"],
     "parallel.tp=8 needs 8 ranks on a node, but --gpus-per-node=4"),
    (["slurm", TINY, "--nodes", "1", "--gpus-per-node", "4", "parallel.pp=3", "--dry-run"],
     "parallel.tp=1 x parallel.pp=3 = 3 does not divide the 4 ranks"),
    (["local", TINY, "--nproc", "3", "parallel.tp=2"], "parallel.tp=2 x parallel.pp=1 = 2 does not divide the 3 ranks"),
])
def test_model_parallel_groups_must_fit_the_ranks(capsys, args, message):
    assert message in _error(capsys, ["launch", *args])


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("05:30", 330), ("4:00:00", 14400), ("1-12", 129600),
                                           ("1-12:30", 131400), ("2-00:00:10", 172810)])
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text, "t") == seconds


# ---------------------------------------------------------------------------- run directory ownership


def _fake_squeue(tmp_path, monkeypatch, state):
    """A `squeue` on PATH that reports `state` for any job (nothing and status 1: an unknown job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\necho {state}\n" if state else "#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_live_slurm_owner_blocks_other_launches(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "run")
    owner.claim_for_slurm_job(run_dir, "41")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _fake_squeue(tmp_path, monkeypatch, "RUNNING")
    line = _error(capsys, ["launch", "local", TINY, "--nproc", "1", f"run_dir={run_dir}"])
    assert f"{run_dir}: run directory in use by Slurm job 41 (RUNNING)" in line
    with pytest.raises(ValueError, match="in use by Slurm job 41"):
        owner.claim_for_slurm_job(run_dir, "42")
    owner.claim_for_slurm_job(run_dir, "41")                   # the job itself, requeued: same id
    monkeypatch.setenv("SLURM_JOB_ID", "41")                   # a launch inside that job
    assert owner.live_owner(run_dir, os.environ["SLURM_JOB_ID"]) is None
    monkeypatch.delenv("SLURM_JOB_ID")
    _fake_squeue(tmp_path, monkeypatch, "COMPLETED")
    assert owner.live_owner(run_dir) is None
    _fake_squeue(tmp_path, monkeypatch, "")                     # squeue no longer knows it
    owner.claim_for_slurm_job(run_dir, "42")
    assert owner.read_owner(run_dir) == {"launcher": "slurm", "job_id": "42"}


def test_a_live_local_launch_blocks_other_launches(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(run_dir)
        record = {"launcher": "local", "host": __import__("socket").gethostname(), "pid": sleeper.pid,
                  "started": psutil.Process(sleeper.pid).create_time()}
        with open(owner.owner_path(run_dir), "w") as f:
            json.dump(record, f)
        line = _error(capsys, ["launch", "local", TINY, "--nproc", "1", f"run_dir={run_dir}"])
        assert f"in use by `braid launch local` (pid {sleeper.pid}" in line
        with open(owner.owner_path(run_dir), "w") as f:        # same pid, another start time: a reused pid
            json.dump({**record, "started": record["started"] - 100}, f)
        assert owner.live_owner(run_dir) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    with open(owner.owner_path(run_dir), "w") as f:
        json.dump(record, f)
    assert owner.live_owner(run_dir) is None                    # the launcher is gone


def test_owner_claim_inside_a_job(tmp_path, monkeypatch):
    """`python -m launch.owner RUN_DIR`, the sbatch script's first step."""
    run_dir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT, "SLURM_JOB_ID": "7"}
    ok = subprocess.run([sys.executable, "-m", "launch.owner", run_dir], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and owner.read_owner(run_dir) == {"launcher": "slurm", "job_id": "7"}
    _fake_squeue(tmp_path, monkeypatch, "PENDING")
    env = {**env, "PATH": os.environ["PATH"], "SLURM_JOB_ID": "8"}
    refused = subprocess.run([sys.executable, "-m", "launch.owner", run_dir], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "in use by Slurm job 7 (PENDING)" in refused.stderr


# ---------------------------------------------------------------------------- shared with data recipes


def test_data_recipes_and_training_configs_share_the_slurm_settings():
    from launch.config_io import build_dataclass
    from data_pipeline.recipe import SlurmSpec
    shared = {"partition": "cpu", "time": "2:00:00", "account": "lm", "qos": "low", "cpus_per_task": 4,
              "job_name": "x", "setup": ["source /opt/venv/bin/activate"], "env": {"TMPDIR": "/scratch/tmp x"},
              "sbatch_args": {"exclusive": True}}
    data = build_dataclass(SlurmSpec, {**shared, "mem_per_cpu_gb": 4}, "recipe.executor.slurm")
    train = build_dataclass(LaunchConfig, {"slurm": shared}, "launch").slurm
    assert isinstance(data, SlurmSettings) and type(train) is SlurmSettings
    assert data.sbatch_options() == train.sbatch_options() == {
        "partition": "cpu", "time": "2:00:00", "account": "lm", "qos": "low", "cpus-per-task": "4",
        "job-name": "x", "exclusive": None}
    assert data.environment_lines() == train.environment_lines() == [
        "source /opt/venv/bin/activate", "export TMPDIR='/scratch/tmp x'"]


# ---------------------------------------------------------------------------- braid launch local


def _launch_local(config_args, wait=True):
    env = {**os.environ, "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "launch.cli", "launch", "local", TINY, "--nproc", "2", *config_args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def _logged_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_launch_local_two_ranks_stop_on_signal_and_resume(tmp_path, tiny_overrides, shards):
    run_dir = str(tmp_path / "run")
    # validation every 2 steps: each builds new loaders over shared memory, which the ranks then reclaim
    overrides = tiny_overrides(run_dir, {"train.max_steps": 400, "checkpoint.every": 1000, "data.val": shards,
                                         "train.val_every": 2, "train.val_samples": 4, "train.val_lengths": "[1]"})
    proc = _launch_local(overrides, wait=False)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (
            not os.path.exists(metrics) or len(open(metrics).read().splitlines()) < 3):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert owner.read_owner(run_dir)["pid"] == proc.pid          # claimed while it runs
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "2 rank(s) on CPU (gloo)" in out and "the same command resumes (exit 75)" in out
    # a clean preemption is said in braid's lines only: no torchrun failure report, no leaked shared memory
    for noise in ("ChildFailedError", "Traceback", "failed (exitcode", "resource_tracker", "leaked shared_memory"):
        assert noise not in out, (noise, out[-3000:])
    saved = int(open(os.path.join(run_dir, "checkpoints", "latest")).read().split("_")[1])
    assert 3 <= saved < 400 and _logged_steps(run_dir) == list(range(1, saved + 1))

    tag_logged_records(run_dir)
    resumed = _launch_local(overrides + [f"train.stop_after={saved + 3}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_resumed_from(run_dir, saved)
    assert _logged_steps(run_dir) == list(range(1, saved + 4))  # continued from the checkpoint, no step twice


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["launch", "slurm", "--help"],
                                  ["convert", "to-hf", "--help"], ["data", "prepare", "--help"]])
def test_help_answers_without_the_frameworks(args):
    """Help is read before anything runs: it must not wait for torch, DeepSpeed, transformers or lm-eval."""
    probe = ("import json, sys\n"
             "from launch.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted(m for m in ('torch', 'deepspeed', 'transformers', 'lm_eval') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: braid" in out.stdout and json.loads(out.stdout.strip().splitlines()[-1]) == []
