"""Tensor-parallel layout of every parameter: divisibility check, shard and merge of state dicts.

Pure torch, no process group: conversion and checkpoint tools use it as well as the
training ranks. A tensor-parallel rank holds, for each parameter of the unsharded model,
the piece given by its rule; merging concatenates the pieces in rank order:

- column, `Split(0)`: q/k/v/g_proj, gate/up_proj (relu2 MLPs have up_proj only), linear_x/y (+bias), GLA gk_up (+bias),
  embed / lm_head (vocabulary rows). Rank r holds rows r*n/tp .. (r+1)*n/tp.
- row, `Split(1)`: o_proj, down_proj, out_proj, linear_out.weight, Mamba-1 x_proj. Columns.
- fused column, `Split(0, parts)`: Mamba-1 in_proj [x; z], Mamba-2 in_proj [z; x; B; C; dt]
  and conv1d [x; B; C]. Rank r holds piece r of every part, concatenated; merged per part.
- by channel or head, `Split(0)`: conv1d, dt_proj (output side), A_log, D, dt_bias, the
  Mamba-2 norm, RG-LRU conv_1d and rg_lru.*.
- `REPLICATED`: RMSNorms over d_model, linear_out.bias (added after the sum), GLA gk_down
  and its per-head g_norm. Every rank holds all of it (equal); merge takes rank 0's.

Heads split into contiguous blocks, so grouped-query KV heads and Mamba-2 groups follow
their query heads (both counts must divide by tp). Splitting and concatenating copy
values exactly: merge(shard(x)) is bitwise x.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ConfigError, ModelConfig
from .layers import LinearSpec


@dataclass(frozen=True)
class Split:
    """Split along `dim` into tp equal pieces; `parts`: sizes of fused sub-tensors along `dim`,
    each split on its own (rank r holds piece r of every part, in order)."""
    dim: int
    parts: tuple[int, ...] | None = None


REPLICATED = None           # every rank holds the whole tensor
COLUMN = Split(0)           # output features, channels, heads or vocab rows
ROW = Split(1)              # input features


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError naming the field and the numbers if `cfg` cannot be split over `tp` ranks.

    Needs no process group: call it before any starts.
    """
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"parallel.tp={tp!r}: must be a positive integer")
    spec = LinearSpec(tp_size=tp)
    spec.local(cfg.vocab_size, "model.vocab_size")
    kinds = set(cfg.layer_types)
    if kinds & {"swa", "attention"}:
        spec.local(cfg.attn.n_heads, "model.attn.n_heads")
        spec.local(cfg.n_kv_heads, "model.attn.n_kv_heads")
    if "mlp" in kinds:
        spec.local(cfg.mlp_hidden, "model.mlp_hidden")
    if "mamba" in kinds and cfg.mamba.version == 1:
        spec.local(cfg.d_inner, "model.mamba.expand * model.d_model (Mamba d_inner)")
    if "mamba" in kinds and cfg.mamba.version == 2:
        spec.local(cfg.mamba2_heads, "d_inner / model.mamba.head_dim (Mamba-2 heads)")
        spec.local(cfg.mamba.n_groups, "model.mamba.n_groups")
    if "gla" in kinds:
        spec.local(cfg.gla.n_heads, "model.gla.n_heads")
    if "rglru" in kinds:
        spec.local(cfg.rglru.n_heads, "model.rglru.n_heads")


def _mixer_layout(kind: str, cfg: ModelConfig) -> dict[str, Split | None]:
    """Rule of each parameter of one sublayer's mixer, by its name inside the mixer."""
    if kind == "mamba" and cfg.mamba.version == 1:
        d_inner = cfg.d_inner
        return {"in_proj.weight": Split(0, (d_inner, d_inner)), "conv1d.weight": COLUMN, "conv1d.bias": COLUMN,
                "x_proj.weight": ROW, "dt_proj.weight": COLUMN, "dt_proj.bias": COLUMN,
                "A_log": COLUMN, "D": COLUMN, "out_proj.weight": ROW}
    if kind == "mamba":
        d_inner, bc = cfg.d_inner, cfg.mamba.n_groups * cfg.mamba.d_state
        conv = Split(0, (d_inner, bc, bc))
        return {"in_proj.weight": Split(0, (d_inner, d_inner, bc, bc, cfg.mamba2_heads)),
                "conv1d.weight": conv, "conv1d.bias": conv, "dt_bias": COLUMN, "A_log": COLUMN, "D": COLUMN,
                "norm.weight": COLUMN, "out_proj.weight": ROW}
    if kind in ("swa", "attention"):
        return {"q_proj.weight": COLUMN, "k_proj.weight": COLUMN, "v_proj.weight": COLUMN, "o_proj.weight": ROW}
    if kind == "gla":
        return {"q_proj.weight": COLUMN, "k_proj.weight": COLUMN, "v_proj.weight": COLUMN, "g_proj.weight": COLUMN,
                "gk_down.weight": REPLICATED, "gk_up.weight": COLUMN, "gk_up.bias": COLUMN,
                "g_norm.weight": REPLICATED, "o_proj.weight": ROW}
    if kind == "rglru":
        return {"linear_y.weight": COLUMN, "linear_y.bias": COLUMN, "linear_x.weight": COLUMN,
                "linear_x.bias": COLUMN, "linear_out.weight": ROW, "linear_out.bias": REPLICATED,
                "conv_1d.weight": COLUMN, "conv_1d.bias": COLUMN, "rg_lru.recurrent_param": COLUMN,
                "rg_lru.input_gate_weight": COLUMN, "rg_lru.input_gate_bias": COLUMN,
                "rg_lru.recurrent_gate_weight": COLUMN, "rg_lru.recurrent_gate_bias": COLUMN}
    if kind == "mlp":
        return {"gate_proj.weight": COLUMN, "up_proj.weight": COLUMN, "down_proj.weight": ROW}
    raise ValueError(f"unknown sublayer kind {kind!r}")


