"""Gated linear attention (`G`), the layer of Yang et al. (flash-linear-attention's GatedLinearAttention).

q, k at d_model * expand_k, v at d_model * expand_v, split into heads; a low-rank
decay gate Linear(d, 16) -> Linear(16, K) then logsigmoid / 16 gives a per-key-dim
log decay; per head S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t and o_t = (q_t K^-1/2) S_t;
then per-head RMSNorm, a swish output gate, and o_proj.
Cache (`RecurrentState`): state (B, H, K, V) in fp32. Kernel: fla's chunk_gla over packed rows
through cu_seqlens.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import RecurrentState
from ..config import ModelConfig
from ..ops.linear_attention import GLA_TRITON, chunk_linear_attention, linear_attention_kernel, linear_attention_step
from ..sequence import SequenceInfo
from .common import KernelDispatch, LinearSpec, RMSNorm, rms_norm


class GatedLinearAttention(KernelDispatch, nn.Module):
    output_projections = ("o_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        g = cfg.gla
        key_dim, value_dim = int(cfg.d_model * g.expand_k), int(cfg.d_model * g.expand_v)
        self.n_heads = spec.local(g.n_heads, "model.gla.n_heads")
        self.head_k, self.head_v = key_dim // g.n_heads, value_dim // g.n_heads
        self.normalizer, self.chunk_size = g.gate_logit_normalizer, g.chunk_size
        self.init_dispatch(cfg)
        self.q_proj = spec.column(cfg.d_model, key_dim, False)
        self.k_proj = spec.column(cfg.d_model, key_dim, False)
        self.v_proj = spec.column(cfg.d_model, value_dim, False)
        self.g_proj = spec.column(cfg.d_model, value_dim, False)             # output gate
        # low-rank decay gate: the rank-16 hidden is replicated across TP ranks, its output split
        # by heads (a column layer, so the hidden's gradient is summed over the ranks' heads)
        self.gk_down = nn.Linear(cfg.d_model, g.gate_low_rank_dim, bias=False)
        self.gk_up = spec.column(g.gate_low_rank_dim, key_dim, True)
        self.g_norm = RMSNorm(self.head_v, cfg.norm_eps)       # one weight shared by all heads
        self.all_reduce_grad = spec.all_reduce_grad
        self.o_proj = spec.row(value_dim, cfg.d_model, False)

    def empty_cache(self) -> RecurrentState:
        return RecurrentState()

    def forward(self, x: Tensor, seq: SequenceInfo, cache: RecurrentState | None = None) -> Tensor:
        batch, length, _ = x.shape
        heads = lambda t, d: t.view(batch, length, self.n_heads, d)
        q = heads(self.q_proj(x), self.head_k) * self.head_k ** -0.5
        k = heads(self.k_proj(x), self.head_k)
        v = heads(self.v_proj(x), self.head_v)
        log_decay = heads(F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.normalizer, self.head_k)
        continuing = cache is not None and not cache.empty
        if self.choose("scan", [(GLA_TRITON, None)], x.device, continuing) is not None:
            o, state = linear_attention_kernel(q, k, v, log_decay, seq.cu_seqlens,
                                               seq.last_documents if cache is not None else None)
        elif continuing and length == 1:
            o, state = linear_attention_step(q[:, 0].float(), k[:, 0].float(), v[:, 0].float(), log_decay[:, 0], cache.state)
            o = o.unsqueeze(1)
        else:
            o, state = chunk_linear_attention(
                q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
                log_decay.transpose(1, 2), initial_state=cache.state if continuing else None,
                reset=seq.reset, chunk_size=self.chunk_size)
            o = o.transpose(1, 2)
        if cache is not None:
            cache.state = state.float()
        # under TP a rank's heads give only part of the shared norm weight's gradient
        norm_weight = self.all_reduce_grad(self.g_norm.weight)
        o = rms_norm(o.to(x.dtype), norm_weight, self.g_norm.eps) * F.silu(heads(self.g_proj(x), self.head_v))
        return self.o_proj(o.reshape(batch, length, self.n_heads * self.head_v))
