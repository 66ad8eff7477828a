"""MLP (`-`): SwiGLU down(silu(gate(x)) * up(x)), or with model.mlp_activation=relu2
Nemotron-H's non-gated down(relu(up(x))^2), which has no gate_proj."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..sequence import SequenceInfo
from .common import LinearSpec, swiglu


class MLP(nn.Module):
    output_projections = ("down_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        spec.local(cfg.mlp_hidden, "model.mlp_hidden")      # a bad tp fails here, naming the field
        self.gated = cfg.mlp_activation == "swiglu"
        if self.gated:
            self.gate_proj = spec.column(cfg.d_model, cfg.mlp_hidden, False)
        self.up_proj = spec.column(cfg.d_model, cfg.mlp_hidden, False)
        self.down_proj = spec.row(cfg.mlp_hidden, cfg.d_model, False)

    def empty_cache(self) -> None:
        return None

    def forward(self, x: Tensor, seq: SequenceInfo | None = None, cache: None = None) -> Tensor:
        if self.gated:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(torch.relu(self.up_proj(x)).square())
