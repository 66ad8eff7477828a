"""Causal self-attention: sliding-window (`S`) and full (`*`), with RoPE (or none: model.attn.rope=false)
and grouped-query heads.

Cache (`KVCache`): the last `window` keys/values in a ring buffer for `S` (constant
memory), every key/value for `*`. Keys are cached after RoPE, so a slot's place in
the buffer does not matter to a decode step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..config import ModelConfig
from ..ops.attention import ATTN_CUDA, attention, attention_kernels, flash_attention, flex_attention
from ..sequence import SequenceInfo
from .common import KernelDispatch, LinearSpec, apply_rotary, rotary_cos_sin


class Attention(KernelDispatch, nn.Module):
    output_projections = ("o_proj",)

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, window: int | None):
        super().__init__()
        self.window = window
        self.head_dim = cfg.head_dim
        self.n_heads = spec.local(cfg.attn.n_heads, "model.attn.n_heads")
        self.n_kv_heads = spec.local(cfg.n_kv_heads, "model.attn.n_kv_heads")
        self.rope = cfg.attn.rope           # false: no positions at all (Nemotron-H); causality orders tokens
        self.rope_base = cfg.attn.rope_base
        self.init_dispatch(cfg)
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = spec.column(d, cfg.attn.n_heads * hd, False)
        self.k_proj = spec.column(d, cfg.n_kv_heads * hd, False)
        self.v_proj = spec.column(d, cfg.n_kv_heads * hd, False)
        self.o_proj = spec.row(cfg.attn.n_heads * hd, d, False)

    def empty_cache(self) -> KVCache:
        return KVCache(window=self.window)

    def forward(self, x: Tensor, seq: SequenceInfo, cache: KVCache | None = None) -> Tensor:
        batch, length, _ = x.shape
        heads = lambda t, n: t.view(batch, length, n, self.head_dim).transpose(1, 2)
        q = heads(self.q_proj(x), self.n_heads)
        k = heads(self.k_proj(x), self.n_kv_heads)
        v = heads(self.v_proj(x), self.n_kv_heads)
        if self.rope:
            cos, sin = rotary_cos_sin(seq.positions, self.head_dim, self.rope_base, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        continuing = cache is not None and not cache.empty
        fast = self.choose("attention", attention_kernels(self.head_dim), x.device, continuing)
        if continuing and length == 1:
            # decode step: every cached slot of the current document is inside the window
            cache.append(k, v)
            n = cache.k.shape[2] if self.window is not None else cache.length
            o = attention(q, cache.k[:, :, :n], cache.v[:, :, :n], window=None,
                          q_segments=torch.zeros_like(cache.segments[:, :1]), k_segments=cache.segments[:, :n])
        elif continuing:
            # continuation chunk: attend over the cached prefix, oldest first
            past_k, past_v, past_seg = cache.ordered()
            segments = seq.segments if seq.segments is not None else torch.zeros_like(seq.positions)
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            k_segments = torch.cat([past_seg, segments], dim=1)
            o = attention(q, k, v, window=self.window, q_segments=segments, k_segments=k_segments)
            cache.store(k, v, k_segments)
        else:
            if fast is ATTN_CUDA:
                o = flash_attention(q, k, v, window=self.window, q_segments=seq.segments, k_segments=seq.segments,
                                    cu_seqlens=seq.cu_seqlens, max_seqlen=seq.max_seqlen)
            elif fast is not None:
                o = flex_attention(q, k, v, window=self.window, seq_idx=seq.seq_idx, masks=seq.derived)
            else:
                o = attention(q, k, v, window=self.window, q_segments=seq.segments, k_segments=seq.segments)
            if cache is not None:
                cache.store(k, v, seq.segments if seq.segments is not None else torch.zeros_like(seq.positions))
        return self.o_proj(o.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))