_MIXER_PARAMETER = re.compile(r"layers\.(\d+)\.mixer\.(.+)")
_TOP_LEVEL = {"embed.weight": COLUMN, "lm_head.weight": COLUMN, "norm.weight": REPLICATED}


def tensor_parallel_rule(name: str, cfg: ModelConfig) -> Split | None:
    """The rule of parameter `name` of HybridLM(cfg); KeyError naming it if it has none."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    if re.fullmatch(r"layers\.\d+\.norm\.weight", name):
        return REPLICATED
    match = _MIXER_PARAMETER.fullmatch(name)
    if match and int(match[1]) < cfg.n_sublayers:
        rules = _mixer_layout(cfg.layer_types[int(match[1])], cfg)
        if match[2] in rules:
            return rules[match[2]]
    raise KeyError(f"{name}: no tensor-parallel rule for this parameter of pattern {cfg.pattern!r}")


def _pieces(tensor: Tensor, rule: Split, tp_size: int, name: str) -> list[list[Tensor]]:
    """Per part, its tp pieces along rule.dim."""
    parts = rule.parts or (tensor.shape[rule.dim],)
    if sum(parts) != tensor.shape[rule.dim]:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not hold parts {parts} along dim {rule.dim}")
    pieces = []
    for size, part in zip(parts, tensor.split(parts, dim=rule.dim)):
        if size % tp_size:
            raise ValueError(f"{name}: size {size} along dim {rule.dim} is not divisible by "
                             f"tensor-parallel size {tp_size}")
        pieces.append(list(part.chunk(tp_size, dim=rule.dim)))
    return pieces


def shard_state_dict(full_state_dict: dict[str, Tensor], cfg: ModelConfig, tp_rank: int,
                     tp_size: int) -> dict[str, Tensor]:
    """Rank `tp_rank`'s piece of every tensor of an unsharded HybridLM state dict (new tensors, contiguous)."""
    check_tensor_parallel(cfg, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank}: must be in [0, {tp_size})")
    shard = {}
    for name, tensor in full_state_dict.items():
        rule = tensor_parallel_rule(name, cfg)
        if rule is REPLICATED or tp_size == 1:
            shard[name] = tensor.clone()
        else:
            pieces = _pieces(tensor, rule, tp_size, name)
            shard[name] = torch.cat([part[tp_rank] for part in pieces], dim=rule.dim).contiguous()
    return shard


def merge_tp_shards(shards: list[dict[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    """The unsharded state dict from the shards of TP ranks 0..tp-1, in rank order (inverse of shard_state_dict).

    Replicated tensors are taken from rank 0; their shapes must agree on every rank.
    """
    tp_size = len(shards)
    if tp_size == 0:
        raise ValueError("merge_tp_shards: no shards given")
    names = list(shards[0])
    for rank, shard in enumerate(shards):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise ValueError(f"shard of tp rank {rank}: tensor names differ from rank 0's ({', '.join(diff[:5])})")
    merged = {}
    for name in names:
        rule = tensor_parallel_rule(name, cfg)
        tensors = [shard[name] for shard in shards]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{name}: shards have different shapes {sorted(shapes)}")
        if rule is REPLICATED or tp_size == 1:
            merged[name] = tensors[0].clone()
            continue
        parts = rule.parts or (tensors[0].shape[rule.dim] * tp_size,)
        local = [size // tp_size for size in parts]
        if sum(local) != tensors[0].shape[rule.dim] or any(size % tp_size for size in parts):
            raise ValueError(f"{name}: shard shape {tuple(tensors[0].shape)} does not hold 1/{tp_size} of parts "
                             f"{parts} along dim {rule.dim}")
        per_rank = [t.split(local, dim=rule.dim) for t in tensors]
        merged[name] = torch.cat([piece[p] for p in range(len(parts)) for piece in per_rank], dim=rule.dim)
    return merged


def rank_local_spec(tp_size: int) -> LinearSpec:
    """A LinearSpec of one rank's shapes under tensor parallelism, built in one process with no
    communication: for counting parameters and activations and checking shard shapes, not for
    computing (its reductions are identities)."""
    return LinearSpec(column=lambda i, o, bias: nn.Linear(i, o // tp_size, bias=bias),
                      row=lambda i, o, bias: nn.Linear(i // tp_size, o, bias=bias),
                      embedding=lambda vocab, d: nn.Embedding(vocab // tp_size, d),
                      lm_head=lambda d, vocab: nn.Linear(d, vocab // tp_size, bias=False),
                      tp_size=tp_size)
