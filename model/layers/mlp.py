"""SwiGLU MLP (`-`): down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from ..sequence import SequenceInfo
from .common import LinearSpec, swiglu


class MLP(nn.Module):
    output_projections = ("down_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        spec.local(cfg.mlp_hidden, "model.mlp_hidden")      # a bad tp fails here, naming the field
        self.gate_proj = spec.column(cfg.d_model, cfg.mlp_hidden, False)
        self.up_proj = spec.column(cfg.d_model, cfg.mlp_hidden, False)
        self.down_proj = spec.row(cfg.mlp_hidden, cfg.d_model, False)

    def empty_cache(self) -> None:
        return None

    def forward(self, x: Tensor, seq: SequenceInfo | None = None, cache: None = None) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
