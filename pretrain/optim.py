"""AdamW parameter groups: weight decay on matrices, none on what decay would distort.

No decay on: norm weights, biases, Mamba's A_log and D, Mamba-2's dt_bias, RG-LRU's Λ
(`recurrent_param`) and gate biases. The rule is by shape and name, so new blocks follow it
without being listed: vectors never decay; matrices decay unless they are biases or A_log
(Mamba-1's A_log is a (d_inner, d_state) matrix of log-decay rates, not a weight).
"""
from __future__ import annotations

from torch import nn

_NO_DECAY_SUFFIXES = ("bias", "A_log")


def decays(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (tied weights appear once)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, tuple(param.shape)) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
