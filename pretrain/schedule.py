"""Learning-rate schedules: cosine with warmup to a floor (Samba: to lr/10 after 1% warmup), and
warmup-stable-decay (WSD: hold the peak, then decay over the last fraction of training).

Both are pure functions of the step, `lr_multiplier(step, total_steps, cfg)` in [0, 1], so a resumed
run recomputes the same rate from the step alone and `build_scheduler` is a plain LambdaLR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class ScheduleConfig:
    name: str = "cosine"              # cosine | wsd | constant (after warmup)
    warmup_steps: int | None = None   # None -> warmup_fraction of the run
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.1         # the floor, as a fraction of the peak
    decay_fraction: float = 0.2       # wsd: the last fraction of steps spent decaying
    decay_shape: str = "1-sqrt"       # wsd: linear | cosine | 1-sqrt (Hägele et al. 2024)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name={self.name!r}: must be one of {', '.join(SCHEDULES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"schedule.decay_shape={self.decay_shape!r}: must be one of {', '.join(DECAY_SHAPES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 <= self.warmup_fraction < 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("schedule: warmup_fraction must be in [0, 1) and decay_fraction in (0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps}: must be >= 0")


def _decay(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * _decay(progress, "cosine")
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = max(warmup, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    return floor + (1.0 - floor) * _decay((step - decay_start) / max(1, total_steps - decay_start), cfg.decay_shape)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
