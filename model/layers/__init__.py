"""Sublayer modules, one per pattern symbol. `build_mixer` is the only place a kind becomes a class."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .common import LinearSpec, RMSNorm
from .gla import GatedLinearAttention
from .mamba import Mamba
from .mamba2 import Mamba2
from .mlp import MLP
from .rglru import RecurrentBlock


def build_mixer(kind: str, cfg: ModelConfig, spec: LinearSpec) -> nn.Module:
    if kind == "mamba":
        return Mamba(cfg, spec) if cfg.mamba.version == 1 else Mamba2(cfg, spec)
    if kind == "gla":
        return GatedLinearAttention(cfg, spec)
    if kind == "swa":
        return Attention(cfg, spec, window=cfg.attn.window)
    if kind == "attention":
        return Attention(cfg, spec, window=None)
    if kind == "rglru":
        return RecurrentBlock(cfg, spec)
    if kind == "mlp":
        return MLP(cfg, spec)
    raise ValueError(f"unknown sublayer kind {kind!r}")


__all__ = ["Attention", "GatedLinearAttention", "LinearSpec", "MLP", "Mamba", "Mamba2", "RMSNorm",
           "RecurrentBlock", "build_mixer"]
