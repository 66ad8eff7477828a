"""A real two-node Slurm cluster on this machine, for tests (tests/test_launch_slurm.py).

Debian 12's Slurm 22.05 packages, extracted (not installed) by `make slurm` into .cache/slurm/root,
run from there: slurmctld and two slurmd (`n1`, `n2`, both on 127.0.0.1 with their own ports, spool,
pid and log files through `%n`) in the foreground as root, with AuthType=auth/none, CredType=cred/none,
ProctrackType=proctrack/linuxproc and TaskPlugin=task/none. Each slurmd runs in its own mount
namespace with a private /dev/shm, as a separate machine has: the training's data loader coordinates
the ranks of a machine through /dev/shm, and two nodes sharing one would take each other for one node.

The cluster's processes are known by id: the daemons started here, whatever carries
BRAID_TEST_SLURM_CLUSTER in its environment (slurmctld's helpers, the jobs), and whatever runs in a
slurmd's mount namespace (slurmstepd clears its environment and detaches from slurmd). `stop()` cancels
the jobs, kills each such process by its id and checks that none is left.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_ROOT = os.path.join(ROOT, ".cache", "slurm", "root")         # what `make slurm` extracts
MARKER = "BRAID_TEST_SLURM_CLUSTER"
NODES = ("n1", "n2")


class SlurmCluster:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.plugins = os.path.join(SLURM_ROOT, "usr", "lib", "x86_64-linux-gnu", "slurm-wlm")
        self.sbin = os.path.join(SLURM_ROOT, "usr", "sbin")
        self.daemons: list[subprocess.Popen] = []
        self.namespaces: set[str] = set()        # the slurmd mount namespaces: every job process is in one
        self.env = {**os.environ,
                    "PATH": os.path.join(SLURM_ROOT, "usr", "bin") + os.pathsep + os.environ["PATH"],
                    # libslurmfull.so, and libhwloc for slurmd
                    "LD_LIBRARY_PATH": os.pathsep.join([self.plugins, os.path.join(SLURM_ROOT, "usr", "lib",
                                                                                   "x86_64-linux-gnu")]),
                    "SLURM_CONF": os.path.join(workdir, "slurm.conf"), MARKER: workdir}

    @staticmethod
    def missing() -> str | None:
        """Why the cluster cannot start here, or None."""
        if not os.path.isfile(os.path.join(SLURM_ROOT, "usr", "sbin", "slurmctld-wlm")):
            return (f"no extracted Slurm under {SLURM_ROOT}: run `make slurm` (part of `make test`), which fetches "
                    "Debian 12's slurmctld, slurmd and slurm-client with apt-get download and extracts them there")
        if os.geteuid() != 0:
            return "the test Slurm cluster runs its daemons as root"
        return None

    def write_config(self) -> None:
        w = self.workdir
        lines = [
            "ClusterName=braidtest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none",
            "AuthInfo=cred_expire=5",          # a requeued job may start again after cred_expire + 1 s (default 120)
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "SwitchType=switch/none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"PluginDir={self.plugins}",
            f"StateSaveLocation={w}/state", f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/slurmctld.pid", f"SlurmdPidFile={w}/slurmd.%n.pid",
            f"SlurmctldLogFile={w}/slurmctld.log", f"SlurmdLogFile={w}/slurmd.%n.log",
        ]
        lines += [f"NodeName={n} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 RealMemory=2000 State=UNKNOWN"
                  for n in NODES]
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        os.makedirs(os.path.join(w, "state"), exist_ok=True)
        os.makedirs(os.path.join(w, "spool"), exist_ok=True)
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], log: str) -> None:
        with open(os.path.join(self.workdir, log), "w") as out:
            self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True))

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        self._spawn([os.path.join(self.sbin, "slurmctld-wlm"), "-D"], "slurmctld.out")
        stepd = os.path.join(self.sbin, "slurmstepd-wlm")
        for node in NODES:
            slurmd = f"exec {self.sbin}/slurmd-wlm -D -N {node} -d {stepd}"
            self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         f"mount -t tmpfs -o size=2g tmpfs /dev/shm && {slurmd}"], f"slurmd.{node}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "--noheader", "--format=%T %D"], check=False)
            if out.returncode == 0 and out.stdout.split() == ["idle", str(len(NODES))]:
                self.namespaces = {os.readlink(f"/proc/{d.pid}/ns/mnt") for d in self.daemons[1:]}
                return
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({daemon.args}): see {self.workdir}/*.out")
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes did not come up in {timeout:.0f} s: see {self.workdir}/*.out, *.log")

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {field: value} (JobState, Restarts, ExitCode, ...)."""
        text = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the daemons, job steps and the ranks they started."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if (proc.pid in {d.pid for d in self.daemons} or proc.environ().get(MARKER) == self.workdir
                        or os.readlink(f"/proc/{proc.pid}/ns/mnt") in self.namespaces):
                    found.append(proc)
            except (psutil.Error, OSError):    # gone, or a kernel thread
                continue
        return found

    def _signal_all(self, sig: int, grace: float) -> None:
        """Send `sig` to every process of the cluster; wait up to `grace` seconds for them to be gone."""
        for proc in self.processes():
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and self.processes():
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel the jobs, kill every process of the cluster by id, and check that none is left."""
        try:
            if all(d.poll() is None for d in self.daemons):
                self.run(["scancel", "--user", "root"], check=False)
                deadline = time.time() + 15   # let the job steps end cleanly while slurmd still answers them
                while time.time() < deadline and self.run(["squeue", "--noheader"], check=False).stdout.strip():
                    time.sleep(0.5)
        except (subprocess.SubprocessError, OSError):
            pass                              # a broken cluster: straight to the kills
        self._signal_all(signal.SIGTERM, grace=5)
        self._signal_all(signal.SIGKILL, grace=10)    # slurmstepd ignores SIGTERM
        for daemon in self.daemons:
            daemon.wait(timeout=10)
        left = self.processes()
        if left:
            raise RuntimeError(f"processes of the test Slurm cluster survived: {[p.pid for p in left]}")
