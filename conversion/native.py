"""Braid models as transformers' own architectures: no remote code, so vLLM and llama.cpp serve them.

    family = native_family(cfg)              # the class that computes exactly what `cfg` computes
    family = native_family(cfg, "qwen2")     # that class, or a one-line ValueError naming what is in the way
    tensors = family.export(state, cfg)      # HybridLM names -> the class's names
    config = family.config(cfg)              # config.json's architecture fields
    cfg, state = read_native(config, tensors, where)   # back, from any folder of these classes

| family | class | Braid patterns it represents exactly |
|---|---|---|
| mamba | MambaForCausalLM | `M` only, Mamba-1 |
| mamba2 | Mamba2ForCausalLM | `M` only, Mamba-2 |
| llama | LlamaForCausalLM | `*` and `-`, RoPE, SwiGLU |
| mistral | MistralForCausalLM | `S` and `-`, RoPE, SwiGLU |
| qwen2 | Qwen2ForCausalLM | `S`, `*` and `-` (per-layer `layer_types`), RoPE, SwiGLU, head_dim = d_model / heads |
| nemotron_h | NemotronHForCausalLM | Mamba-2 `M`, `*` without RoPE, `-` ReLU^2 (one sublayer per block, as Braid) |
| granitemoehybrid | GraniteMoeHybridForCausalLM | Mamba-2 `M`, `*` (RoPE or none), `-` SwiGLU, at least one `*`, head_dim = d_model / heads |

`native_family` takes the first that fits, in this order: Mamba, Mamba-2, Llama, Mistral, Qwen2,
Nemotron-H, GraniteMoeHybrid.

Two kinds of layout. *Block* classes (Mamba, Mamba-2, Nemotron-H) have one mixer per residual
block, like Braid: only names change (`backbone.` prefix). *Paired* classes (Llama, Mistral, Qwen2,
GraniteMoeHybrid) have a mixer and then an MLP in every layer: a Braid mixer followed by `-` fills
one layer; a mixer with no `-` after it gets an all-zero MLP, a `-` with no mixer before it an
all-zero mixer. x + 0 is x exactly, so the folder computes what the pattern computes, and reading
it back drops every sublayer whose output projection is all zero.

config.json also carries the whole Braid config under `braid` (training settings that change no
output: initialisation, stage marks `|`). `read_native` builds the model from the class's own
fields and uses `braid` only while it describes the same model (a folder edited or re-saved by
transformers is read from its fields alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from model import ModelConfig
from model.config import ConfigError, SUBLAYERS

# symbol -> what it is, for error messages
SYMBOL_NAMES = {"M": "Mamba", "G": "gated linear attention", "S": "sliding-window attention", "*": "full attention",
                "R": "RG-LRU recurrent block", "-": "MLP"}
KIND_SYMBOL = {kind: symbol for symbol, kind in SUBLAYERS.items()}


# ---- what each class can represent --------------------------------------------------------------

def _symbols(cfg: ModelConfig) -> set[str]:
    return set(cfg.pattern) - {"|"}


def _blocker(cfg: ModelConfig, family: str) -> str | None:
    """Why `family` cannot represent `cfg` exactly (one clause naming the sublayer or option), or None."""
    symbols, m, a = _symbols(cfg), cfg.mamba, cfg.attn
    attention = bool(symbols & {"S", "*"})
    other = sorted(symbols - {"M", "-", "*", "S"})
    if other:
        return f"sublayer {other[0]!r} ({SYMBOL_NAMES[other[0]]}) has no native transformers class"
    if family == "mamba":
        if symbols != {"M"} or m.version != 1:
            return f"MambaForCausalLM holds Mamba-1 mixers only ('M' with model.mamba.version=1), not {cfg.pattern!r}"
        return None
    if family == "mamba2":
        if symbols != {"M"} or m.version != 2:
            return f"Mamba2ForCausalLM holds Mamba-2 mixers only ('M' with model.mamba.version=2), not {cfg.pattern!r}"
        return None
    if "M" in symbols and m.version == 1:
        return "Mamba-1 ('M' with model.mamba.version=1) is native only alone (MambaForCausalLM, a pattern of M)"
    swiglu = cfg.mlp_activation == "swiglu" or "-" not in symbols
    if family in ("llama", "mistral", "qwen2"):
        allowed = {"llama": {"*", "-"}, "mistral": {"S", "-"}, "qwen2": {"S", "*", "-"}}[family]
        if not symbols <= allowed:
            wrong = sorted(symbols - allowed)[0]
            return f"sublayer {wrong!r} ({SYMBOL_NAMES[wrong]}) is not in {family}'s layers"
        if not attention:
            return "a pattern of MLPs alone has no attention"
        if not a.rope:
            return f"model.attn.rope=false: {family}'s attention always applies RoPE"
        if not swiglu:
            return f"model.mlp_activation={cfg.mlp_activation}: {family}'s MLP is SwiGLU"
        if family == "qwen2" and cfg.head_dim * a.n_heads != cfg.d_model:
            return f"model.attn.head_dim={cfg.head_dim}: qwen2 needs d_model / n_heads"
        return None
    if "S" in symbols:
        beside = " beside Mamba-2" if "M" in symbols else ""
        return f"sliding-window attention 'S'{beside}: NemotronH and GraniteMoeHybrid attend over the whole context"
    if family == "nemotron_h":
        if "*" in symbols and a.rope:
            return "model.attn.rope=true: NemotronH's attention has no RoPE"
        if "-" in symbols and cfg.mlp_activation != "relu2":
            return f"model.mlp_activation={cfg.mlp_activation}: NemotronH's MLP is relu2 (squared ReLU, ungated)"
        return None
    if family == "granitemoehybrid":
        if not swiglu:
            return f"model.mlp_activation={cfg.mlp_activation}: GraniteMoeHybrid's MLP is SwiGLU"
        if "*" not in symbols:
            return "a Mamba-2 stack with MLPs and no attention: GraniteMoeHybrid needs an attention layer"
        if cfg.head_dim * a.n_heads != cfg.d_model:
            return f"model.attn.head_dim={cfg.head_dim}: GraniteMoeHybrid (and vLLM) need d_model / n_heads"
        return None
    raise ValueError(f"unknown native family {family!r}")


# ---- layouts ------------------------------------------------------------------------------------

def _zeros_like_sublayer(kind: str, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """An all-zero sublayer of `kind` (its norm weight ones): it adds nothing to the residual stream."""
    from model.layers import LinearSpec, build_mixer
    with torch.device("meta"):
        mixer = build_mixer(kind, cfg, LinearSpec())
    tensors = {f"mixer.{name}": torch.zeros(p.shape, dtype=dtype) for name, p in mixer.named_parameters()}
    return {"norm.weight": torch.ones(cfg.d_model, dtype=dtype), **tensors}


def _is_zero(tensor: Tensor) -> bool:
    return not bool(tensor.any())


def layer_pairs(kinds: list[str]) -> list[tuple[int | None, int | None]]:
    """Sublayer indices (mixer, mlp) of each layer of a paired class: a mixer takes the `-` right after it."""
    pairs: list[tuple[int | None, int | None]] = []
    for i, kind in enumerate(kinds):
        if kind == "mlp" and pairs and pairs[-1][1] is None and pairs[-1][0] == i - 1:
            pairs[-1] = (pairs[-1][0], i)
        elif kind == "mlp":
            pairs.append((None, i))
        else:
            pairs.append((i, None))
    return pairs


def _sublayer(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    prefix = f"layers.{i}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class Paired:
    """Names of a class whose layers are input_layernorm, a mixer, post_attention_layernorm, an MLP."""
    attention: str = "self_attn"
    mamba: str = "mamba"
    mlp: str = "mlp"
    fused_mlp: bool = False              # GraniteMoeHybrid: input_linear = [gate; up], output_linear = down
    qkv_bias: bool = False               # Qwen2: q/k/v biases (written as zeros)

    def mixer_key(self, kind: str) -> str:
        return self.mamba if kind == "mamba" else self.attention

    def mlp_tensors(self, mlp: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.fused_mlp:
            return {"input_linear.weight": torch.cat([mlp["mixer.gate_proj.weight"], mlp["mixer.up_proj.weight"]]),
                    "output_linear.weight": mlp["mixer.down_proj.weight"]}
        return {n: mlp[f"mixer.{n}"] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")}

    def mlp_from(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.fused_mlp:
            gate, up = (t.clone() for t in tensors["input_linear.weight"].chunk(2, dim=0))
            return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": tensors["output_linear.weight"]}
        return {n: tensors[n] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")}

    def mlp_out(self) -> str:
        return "output_linear.weight" if self.fused_mlp else "down_proj.weight"


_OUT_PROJECTION = {"attention": "o_proj.weight", "swa": "o_proj.weight", "mamba": "out_proj.weight"}


# ---- the families ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str
    paired: Paired | None = None        # None: one mixer per block under `backbone.`

    # -- export --
    def layer_kinds(self, cfg: ModelConfig) -> list[str]:
        """The kind of each HF layer's mixer (paired: filler mixers included)."""
        kinds = cfg.layer_types
        if self.paired is None:
            return kinds
        filler = self.filler_kind(cfg)
        return [kinds[m] if m is not None else filler for m, _ in layer_pairs(kinds)]

    def filler_kind(self, cfg: ModelConfig) -> str:
        kinds = cfg.layer_types
        return "mamba" if "mamba" in kinds else next(k for k in kinds if k in ("attention", "swa"))

    def export(self, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
        """HybridLM state dict (lm_head included) -> this class's tensors; a tied head is stored once."""
        tied = cfg.tie_embeddings and self.name != "nemotron_h"      # NemotronH has no tying: its own copy
        if self.paired is None:
            out = {"backbone.embeddings.weight": state["embed.weight"], "backbone.norm_f.weight": state["norm.weight"]}
            out.update({f"backbone.{k}": v for k, v in state.items() if k.startswith("layers.")})
        else:
            p = self.paired
            out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
            kinds = cfg.layer_types
            for j, (m, f) in enumerate(layer_pairs(kinds)):
                kind = kinds[m] if m is not None else self.filler_kind(cfg)
                dtype = state["embed.weight"].dtype
                mixer = _sublayer(state, m) if m is not None else _zeros_like_sublayer(kind, cfg, dtype)
                mlp = _sublayer(state, f) if f is not None else _zeros_like_sublayer("mlp", cfg, dtype)
                layer = f"model.layers.{j}."
                out[layer + "input_layernorm.weight"] = mixer["norm.weight"]
                for name, tensor in mixer.items():
                    if name.startswith("mixer."):
                        out[f"{layer}{p.mixer_key(kind)}.{name.removeprefix('mixer.')}"] = tensor
                if p.qkv_bias:
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        weight = out[f"{layer}{p.attention}.{proj}.weight"]
                        out[f"{layer}{p.attention}.{proj}.bias"] = weight.new_zeros(weight.shape[0])
                out[layer + "post_attention_layernorm.weight"] = mlp["norm.weight"]
                out.update({f"{layer}{p.mlp}.{n}": t for n, t in p.mlp_tensors(mlp).items()})
        if not tied:                            # NemotronH of a tied model: a copy of its own
            out["lm_head.weight"] = state["lm_head.weight"].clone() if cfg.tie_embeddings else state["lm_head.weight"]
        return out

    def config(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json's architecture fields (token ids, dtype and provenance are added by to_hf)."""
        m, a = cfg.mamba, cfg.attn
        common = {"architectures": [self.architecture], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.d_model, "tie_word_embeddings": cfg.tie_embeddings and self.name != "nemotron_h",
                  "max_position_embeddings": cfg.max_seq_len}
        rope = {"rope_theta": a.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_base}}
        mamba2 = {"num_heads": cfg.mamba2_heads, "head_dim": m.head_dim, "state_size": m.d_state,
                  "n_groups": m.n_groups, "conv_kernel": m.d_conv, "expand": m.expand, "use_conv_bias": m.conv_bias,
                  "use_bias": False, "chunk_size": m.chunk_size, "time_step_min": m.dt_min, "time_step_max": m.dt_max,
                  "time_step_floor": m.dt_init_floor}
        if self.name == "mamba":
            return {**common, "state_size": m.d_state, "num_hidden_layers": cfg.n_sublayers,
                    "layer_norm_epsilon": cfg.norm_eps, "expand": m.expand, "conv_kernel": m.d_conv, "use_bias": False,
                    "use_conv_bias": m.conv_bias, "time_step_rank": cfg.dt_rank, "time_step_min": m.dt_min,
                    "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor, "residual_in_fp32": False,
                    "hidden_act": "silu"}
        if self.name == "mamba2":
            return {**common, **mamba2, "num_hidden_layers": cfg.n_sublayers, "layer_norm_epsilon": cfg.norm_eps,
                    "residual_in_fp32": False, "hidden_act": "silu", "rescale_prenorm_residual": False}
        kinds = self.layer_kinds(cfg)
        if self.name == "nemotron_h":
            block = {"mamba": "linear_attention", "attention": "full_attention", "mlp": "mlp"}
            return {**common, "num_hidden_layers": cfg.n_sublayers,
                    "layers_block_type": [block[k] for k in kinds],
                    # llama.cpp's converter reads the string form (its list form counts only `moe` as MLPs)
                    "hybrid_override_pattern": "".join(KIND_SYMBOL[k] for k in kinds),
                    "num_attention_heads": a.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                    "attention_bias": False, "intermediate_size": cfg.mlp_hidden, "mlp_hidden_act": "relu2",
                    "mlp_bias": False, "ssm_state_size": m.d_state, "mamba_num_heads": cfg.mamba2_heads,
                    "mamba_head_dim": m.head_dim, "n_groups": m.n_groups, "conv_kernel": m.d_conv, "expand": m.expand,
                    "use_conv_bias": m.conv_bias, "use_bias": False, "mamba_proj_bias": False,
                    "mamba_hidden_act": "silu", "chunk_size": m.chunk_size,
                    # NemotronH clamps dt >= time_step_min; Braid's Mamba-2 does not clamp
                    "time_step_min": 0.0, "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor,
                    "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": False, "rescale_prenorm_residual": False}
        attention = {"num_hidden_layers": len(kinds), "num_attention_heads": a.n_heads,
                     "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
                     "attention_bias": False}
        if self.name in ("llama", "mistral"):
            out = {**common, **attention, **rope, "intermediate_size": cfg.mlp_hidden, "head_dim": cfg.head_dim,
                   "mlp_bias": False}
            if self.name == "mistral":
                out["sliding_window"] = a.window
            return out
        if self.name == "qwen2":
            return {**common, **attention, **rope, "intermediate_size": cfg.mlp_hidden, "use_sliding_window": "swa" in kinds,
                    "sliding_window": a.window if "swa" in kinds else None, "max_window_layers": 0,
                    "layer_types": ["sliding_attention" if k == "swa" else "full_attention" for k in kinds]}
        if self.name == "granitemoehybrid":
            return {**common, **attention, **rope, "intermediate_size": cfg.mlp_hidden,
                    "shared_intermediate_size": cfg.mlp_hidden, "num_local_experts": 0, "num_experts_per_tok": 0,
                    "position_embedding_type": "rope" if a.rope else "nope",
                    "attention_multiplier": cfg.head_dim ** -0.5, "embedding_multiplier": 1.0,
                    "residual_multiplier": 1.0, "logits_scaling": 1.0,
                    # vLLM's names ("mamba"/"attention"); transformers 5 reads them as linear/full_attention
                    "layer_types": ["mamba" if k == "mamba" else "attention" for k in kinds],
                    "mamba_n_heads": cfg.mamba2_heads, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
                    "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
                    "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": False}
        raise ValueError(f"unknown native family {self.name!r}")

    # -- import --
    def model_config(self, config: dict[str, Any], where: str) -> tuple[ModelConfig, list[str]]:
        """(ModelConfig, kind of each HF layer's mixer) from a folder's config.json, one line naming a
        field Braid cannot represent."""
        get = _getter(config, where)

        def require(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{where}: {field}={config.get(field)!r}: {why} (Braid cannot represent it)")

        base = {"vocab_size": get("vocab_size"), "d_model": get("hidden_size"),
                "tie_embeddings": bool(config.get("tie_word_embeddings", self.name == "mamba"))}
        if config.get("max_position_embeddings"):
            base["max_seq_len"] = int(config["max_position_embeddings"])
        if self.name in ("mamba2", "nemotron_h", "granitemoehybrid"):
            prefix = "mamba_" if self.name == "granitemoehybrid" else ""
            heads = get({"mamba2": "num_heads", "nemotron_h": "mamba_num_heads", "granitemoehybrid": "mamba_n_heads"}[self.name])
            head_dim = get({"mamba2": "head_dim", "nemotron_h": "mamba_head_dim", "granitemoehybrid": "mamba_d_head"}[self.name])
            expand = get(prefix + "expand") if self.name != "nemotron_h" else get("expand")
            require(heads * head_dim == expand * base["d_model"], "expand" if not prefix else "mamba_expand",
                    f"Mamba-2 heads x head_dim ({heads} x {head_dim}) must be expand x hidden_size")
            require(not config.get(prefix + ("proj_bias" if prefix else "use_bias"), False),
                    prefix + ("proj_bias" if prefix else "use_bias"), "Braid's Mamba-2 projections have no bias")
            limit = config.get("time_step_limit")
            require(limit is None or (_float(limit[0]) == 0.0 and math.isinf(_float(limit[1]))), "time_step_limit",
                    "Braid's Mamba-2 does not clamp dt")
            if self.name == "nemotron_h":
                require(float(config.get("time_step_min", 0.0)) == 0.0, "time_step_min",
                        "NemotronH clamps dt at time_step_min; Braid's Mamba-2 does not clamp")
            base["mamba"] = {"version": 2, "head_dim": head_dim, "expand": expand,
                             "d_state": get({"mamba2": "state_size", "nemotron_h": "ssm_state_size",
                                             "granitemoehybrid": "mamba_d_state"}[self.name]),
                             "n_groups": get(prefix + "n_groups"), "d_conv": get(prefix + "d_conv" if prefix else "conv_kernel"),
                             "conv_bias": bool(config.get(prefix + "conv_bias" if prefix else "use_conv_bias", True)),
                             "chunk_size": int(config.get(prefix + "chunk_size" if prefix else "chunk_size", 64))}
        if self.name == "mamba":
            rank = config.get("time_step_rank", "auto")
            base["mamba"] = {"version": 1, "d_state": get("state_size"), "d_conv": config.get("conv_kernel", 4),
                             "expand": get("expand"), "conv_bias": config.get("use_conv_bias", True),
                             "dt_rank": None if rank == "auto" else rank}
            require(not config.get("use_bias", False), "use_bias", "Braid's Mamba-1 projections have no bias")
        if self.name in ("mamba", "mamba2", "nemotron_h"):
            base["norm_eps"] = float(config.get("layer_norm_epsilon", 1e-5))
        else:
            base["norm_eps"] = float(config.get("rms_norm_eps", 1e-6))
        if self.name in ("mamba", "mamba2"):
            n = get("num_hidden_layers")
            return ModelConfig(**base, pattern="M" * n), ["mamba"] * n
        # attention settings
        heads = get("num_attention_heads")
        attn: dict[str, Any] = {"n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads}
        head_dim = config.get("head_dim") if self.name in ("llama", "mistral", "nemotron_h") else None
        if head_dim and head_dim * heads != base["d_model"]:
            attn["head_dim"] = head_dim
        require(not config.get("attention_bias", False), "attention_bias", "Braid's attention has no bias")
        rope = _rope_base(config, where) if self.name != "nemotron_h" else None
        if self.name == "granitemoehybrid":
            for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
                require(float(config.get(field, 1.0)) == 1.0, field, "Braid scales nothing")
            require(not config.get("num_local_experts"), "num_local_experts", "Braid has no mixture of experts")
            require(math.isclose(float(config.get("attention_multiplier", 1.0)), (base["d_model"] // heads) ** -0.5,
                                 rel_tol=1e-6), "attention_multiplier", "Braid scales attention by head_dim ** -0.5")
            if config.get("position_embedding_type") != "rope":
                rope = None
        if rope is None:
            attn["rope"] = False
        else:
            attn["rope_base"] = rope
        if self.name == "nemotron_h":
            require(config.get("mlp_hidden_act", "relu2") == "relu2", "mlp_hidden_act", "Braid's ungated MLP is relu2")
            require(not config.get("mlp_bias", False), "mlp_bias", "Braid's MLP has no bias")
            base["mlp_activation"] = "relu2"
        else:
            act = "hidden_act"
            require(config.get(act, "silu") == "silu", act, "Braid's gated MLP is SwiGLU (silu)")
            require(not config.get("mlp_bias", False), "mlp_bias", "Braid's MLP has no bias")
        base["mlp_hidden"] = get("shared_intermediate_size" if self.name == "granitemoehybrid" else "intermediate_size")
        kinds = self._layer_kinds(config, where)
        if "swa" in kinds:
            attn["window"] = get("sliding_window")
        base["attn"] = attn
        # the pattern is decided by the weights (all-zero fillers are dropped); this one only validates
        return ModelConfig(**base, pattern=_pattern_of(kinds)), kinds

    def _layer_kinds(self, config: dict[str, Any], where: str) -> list[str]:
        """Braid kind of each HF layer's (mixer) sublayer, from the class's own layer list."""
        if self.name == "nemotron_h":
            names = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                     "attention": "attention", "mlp": "mlp", "M": "mamba", "*": "attention", "-": "mlp"}
            field = "layers_block_type" if config.get("layers_block_type") else "hybrid_override_pattern"
            listed = config.get(field)
        elif self.name == "granitemoehybrid":
            names = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                     "full_attention": "attention"}
            field, listed = "layer_types", config.get("layer_types")
        elif self.name == "qwen2":
            names = {"full_attention": "attention", "sliding_attention": "swa"}
            field, listed = "layer_types", config.get("layer_types")
            if listed is None:
                window_from = config.get("max_window_layers", 28) if config.get("use_sliding_window") else None
                listed = ["sliding_attention" if window_from is not None and i >= window_from else "full_attention"
                          for i in range(int(config["num_hidden_layers"]))]
        else:
            kind = "swa" if self.name == "mistral" and config.get("sliding_window") else "attention"
            return [kind] * int(_getter(config, where)("num_hidden_layers"))
        if not isinstance(listed, (list, str)) or not listed:
            raise ValueError(f"{where}: no {field} (the kind of each layer)")
        for i, name in enumerate(listed):
            if name not in names:
                raise ValueError(f"{where}: {field}[{i}]={name!r} is not a layer kind Braid has "
                                 f"(known: {', '.join(sorted(set(names) - set('M*-')))})")
        kinds = [names[name] for name in listed]
        if self.name == "qwen2" and not (config.get("use_sliding_window") and config.get("sliding_window")):
            kinds = ["attention"] * len(kinds)          # Qwen2 without use_sliding_window attends to everything
        return kinds

    def read(self, config: dict[str, Any], tensors: dict[str, Tensor], where: str) -> tuple[ModelConfig, dict[str, Tensor]]:
        """(ModelConfig, HybridLM state dict) of a folder of this class."""
        cfg, kinds = self.model_config(config, where)
        state: dict[str, Tensor] = {}
        take = _taker(tensors, where)
        if self.paired is None:
            state["embed.weight"] = take("backbone.embeddings.weight")
            state["norm.weight"] = take("backbone.norm_f.weight")
            for name in list(tensors):
                if name.startswith("backbone.layers."):
                    state[name.removeprefix("backbone.")] = take(name)
            pattern = cfg.pattern
        else:
            p = self.paired
            state["embed.weight"] = take("model.embed_tokens.weight")
            state["norm.weight"] = take("model.norm.weight")
            symbols = []
            for j, kind in enumerate(kinds):
                layer = f"model.layers.{j}."
                mixer_prefix = f"{layer}{p.mixer_key(kind)}."
                mixer = {n.removeprefix(mixer_prefix): take(n) for n in list(tensors) if n.startswith(mixer_prefix)}
                for proj in ("q_proj", "k_proj", "v_proj"):
                    bias = mixer.pop(f"{proj}.bias", None)
                    if bias is not None and not _is_zero(bias):
                        raise ValueError(f"{where}: tensor {mixer_prefix}{proj}.bias is not zero "
                                         "(Braid's attention has no bias)")
                mlp_prefix = f"{layer}{p.mlp}."
                mlp = {n.removeprefix(mlp_prefix): take(n) for n in list(tensors) if n.startswith(mlp_prefix)}
                input_norm, post_norm = take(layer + "input_layernorm.weight"), take(layer + "post_attention_layernorm.weight")
                out = mixer.get(_OUT_PROJECTION[kind])
                if out is None:
                    raise ValueError(f"{where}: no tensor {mixer_prefix}{_OUT_PROJECTION[kind]}")
                if not _is_zero(out):
                    i = len(symbols)
                    symbols.append(KIND_SYMBOL[kind])
                    state[f"layers.{i}.norm.weight"] = input_norm
                    state.update({f"layers.{i}.mixer.{n}": t for n, t in mixer.items()})
                if p.mlp_out() not in mlp:
                    raise ValueError(f"{where}: no tensor {mlp_prefix}{p.mlp_out()}")
                if not _is_zero(mlp[p.mlp_out()]):
                    i = len(symbols)
                    symbols.append("-")
                    state[f"layers.{i}.norm.weight"] = post_norm
                    state.update({f"layers.{i}.mixer.{n}": t for n, t in p.mlp_from(mlp).items()})
            if not symbols:
                raise ValueError(f"{where}: every layer is all zero: no model to read")
            pattern = "".join(symbols)
        # transformers ties the head when the config says so (NemotronH never does), ignoring a stored copy
        tie = cfg.tie_embeddings and self.name != "nemotron_h"
        head = take("lm_head.weight") if "lm_head.weight" in tensors else None
        if tensors:
            raise ValueError(f"{where}: tensor {sorted(tensors)[0]} is not part of a {self.architecture} "
                             "that Braid can read")
        if not tie and head is None:
            raise ValueError(f"{where}: no tensor lm_head.weight and the head is not tied to the embedding")
        state["lm_head.weight"] = state["embed.weight"] if tie else head
        try:
            cfg = cfg.replace(pattern=pattern, tie_embeddings=tie)
        except ConfigError as err:
            raise ValueError(f"{where}: {err}") from None
        if isinstance(config.get("braid"), dict):
            cfg = self._braid_section_if_same(cfg, config, state)
        return cfg, state

    def _braid_section_if_same(self, derived: ModelConfig, config: dict[str, Any],
                               state: dict[str, Tensor]) -> ModelConfig:
        """The folder's `braid` section (initialisation, stage marks) when it describes the model the
        class's own fields and the weights describe, else `derived`."""
        try:
            stored = ModelConfig.from_dict(config["braid"]).replace(kernels="auto")
        except (ConfigError, TypeError):
            return derived
        fields = {k: v for k, v in self.config(stored).items() if k not in ("architectures", "model_type")}
        same = stored.pattern.replace("|", "") == derived.pattern and all(config.get(k) == v for k, v in fields.items())
        # a tied model exported as NemotronH carries its own copy of the embedding as the head
        tie_ok = stored.tie_embeddings == derived.tie_embeddings or (
            stored.tie_embeddings and torch.equal(state["lm_head.weight"], state["embed.weight"]))
        if not (same and tie_ok):
            return derived
        if stored.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        return stored


def _float(value: Any) -> float:
    """A float of config.json; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _getter(config: dict[str, Any], where: str) -> Callable[[str], Any]:
    def get(field: str) -> Any:
        if config.get(field) is None:
            raise ValueError(f"{where}: no {field!r}")
        return config[field]
    return get


def _taker(tensors: dict[str, Tensor], where: str) -> Callable[[str], Tensor]:
    """Pops a tensor by name (what is left over at the end is unexpected)."""
    def take(name: str) -> Tensor:
        if name not in tensors:
            raise ValueError(f"{where}: no tensor {name}")
        return tensors.pop(name)
    return take


def _rope_base(config: dict[str, Any], where: str) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where}: rope_type={kind!r}: Braid's RoPE is the default (unscaled) one")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']}: Braid rotates the whole head")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _pattern_of(kinds: list[str]) -> str:
    return "".join(KIND_SYMBOL[k] for k in kinds)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mamba", "MambaForCausalLM", "mamba"),
    Family("mamba2", "Mamba2ForCausalLM", "mamba2"),
    Family("llama", "LlamaForCausalLM", "llama", paired=Paired()),
    Family("mistral", "MistralForCausalLM", "mistral", paired=Paired()),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", paired=Paired(qkv_bias=True)),
    Family("nemotron_h", "NemotronHForCausalLM", "nemotron_h"),         # in transformers from 5.0
    Family("granitemoehybrid", "GraniteMoeHybridForCausalLM", "granitemoehybrid",
           paired=Paired(mlp="shared_mlp", fused_mlp=True)),
)}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def native_family(cfg: ModelConfig, name: str = "native") -> Family:
    """The native class for `cfg`: the first that represents it exactly, or the one named; a ValueError
    naming the sublayer or option in the way otherwise."""
    if name != "native":
        if name not in FAMILIES:
            raise ValueError(f"--format={name!r}: expected braid, native or one of {', '.join(FAMILIES)}")
        reason = _blocker(cfg, name)
        if reason:
            raise ValueError(f"--format {name}: {reason}; pattern {cfg.pattern!r} (use --format native to pick "
                             "a class, or --format braid for the remote-code export)")
        return FAMILIES[name]
    for family in FAMILIES.values():
        if _blocker(cfg, family.name) is None:
            return family
    reason = _closest_blocker(cfg)
    raise ValueError(f"--format native: no transformers class represents pattern {cfg.pattern!r} exactly: {reason}; "
                     "export with --format braid (remote code, loads with trust_remote_code=True)")


def _closest_blocker(cfg: ModelConfig) -> str:
    """The reason of the class nearest to the pattern, so the message names what stands in the way."""
    symbols = _symbols(cfg)
    hybrid_first = ["nemotron_h", "granitemoehybrid"] if cfg.mlp_activation == "relu2" or not cfg.attn.rope else \
        ["granitemoehybrid", "nemotron_h"]
    if "M" in symbols and (cfg.mamba.version == 1 or symbols == {"M"}):
        order = ["mamba" if symbols == {"M"} else "nemotron_h"]
    elif "M" in symbols:
        order = hybrid_first
    elif "S" in symbols or (cfg.attn.rope and cfg.mlp_activation == "swiglu"):
        order = ["qwen2"]
    else:
        order = hybrid_first
    return _blocker(cfg, order[0]) or "no class fits"


def serving_notes(family: Family, cfg: ModelConfig) -> list[str]:
    """Where a server runs this folder differently from transformers (read in their sources)."""
    notes = []
    if family.name == "granitemoehybrid" and cfg.attn.rope and "mamba" in cfg.layer_types:
        notes.append("llama.cpp: its converter writes GraniteMoeHybrid models with Mamba layers without RoPE "
                     "(as Granite 4.0-H, which has none); for llama.cpp train with model.attn.rope=false")
    if family.name in ("mistral", "qwen2") and "swa" in cfg.layer_types:
        notes.append(f"llama.cpp: {family.architecture} runs without the sliding window there, exact while the "
                     f"context fits in model.attn.window={cfg.attn.window}")
    return notes


def read_native(config: dict[str, Any], tensors: dict[str, Tensor], where: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A native folder's (ModelConfig, HybridLM state dict)."""
    family = BY_MODEL_TYPE[config["model_type"]]
    return family.read(dict(config), dict(tensors), where)
