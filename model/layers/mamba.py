"""Mamba-1 mixer (`M` with mamba.version=1): selective SSM, as in Samba.

Parameter names and shapes follow `transformers`' MambaMixer so the native Mamba
export is a rename-free copy. Per channel d and state n:
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t,    y_t = C_t . h_t + D * x_t
Cache (`RecurrentState`): conv tail (B, K-1, d_inner) and SSM state (B, d_inner, d_state).
Tensor parallel: channels split; x_proj reads all of d_inner, so its partial
products are summed across ranks (`spec.all_reduce`) before dt, B and C are used,
and so is their gradient (each rank's channels contribute a part of it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentState
from ..config import ModelConfig
from ..kernels import kernel, use_kernel
from ..ops.conv import causal_conv1d, causal_conv1d_step, conv_tail
from ..ops.selective_scan import selective_scan
from ..sequence import SequenceInfo
from .common import LinearSpec


def init_dt_bias(size: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))   # inverse softplus


class Mamba(nn.Module):
    output_projections = ("out_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        m = cfg.mamba
        self.cfg = m
        self.d_inner = spec.local(cfg.d_inner, "model.mamba.expand * model.d_model (Mamba d_inner)")
        self.d_state, self.dt_rank, self.kernels, self.all_reduce = m.d_state, cfg.dt_rank, cfg.kernels, spec.all_reduce
        self.in_proj = spec.column(cfg.d_model, 2 * cfg.d_inner, False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=m.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, m.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = spec.row(cfg.d_inner, cfg.d_model, False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        m = self.cfg
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, m.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
            self.D.fill_(1.0)
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, m.dt_min, m.dt_max, m.dt_init_floor))

    def empty_cache(self) -> RecurrentState:
        return RecurrentState()

    def forward(self, x: Tensor, seq: SequenceInfo, cache: RecurrentState | None = None) -> Tensor:
        continuing = cache is not None and not cache.empty
        if not continuing and not seq.packed and use_kernel(self.kernels, ("mamba_ssm", "causal_conv1d"), x.device):
            return self._forward_cuda(x, cache)
        x, z = self.in_proj(x).chunk(2, dim=-1)
        conv_weight = self.conv1d.weight[:, 0]
        if continuing and x.shape[1] == 1:
            x, conv_state = causal_conv1d_step(x[:, 0], conv_weight, self.conv1d.bias, cache.conv)
            x = x.unsqueeze(1)
        else:
            x, conv_state = causal_conv1d(x, conv_weight, self.conv1d.bias,
                                          cache.conv if continuing else None, seq.reset)
        x = F.silu(x)
        dt, B, C = self.all_reduce(self.x_proj(x)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).float()                             # (B, L, D)
        A = -torch.exp(self.A_log.float())                                    # (D, N)
        x, B, C = x.float(), B.float(), C.float()
        initial = cache.state if continuing else None
        if initial is not None and x.shape[1] == 1:                          # decode step
            state = torch.exp(dt[:, 0, :, None] * A) * initial + (dt[:, 0] * x[:, 0])[..., None] * B[:, 0, None, :]
            y = torch.einsum("bdn,bn->bd", state, C[:, 0]).unsqueeze(1)
        else:
            y, state = selective_scan(x, dt, A, B, C, initial, seq.reset)
        y = y + self.D.float() * x
        if cache is not None:
            cache.conv, cache.state = conv_state, state
        return self.out_proj((y * F.silu(z.float())).to(z.dtype))

    def _forward_cuda(self, x: Tensor, cache: RecurrentState | None) -> Tensor:
        causal_conv1d_fn = kernel("causal_conv1d", "causal_conv1d_fn")
        selective_scan_fn = kernel("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")

        x, z = self.in_proj(x).chunk(2, dim=-1)
        x_t = x.transpose(1, 2)                                               # (B, D, L), channel-last memory
        x_t = causal_conv1d_fn(x_t, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        dt, B, C = self.all_reduce(self.x_proj(x_t.transpose(1, 2))).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)                   # bias goes in as delta_bias
        out = selective_scan_fn(
            x_t, dt, -torch.exp(self.A_log.float()), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=cache is not None)
        if cache is not None:
            y, last = out
            cache.conv = conv_tail(x, self.conv1d.weight.shape[-1], None)
            cache.state = last.float()
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))
