"""Pieces every block uses: RMSNorm, rotary embeddings, and the linear-layer spec."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentState
from ..config import ConfigError, ModelConfig
from ..kernels import DispatchRecord, Kernel, select
from ..ops.conv import causal_conv1d, causal_conv1d_kernel, causal_conv1d_step, conv_kernels, conv_tail
from ..sequence import SequenceInfo


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, group_size: int | None = None) -> Tensor:
    """RMS-normalise the last dim (or each group of `group_size` channels of it) in float32."""
    dtype = x.dtype
    x = x.float()
    if group_size is not None and group_size != x.shape[-1]:
        grouped = x.unflatten(-1, (-1, group_size))
        x = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    else:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = x.to(dtype)
    return x if weight is None else x * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.group_size)


def rotary_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, L, head_dim) for integer positions (B, L); NeoX/Llama half-rotation layout."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq          # exact for long contexts
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, L, D) by the angles in cos/sin (B, 1, L, D)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@dataclass(frozen=True)
class LinearSpec:
    """How a model builds its projections, so tensor parallelism never forks block code.

    `column(in, out, bias)` makes a layer whose output features may be split across
    ranks; `row(in, out, bias)` one whose input features are split and whose output is
    summed (its bias added once, after the sum). `embedding(vocab, d)` and
    `lm_head(d, vocab)` may split the vocabulary (the head then returns this rank's slice
    of the logits). `tp_size` says how many ranks share a block; blocks divide head and
    channel counts by it through `local`. Two reductions for rank-local computation that
    reads a replicated tensor:
    - `all_reduce` sums a partial result over the ranks, and sums its gradient as well,
      since the result feeds this rank's channels only (Mamba-1's x_proj -> dt, B, C);
    - `all_reduce_grad` is the identity forward and sums the gradient: a replicated
      tensor read by this rank's heads only (GLA's per-head norm weight).
    The default is a single device: nn.Linear / nn.Embedding, identity reductions.
    """
    column: Callable[[int, int, bool], nn.Module] = lambda i, o, bias: nn.Linear(i, o, bias=bias)
    row: Callable[[int, int, bool], nn.Module] = lambda i, o, bias: nn.Linear(i, o, bias=bias)
    embedding: Callable[[int, int], nn.Module] = lambda vocab, d: nn.Embedding(vocab, d)
    lm_head: Callable[[int, int], nn.Module] = lambda d, vocab: nn.Linear(d, vocab, bias=False)
    tp_size: int = 1
    all_reduce: Callable[[Tensor], Tensor] = lambda x: x
    all_reduce_grad: Callable[[Tensor], Tensor] = lambda x: x

    def local(self, count: int, what: str) -> int:
        """This rank's share of `count` heads or channels; `what` names the config field."""
        if count % self.tp_size:
            raise ConfigError(f"{what}={count} is not divisible by tensor-parallel size parallel.tp={self.tp_size}")
        return count // self.tp_size


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


class KernelDispatch:
    """Mixin of the blocks whose ops choose between kernels and the reference path (model/kernels.py).

    `block_name` is set by HybridLM ("layers.3 (gla)"); `dispatch` records each op's path in the
    last forward.
    """
    block_name = "block"

    def init_dispatch(self, cfg: ModelConfig) -> None:
        self.kernels = cfg.kernels
        self.dispatch = DispatchRecord()

    def choose(self, op: str, candidates: list[tuple[Kernel, str | None]], device: torch.device,
               continuing: bool = False) -> Kernel | None:
        return select(self.kernels, self.block_name, op, candidates, device, self.dispatch, continuing)

    def short_conv(self, x: Tensor, conv: nn.Conv1d, seq: SequenceInfo, cache: RecurrentState | None,
                   silu: bool, documents: bool = True) -> tuple[Tensor, Tensor | None]:
        """The block's depthwise causal conv over x (B, L, C) (then silu if asked), on a kernel or the
        reference, and the conv state a cache keeps (None without a cache). documents=False: the
        row is one sequence (Mamba-1 with packed_resets=flow)."""
        continuing = cache is not None and not cache.empty
        weight = conv.weight[:, 0]
        choice = self.choose("conv", conv_kernels(x.shape[-1], weight.shape[1]), x.device, continuing)
        if choice is None:
            if continuing and x.shape[1] == 1:
                y, state = causal_conv1d_step(x[:, 0], weight, conv.bias, cache.conv)
                y = y.unsqueeze(1)
            else:
                y, state = causal_conv1d(x, weight, conv.bias, cache.conv if continuing else None,
                                         seq.reset if documents else None)
            return (F.silu(y) if silu else y), state
        seq_idx = seq.seq_idx if documents and seq.packed else None
        y = causal_conv1d_kernel(choice.name, x, weight, conv.bias, seq_idx,
                                 seq.cu_seqlens if documents else seq.row_cu_seqlens, silu)
        state = conv_tail(x, weight.shape[1], seq.segments if documents else None) if cache is not None else None
        return y, state
