"""Mamba-1 mixer (`M` with mamba.version=1): selective SSM, as in Samba.

Parameter names and shapes follow `transformers`' MambaMixer so the native Mamba
export is a rename-free copy. Per channel d and state n:
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t,    y_t = C_t . h_t + D * x_t
Cache (`RecurrentState`): conv tail (B, K-1, d_inner) and SSM state (B, d_inner, d_state).
Packed rows (`mamba.packed_resets`): `exact` restarts conv and state at each document (on GPU:
causal-conv1d or fla's conv, Braid's Triton selective scan with resets); `flow` runs each training
row as one sequence, as Samba does, so mamba-ssm's selective_scan_fn (no reset input) applies.
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
from ..kernels import Kernel, kernel, triton_state_rule
from ..ops.selective_scan import selective_scan
from ..sequence import SequenceInfo
from .common import KernelDispatch, LinearSpec

SCAN_CUDA = Kernel("mamba_ssm.selective_scan_fn", ("mamba_ssm",), "cuda")
SCAN_TRITON = Kernel("braid.selective_scan_triton", ("braid_triton",), "triton")


def init_dt_bias(size: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))   # inverse softplus


class Mamba(KernelDispatch, nn.Module):
    output_projections = ("out_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        m = cfg.mamba
        self.cfg = m
        self.d_inner = spec.local(cfg.d_inner, "model.mamba.expand * model.d_model (Mamba d_inner)")
        self.d_state, self.dt_rank, self.all_reduce = m.d_state, cfg.dt_rank, spec.all_reduce
        self.init_dispatch(cfg)
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
        documents = self.cfg.packed_resets == "exact" or cache is not None
        reset = seq.reset if documents else None
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x, conv_state = self.short_conv(x, self.conv1d, seq, cache, silu=True, documents=documents)
        # selective_scan_fn has no reset input: it is a candidate only for rows without document starts
        candidates = ([(SCAN_CUDA, None)] if reset is None else []) + \
            [(SCAN_TRITON, triton_state_rule("model.mamba.d_state", self.d_state))]
        scan = self.choose("scan", candidates, x.device, continuing)
        dt, B, C = self.all_reduce(self.x_proj(x)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if scan is SCAN_CUDA:
            return self._selective_scan_fn(x, dt, B, C, z, conv_state, cache)
        # dt's bias added in fp32 (as selective_scan_fn's delta_bias), after the projection's bf16 matmul
        dt = F.softplus((dt @ self.dt_proj.weight.t()).float() + self.dt_proj.bias.float())   # (B, L, D)
        A = -torch.exp(self.A_log.float())                                    # (D, N)
        x, B, C = x.float(), B.float(), C.float()
        initial = cache.state if continuing else None
        if initial is not None and x.shape[1] == 1:                          # decode step
            state = torch.exp(dt[:, 0, :, None] * A) * initial + (dt[:, 0] * x[:, 0])[..., None] * B[:, 0, None, :]
            y = torch.einsum("bdn,bn->bd", state, C[:, 0]).unsqueeze(1)
        elif scan is SCAN_TRITON:
            y, state = kernel("model.ops.triton_selective_scan", "selective_scan_triton")(x, dt, A, B, C, reset)
        else:
            y, state = selective_scan(x, dt, A, B, C, initial, reset)
        y = y + self.D.float() * x
        if cache is not None:
            cache.conv, cache.state = conv_state, state
        return self.out_proj((y * F.silu(z.float())).to(z.dtype))

    def _selective_scan_fn(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor, conv_state: Tensor | None,
                           cache: RecurrentState | None) -> Tensor:
        """mamba-ssm's CUDA scan: dt's bias, softplus, D and the z gate fused, (B, D, L) layout."""
        selective_scan_fn = kernel("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)                   # bias goes in as delta_bias
        out = selective_scan_fn(
            x.transpose(1, 2), dt, -torch.exp(self.A_log.float()), B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(), self.D.float(), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=cache is not None)
        if cache is not None:
            y, last = out
            cache.conv, cache.state = conv_state, last.float()
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))
