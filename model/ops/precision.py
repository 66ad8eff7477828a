"""Ops whose math must stay in float32 under autocast.

Training on a GPU runs under bf16 autocast (pretrain/train.py): linear layers compute in bf16,
and so would every matmul inside the reference ops, the recurrences' state updates and the
attention scores included. The ops below promise float32 accumulation (float64 for float64
inputs); `full_precision` turns autocast off around them, so they keep that promise.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """`fn` run with autocast off on the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
