"""`braid launch local CONFIG --nproc N [k=v ...]`: `braid train` as N ranks under torchrun on this machine.

torchrun (launch.torchrun; `--standalone`: a rendezvous on a free local port) starts the ranks; each reads RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and joins with nccl on GPUs, gloo on CPU
(DS_ACCELERATOR=cpu). SIGTERM or SIGUSR1 to this launcher is passed to the ranks as SIGUSR1: they save
a checkpoint at the next step boundary and stop, and the launcher exits with REQUEUE_EXIT_CODE; running
the same command again resumes. While it runs, the run directory is claimed (launch.owner).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import psutil

from launch import owner
from launch.config_io import load_config
from launch.threads import threads_per_rank


def load_train_config(config_path: str, overrides: list[str]) -> tuple[dict[str, Any], Any]:
    """The config mapping (overrides applied) and its validated TrainConfig."""
    from pretrain.config import train_config
    mapping = load_config(config_path, overrides)
    return mapping, train_config(mapping)


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_process_layout(cfg: Any, nodes: int, per_node: int, per_node_flag: str) -> None:
    """The checks `braid train` makes before any process group (pretrain.parallel.plan_layout), made before
    launching, plus one of the launcher's: a tensor-parallel group (adjacent ranks) stays within a node."""
    from pretrain.parallel import plan_layout
    if cfg.parallel.tp > per_node:
        raise ValueError(f"parallel.tp={cfg.parallel.tp} needs {cfg.parallel.tp} ranks on a node, "
                         f"but {per_node_flag}={per_node}")
    plan_layout(cfg, nodes * per_node)


def rank_environment(nproc: int, gpus: int) -> dict[str, str]:
    """This environment plus what the ranks need: the CPU accelerator without GPUs, a share of the cores."""
    env = dict(os.environ)
    if gpus == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
    # torchrun sets 1 thread per rank when it starts several; a fair share of the cores is faster on CPU
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    return env


def _signal_ranks(torchrun: subprocess.Popen) -> None:
    """SIGUSR1 to the ranks themselves: torchrun would stop them on SIGTERM, with a short grace time."""
    try:
        for rank in psutil.Process(torchrun.pid).children():
            rank.send_signal(signal.SIGUSR1)
    except psutil.Error:                       # torchrun or a rank just exited
        pass


def launch_local(config_path: str, nproc: int, overrides: list[str]) -> int:
    """Run the training under torchrun with `nproc` ranks; returns the exit status for the shell."""
    from pretrain.checkpoint import latest_tag
    from pretrain.train import REQUEUE_EXIT_CODE

    _, cfg = load_train_config(config_path, overrides)
    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: must be >= 1")
    gpus = visible_gpus()
    if gpus and nproc > gpus:
        raise ValueError(f"--nproc={nproc}: more ranks than the {gpus} GPU(s) visible here "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    check_process_layout(cfg, 1, nproc, "--nproc")
    owner.claim_for_this_process(cfg.run_dir)

    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
           "-m", "launch.cli", "train", config_path, *overrides]
    env = rank_environment(nproc, gpus)
    print(f"braid: {nproc} rank(s) on {'GPU (nccl)' if gpus else 'CPU (gloo)'}, {env['OMP_NUM_THREADS']} thread(s) "
          f"each: {' '.join(cmd[1:])}", flush=True)
    torchrun = subprocess.Popen(cmd, env=env)
    stop: dict[str, Any] = {}

    def forward(signum, frame) -> None:
        stop.setdefault("signal", signum)
        stop.setdefault("tag", latest_tag(cfg.run_dir))
        _signal_ranks(torchrun)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            try:
                status = torchrun.wait()
                break
            except KeyboardInterrupt:          # Ctrl-C reached torchrun too (same process group): it stops the ranks
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "signal" in stop and status != 0 and latest_tag(cfg.run_dir) != stop["tag"]:
        print(f"braid: ranks saved {latest_tag(cfg.run_dir)} after signal {stop['signal']}; "
              f"the same command resumes (exit {REQUEUE_EXIT_CODE})", flush=True)
        return REQUEUE_EXIT_CODE
    return status
