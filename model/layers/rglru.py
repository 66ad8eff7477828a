"""Griffin's recurrent block (`R`): gelu(W_y x) * RG-LRU(conv1d_4(W_x x)) -> W_out.

RG-LRU per channel, with gates from block-diagonal linears over heads:
    r_t = sigmoid(W_a x_t + b_a),  i_t = sigmoid(W_x x_t + b_x),
    log a_t = -c * r_t * softplus(Lambda),
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
At a document start (position 0) a_t = 0 and the sqrt factor is 1, as in RecurrentGemma.
Parameter names follow `transformers`' RecurrentGemmaRecurrentBlock.
Cache (`RecurrentState`): conv tail (B, K-1, width) and state (B, width) in fp32.
Kernels: the conv on causal-conv1d or fla's conv, the recurrence on fla's elementwise gated
recurrence (fused_recurrent_hgrn) over packed rows through cu_seqlens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentState
from ..config import ModelConfig
from ..ops.scan import SCAN_TRITON, linear_scan, linear_scan_kernel
from ..sequence import SequenceInfo
from .common import KernelDispatch, LinearSpec

_MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt whose derivative is capped at 1000: sqrt(1 - a^2) has an infinite slope at a -> 1."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt((4.0 * x).clamp(min=_MAX_SQRT_GRADIENT ** -2))


class RGLRU(nn.Module):
    """The real-gated linear recurrent unit over a (B, L, width) sequence."""

    def __init__(self, width: int, n_heads: int, c: float):
        super().__init__()
        self.n_heads, self.block_width, self.c = n_heads, width // n_heads, c
        bw = self.block_width
        self.recurrent_param = nn.Parameter(torch.empty(width))
        self.input_gate_weight = nn.Parameter(torch.empty(n_heads, bw, bw))
        self.input_gate_bias = nn.Parameter(torch.zeros(n_heads, bw))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(n_heads, bw, bw))
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(n_heads, bw))

    def reset_parameters(self, std: float) -> None:
        with torch.no_grad():
            for w in (self.input_gate_weight, self.recurrent_gate_weight):
                nn.init.normal_(w, std=std)
            self.input_gate_bias.zero_()
            self.recurrent_gate_bias.zero_()
            # exp(-softplus(Lambda)) uniform in [0.9, 0.999] in the square (Griffin's init)
            radius_sq = torch.empty_like(self.recurrent_param).uniform_(0.9 ** 2, 0.999 ** 2)
            softplus_value = -0.5 * torch.log(radius_sq)
            self.recurrent_param.copy_(softplus_value + torch.log(-torch.expm1(-softplus_value)))

    def _gate(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        blocks = x.unflatten(-1, (self.n_heads, self.block_width))
        return torch.sigmoid(torch.einsum("...hi,hij->...hj", blocks, weight) + bias).flatten(-2)

    def forward(self, x: Tensor, doc_start: Tensor, initial: Tensor | None, cu_seqlens: Tensor | None = None) -> Tensor:
        """x: (B, L, width); doc_start: (B, L) bool; initial: (B, width) or None -> h (B, L, width) fp32.
        cu_seqlens: run the recurrence on fla's kernel, documents from a zero state (no initial)."""
        x = x.float()
        input_gate = self._gate(x, self.input_gate_weight.float(), self.input_gate_bias.float())
        recurrent_gate = self._gate(x, self.recurrent_gate_weight.float(), self.recurrent_gate_bias.float())
        log_a = -self.c * recurrent_gate * F.softplus(self.recurrent_param.float())
        start = doc_start.unsqueeze(-1)
        multiplier = torch.where(start, 1.0, _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a)))
        drive = x * input_gate * multiplier
        if cu_seqlens is not None:       # a document's first step multiplies a zero state: log_a is moot there
            return linear_scan_kernel(log_a, drive, cu_seqlens)
        a = torch.exp(log_a).masked_fill(start, 0.0)
        if x.shape[1] == 1 and initial is not None:
            return (a[:, 0] * initial + drive[:, 0]).unsqueeze(1)
        return linear_scan(a, drive, initial)


class RecurrentBlock(KernelDispatch, nn.Module):
    output_projections = ("linear_out",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        r = cfg.rglru
        self.width = spec.local(cfg.rglru_width, "model.rglru.width (RG-LRU width)")
        self.init_std = cfg.init_std
        self.init_dispatch(cfg)
        self.linear_y = spec.column(cfg.d_model, cfg.rglru_width, True)
        self.linear_x = spec.column(cfg.d_model, cfg.rglru_width, True)
        self.linear_out = spec.row(cfg.rglru_width, cfg.d_model, True)
        self.conv_1d = nn.Conv1d(self.width, self.width, r.d_conv, groups=self.width, bias=True)
        self.rg_lru = RGLRU(self.width, spec.local(r.n_heads, "model.rglru.n_heads"), r.c)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        self.rg_lru.reset_parameters(self.init_std)

    def empty_cache(self) -> RecurrentState:
        return RecurrentState()

    def forward(self, x: Tensor, seq: SequenceInfo, cache: RecurrentState | None = None) -> Tensor:
        continuing = cache is not None and not cache.empty
        y = F.gelu(self.linear_y(x), approximate="tanh")
        x, conv_state = self.short_conv(self.linear_x(x), self.conv_1d, seq, cache, silu=False)
        scan = self.choose("scan", [(SCAN_TRITON, None)], x.device, continuing)
        h = self.rg_lru(x, seq.positions == 0, cache.state if continuing else None,
                        seq.cu_seqlens if scan is not None else None)
        if cache is not None:
            cache.conv, cache.state = conv_state, h[:, -1]
        return self.linear_out((h * y.float()).to(y.dtype))
