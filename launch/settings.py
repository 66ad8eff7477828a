"""Launch settings: the `launch:` section of a training config, and the Slurm settings it shares with data recipes.

`SlurmSettings` is the one definition of where and how a Slurm job runs (partition, time, account,
environment lines); `braid launch slurm` reads it from a training config's `launch.slurm`, and
`braid data prepare` from a recipe's `executor.slurm` (data_pipeline.recipe.SlurmSpec extends it).

    launch:
      python: null              # interpreter on the nodes (null: the one running `braid launch`)
      master_port: 29500        # slurm: the static rendezvous port is this + job id % 1000
      signal_seconds: 300       # slurm: USR1 this long before the time limit, time for a checkpoint
      slurm:
        partition: null         # --partition (null: the cluster's default)
        time: null              # --time, any Slurm format (MM, HH:MM:SS, D-HH:MM, ...); null: the partition's
        account: null           # --account
        qos: null               # --qos
        cpus_per_task: null     # --cpus-per-task: one task per node runs torchrun and all its ranks (null:
                                #   GPU jobs take whole nodes, --exclusive; CPU jobs one CPU per rank)
        job_name: null          # --job-name (null: the run directory's name)
        setup: []               # shell lines run on the first node before the job starts, e.g.
                                #   ["source /opt/braid/.venv/bin/activate", "module load cuda/12.4"]
        env: {}                 # exported variables, e.g. {NCCL_DEBUG: WARN, NCCL_SOCKET_IFNAME: ib0}
        sbatch_args: {}         # further #SBATCH options, e.g. {exclusive: true, mem: 0}; without a mem,
                                #   mem-per-cpu or mem-per-gpu the training script asks for --mem=0 (all)
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPTION_NAME = re.compile(r"[a-z][a-z0-9-]*")
# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<clock>\d+(?::\d+){0,2})")


def slurm_time_seconds(text: str, where: str) -> int:
    """A Slurm time limit ("90", "4:00:00", "1-12:00") in seconds; ValueError naming `where` otherwise."""
    match = _TIME.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{where}={text!r}: not a Slurm time (minutes, HH:MM:SS, D-HH:MM, ...)")
    parts = [int(p) for p in match.group("clock").split(":")]
    if match.group("days") is not None:     # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(match.group("days")) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:                    # minutes
        return parts[0] * 60
    if len(parts) == 2:                    # MM:SS
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


@dataclass
class SlurmSettings:
    """Where and how a Slurm job runs; the keys are the same in training configs and data recipes."""
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    job_name: str | None = None
    setup: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    sbatch_args: dict[str, Any] = field(default_factory=dict)

    # the keys above that are also sbatch options: they must not come a second time through sbatch_args
    _OWN_OPTIONS = ("partition", "time", "account", "qos", "cpus-per-task", "job-name")

    def check(self, where: str, reserved: dict[str, str] | None = None) -> None:
        """Value checks; `reserved` maps sbatch options the caller sets itself to the flag that sets them."""
        if self.time is not None:
            slurm_time_seconds(self.time, f"{where}.time")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"{where}.cpus_per_task={self.cpus_per_task}: must be >= 1")
        for i, line in enumerate(self.setup):
            if not isinstance(line, str) or "\n" in line:
                raise ValueError(f"{where}.setup[{i}]: one shell line per entry")
        for name, value in self.env.items():
            if not _ENV_NAME.fullmatch(str(name)):
                raise ValueError(f"{where}.env.{name}: not a valid environment variable name")
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError(f"{where}.env.{name}: {value!r} is not a string or number")
        for option in self.sbatch_args:
            if not _OPTION_NAME.fullmatch(str(option)):
                raise ValueError(f"{where}.sbatch_args.{option}: write sbatch options without dashes, e.g. mem-per-gpu")
            if option in self._OWN_OPTIONS:
                raise ValueError(f"{where}.sbatch_args.{option}: use {where}.{option.replace('-', '_')}")
            if reserved and option in reserved:
                raise ValueError(f"{where}.sbatch_args.{option}: set by {reserved[option]}")

    def sbatch_options(self) -> dict[str, str | None]:
        """#SBATCH options in a fixed order ({name: value}; None: a bare flag), unset keys left out."""
        options: dict[str, str | None] = {}
        for name in self._OWN_OPTIONS:
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                options[name] = str(value)
        for name, value in self.sbatch_args.items():
            if value is False:
                continue
            options[name] = None if value is True or value is None or value == "" else str(value)
        return options

    def environment_lines(self) -> list[str]:
        """Shell lines that prepare a job's environment: the setup lines, then the exported variables."""
        return [*self.setup, *(f"export {name}={shlex.quote(str(value))}" for name, value in self.env.items())]


@dataclass
class LaunchConfig:
    """The `launch:` section of a training config (read by `braid launch`, ignored by `braid train`)."""
    python: str | None = None
    master_port: int = 29500
    signal_seconds: int = 300
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
