"""Mamba-2 mixer (`M` with mamba.version=2): SSD with scalar decay per head and shared B/C groups.

Parameter names and shapes follow `transformers`' Mamba2Mixer: in_proj emits
[z, xBC, dt]; the conv runs over xBC = [x, B, C]. Per head h (state N x head dim P):
    S_t = exp(dt_t * A_h) * S_{t-1} + B_t^T (dt_t * x_t),   y_t = C_t S_t + D_h * x_t
then y = RMSNorm(y * silu(z)) per group, out_proj. The scan is chunked linear
attention with q = C, k = B, v = dt * x and a scalar log decay dt * A.
Cache (`RecurrentState`): conv tail (B, K-1, conv_dim) and state (B, H, N, P).
Kernels: the conv on causal-conv1d or fla's conv, the scan on fla's chunk_simple_gla (SSD's
scalar-decay form) over packed rows through cu_seqlens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentState
from ..config import ModelConfig
from ..ops.linear_attention import (SIMPLE_GLA_TRITON, chunk_linear_attention, linear_attention_kernel,
                                    linear_attention_step)
from ..sequence import SequenceInfo
from .common import KernelDispatch, LinearSpec, RMSNorm
from .mamba import init_dt_bias


class Mamba2(KernelDispatch, nn.Module):
    output_projections = ("out_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        m = self.cfg = cfg.mamba
        self.init_dispatch(cfg)
        self.n_heads = spec.local(cfg.mamba2_heads, "d_inner / model.mamba.head_dim (Mamba-2 heads)")
        self.n_groups = spec.local(m.n_groups, "model.mamba.n_groups")
        self.head_dim, self.d_state = m.head_dim, m.d_state
        self.d_inner = self.n_heads * m.head_dim
        self.conv_dim = self.d_inner + 2 * self.n_groups * m.d_state
        projection = 2 * cfg.d_inner + 2 * m.n_groups * m.d_state + cfg.mamba2_heads
        self.in_proj = spec.column(cfg.d_model, projection, False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(self.d_inner, cfg.norm_eps, group_size=self.d_inner // self.n_groups)
        self.out_proj = spec.row(cfg.d_inner, cfg.d_model, False)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
            self.D.fill_(1.0)
            self.dt_bias.copy_(init_dt_bias(self.n_heads, self.cfg.dt_min, self.cfg.dt_max, self.cfg.dt_init_floor))
            self.norm.weight.fill_(1.0)

    def empty_cache(self) -> RecurrentState:
        return RecurrentState()

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def forward(self, x: Tensor, seq: SequenceInfo, cache: RecurrentState | None = None) -> Tensor:
        continuing = cache is not None and not cache.empty
        batch, length, _ = x.shape
        z, xbc, dt = self._split(self.in_proj(x))
        xbc, conv_state = self.short_conv(xbc, self.conv1d, seq, cache, silu=True)
        scan = self.choose("scan", [(SIMPLE_GLA_TRITON, None)], x.device, continuing)
        xs, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())                   # (B, L, H)
        log_decay = dt * -torch.exp(self.A_log.float())                      # (B, L, H)
        per_head = self.n_heads // self.n_groups
        groups_to_heads = lambda t: t.view(batch, length, self.n_groups, self.d_state) \
            .repeat_interleave(per_head, dim=2)                                           # (B, L, H, N)
        xs = xs.view(batch, length, self.n_heads, self.head_dim)
        if scan is not None:
            v = (xs.float() * dt.unsqueeze(-1)).to(xs.dtype)                              # (B, L, H, P)
            y, state = linear_attention_kernel(groups_to_heads(C), groups_to_heads(B), v, log_decay, seq.cu_seqlens,
                                               seq.last_documents if cache is not None else None)
            y = y.float()
        else:
            C, B = (groups_to_heads(t).float().transpose(1, 2) for t in (C, B))             # (B, H, L, N)
            v = (xs.float() * dt.unsqueeze(-1)).transpose(1, 2)                             # (B, H, L, P)
            log_decay = log_decay.transpose(1, 2).unsqueeze(-1)                             # (B, H, L, 1)
            if continuing and length == 1:
                y, state = linear_attention_step(C[:, :, 0], B[:, :, 0], v[:, :, 0], log_decay[:, :, 0], cache.state)
                y = y.unsqueeze(2)
            else:
                y, state = chunk_linear_attention(C, B, v, log_decay, initial_state=cache.state if continuing else None,
                                                  reset=seq.reset, chunk_size=self.cfg.chunk_size)
            y = y.transpose(1, 2)
        y = y + xs.float() * self.D.float().view(-1, 1)
        if cache is not None:
            cache.conv, cache.state = conv_state, state
        return self._gated_out(y.reshape(batch, length, self.d_inner), z)

    def _gated_out(self, y: Tensor, z: Tensor) -> Tensor:
        # gate before the norm (mamba_ssm's norm_before_gate=False), normalised per group
        return self.out_proj(self.norm((y * F.silu(z.float())).to(z.dtype)))
