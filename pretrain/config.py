"""The training config: one YAML file (`braid train CONFIG.yaml k=v ...`), as nested dataclasses.

    run_dir: runs/tiny
    seed: 0
    launch: {slurm: {partition: gpu, ...}}   # `braid launch` only: launch.settings.LaunchConfig
    model: {preset: tiny, ...}            # model.config.ModelConfig fields over a preset
    data:
      train: [{path: data/tiny/train, proportion: null}]   # one or more MDS streams (mixture)
      val: data/tiny/val                  # null: no validation
      seq_len: 256                        # rows must hold seq_len + 1 tokens (recipe shards.row_length)
      micro_batch: 8                      # sequences per data-parallel rank per micro-step
      global_batch: null                  # sequences per optimizer step over all ranks; when set, grad_accum
                                          #   = global_batch / (micro_batch x data-parallel ranks), so more
                                          #   ranks change the accumulation, not the tokens per step
    optim: {lr: 4e-4, weight_decay: 0.1, betas: [0.9, 0.95], eps: 1e-8, grad_clip: 1.0}
    schedule: {name: cosine, warmup_fraction: 0.01, min_lr_ratio: 0.1}   # pretrain.schedule.ScheduleConfig
    train:
      max_steps: 1000                     # optimizer steps
      grad_accum: null                    # micro-steps per optimizer step (null: from data.global_batch, else 1)
      log_every: 10
      val_every: 0                        # steps between validations (0: never); also at the end
      val_samples: 32                     # sequences per length, from the start of the val stream
      val_lengths: [1, 2, 4]              # validation loss at these multiples of seq_len (Samba's val_ppl@Nx)
      stop_after: null                    # end this invocation after this step; a rerun resumes
      max_nonfinite: 10                   # stop after this many non-finite steps in a row (each is skipped)
      activation_checkpointing: false     # true: recompute every sublayer in backward; "M*": only these kinds
    checkpoint: {every: 200, keep: 3}
    parallel: {tp: 1, pp: 1, zero_stage: 1}
    logging:
      tensorboard: true
      wandb: {enabled: false, project: braid, name: null, mode: offline}   # needs the `wandb` extra
    evals:                                # eval suites on saved checkpoints (pretrain/evals_hook.py)
      every: 0                            # steps between evals (0: off); a multiple of checkpoint.every
      suites: {}                          # suite -> its run() options, or `smoke` / {} for its SMOKE settings,
                                          #   e.g. {ppl: {length: 512, chunk: 128, samples: 2}, passkey: smoke}
      mode: auto                          # inline (subprocesses of rank 0), slurm (a dependent sbatch job per
                                          #   checkpoint), auto (slurm inside a Slurm job with sbatch on PATH)
      tokenizer: null                     # tokenizer.json for text suites (null: the run's data tokenizer)
      device: null                        # inline evals' device (null: cuda when training on GPUs, else cpu)

Unknown keys anywhere are errors naming their path (`train.max_stpes`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from launch.config_io import build_dataclass
from launch.settings import LaunchConfig
from model import ModelConfig
from model.config import SUBLAYERS, ConfigError, parse_pattern

from .schedule import ScheduleConfig


@dataclass
class StreamConfig:
    path: str = ""
    proportion: float | None = None


@dataclass
class DataConfig:
    train: list[StreamConfig] = field(default_factory=list)
    val: str | None = None
    seq_len: int = 256
    micro_batch: int = 8
    global_batch: int | None = None


@dataclass
class OptimConfig:
    lr: float = 4e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LoopConfig:
    max_steps: int = 1000
    grad_accum: int | None = None
    log_every: int = 10
    val_every: int = 0
    val_samples: int = 32
    val_lengths: list[int] = field(default_factory=lambda: [1, 2, 4])
    stop_after: int | None = None     # end this invocation after this step (the schedule still spans max_steps)
    max_nonfinite: int = 10
    activation_checkpointing: bool | str = False

    def checkpointed_kinds(self, pattern: str) -> set[str]:
        """The sublayer kinds whose activations are recomputed in backward (all, none, or the
        kinds of the pattern symbols given, e.g. "M*")."""
        kinds = set(parse_pattern(pattern))
        if self.activation_checkpointing is True:
            return kinds
        if not self.activation_checkpointing:
            return set()
        symbols = set(self.activation_checkpointing)
        present = {s for s in SUBLAYERS if SUBLAYERS[s] in kinds}
        if not symbols <= present:
            raise ConfigError(f"train.activation_checkpointing={self.activation_checkpointing!r}: "
                              f"{''.join(sorted(symbols - present))} not in the model's sublayer kinds "
                              f"{''.join(sorted(present))}")
        return {SUBLAYERS[s] for s in symbols}


@dataclass
class CheckpointConfig:
    every: int = 200
    keep: int = 3


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "braid"
    name: str | None = None          # null: the run directory's name
    mode: str = "offline"            # offline (sync later with `wandb sync RUN_DIR/wandb`), online, disabled


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalsConfig:
    """Eval suites run on checkpoints as training saves them; scores go to metrics.jsonl as eval/SUITE/NAME."""
    every: int = 0
    suites: dict[str, Any] = field(default_factory=dict)
    mode: str = "auto"
    tokenizer: str | None = None
    device: str | None = None

    def check(self, checkpoint_every: int) -> None:
        """Value checks; each suite's options are checked against its `braid eval SUITE` options."""
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"evals.every={self.every!r}: must be 0 (off) or a positive integer")
        if self.mode not in ("auto", "inline", "slurm"):
            raise ConfigError(f"evals.mode={self.mode!r}: must be auto, inline or slurm")
        if self.every and (not isinstance(checkpoint_every, int) or checkpoint_every <= 0 or self.every % checkpoint_every):
            raise ConfigError(f"evals.every={self.every} must be a multiple of checkpoint.every={checkpoint_every} "
                              "(evals run on saved checkpoints)")
        if self.every and not self.suites:
            raise ConfigError(f"evals.every={self.every}: evals.suites names no suite")
        if not self.suites:
            return
        from evals.cli import SUITES, suite_argv, suite_options
        for name, value in self.suites.items():
            if name not in SUITES:
                raise ConfigError(f"evals.suites.{name}: unknown eval suite (known: {', '.join(SUITES)})")
            suite_argv(name, suite_options(name, value, f"evals.suites.{name}"), f"evals.suites.{name}")

    def commands(self) -> dict[str, list[str]]:
        """Each suite's `braid eval SUITE` options, in config order."""
        from evals.cli import suite_argv, suite_options
        return {name: suite_argv(name, suite_options(name, value, f"evals.suites.{name}"), f"evals.suites.{name}")
                for name, value in self.suites.items()}


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evals: EvalsConfig = field(default_factory=EvalsConfig)

    def validate(self) -> None:
        positive = {"data.seq_len": self.data.seq_len, "data.micro_batch": self.data.micro_batch,
                    "train.max_steps": self.train.max_steps, "train.log_every": self.train.log_every,
                    "checkpoint.keep": self.checkpoint.keep, "train.max_nonfinite": self.train.max_nonfinite}
        optional = {"data.global_batch": self.data.global_batch, "train.grad_accum": self.train.grad_accum}
        for name, value in [*positive.items(), *((k, v) for k, v in optional.items() if v is not None)]:
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if "swa" in self.model.layer_types and self.model.attn.window > self.data.seq_len:
            # the window would never slide in training, and at inference it would reach distances never trained
            raise ConfigError(f"model.attn.window={self.model.attn.window} is longer than data.seq_len="
                              f"{self.data.seq_len}: every S layer would train as full attention; set "
                              f"model.attn.window <= {self.data.seq_len} (or train on longer sequences)")
        if not self.data.train:
            raise ConfigError("data.train: needs at least one stream ({path: ...})")
        if self.train.val_every and not self.data.val:
            raise ConfigError(f"train.val_every={self.train.val_every} needs data.val (a validation stream)")
        if not self.train.val_lengths or any(not isinstance(k, int) or k < 1 for k in self.train.val_lengths):
            raise ConfigError(f"train.val_lengths={self.train.val_lengths}: positive integer multiples of seq_len")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr={self.optim.lr}: must be > 0")
        if self.parallel.zero_stage not in (1, 2, 3):     # ZeRO's optimizer is what skips a non-finite step
            raise ConfigError(f"parallel.zero_stage={self.parallel.zero_stage}: must be 1, 2 or 3")
        if self.logging.wandb.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logging.wandb.mode={self.logging.wandb.mode!r}: must be offline, online or disabled")
        self.train.checkpointed_kinds(self.model.pattern)
        self.evals.check(self.checkpoint.every)
        for name in ("tp", "pp"):
            if not isinstance(getattr(self.parallel, name), int) or getattr(self.parallel, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self.parallel, name)!r}: must be a positive integer")

    def batch_plan(self, dp: int) -> tuple[int, int]:
        """(grad_accum, global_batch) with `dp` data-parallel ranks: the global batch, when given, fixes the
        sequences per optimizer step and the accumulation follows from it; without one the accumulation
        (default 1) does and the global batch follows. A ConfigError names every number when they disagree."""
        micro, accum, global_batch = self.data.micro_batch, self.train.grad_accum, self.data.global_batch
        per_micro_step = micro * dp
        ranks = f"{dp} data-parallel rank{'s' if dp > 1 else ''}"
        if global_batch is None:
            accum = accum or 1
            return accum, per_micro_step * accum
        if accum is None:
            if global_batch % per_micro_step:
                raise ConfigError(f"data.global_batch={global_batch} is not a multiple of data.micro_batch={micro} "
                                  f"x {ranks} = {per_micro_step}: pick a data.micro_batch that divides "
                                  f"{global_batch} / {dp} (the accumulation is derived from them)")
            return global_batch // per_micro_step, global_batch
        if per_micro_step * accum != global_batch:
            raise ConfigError(f"data.global_batch={global_batch} but data.micro_batch={micro} x train.grad_accum={accum} "
                              f"x {ranks} = {per_micro_step * accum}: leave train.grad_accum unset (it is derived "
                              "from the global batch) or make them agree")
        return accum, global_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _streams(value: Any) -> Any:
    """data.train entries may be a bare path string."""
    return [{"path": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def train_config(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    if isinstance(data.get("data"), dict) and "train" in data["data"]:
        data["data"] = {**data["data"], "train": _streams(data["data"]["train"])}
    config = build_dataclass(TrainConfig, data, "", builders={ModelConfig: lambda value, path: ModelConfig.from_dict(value or {})})
    config.validate()
    return config
