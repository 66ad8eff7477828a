"""Model configuration: dataclasses, the layer pattern, validation and named presets.

A model is a string of sublayer symbols (see `SUBLAYERS`), one pre-norm residual
sublayer each. `ModelConfig.from_dict` reads the `model:` section of a YAML config
(a `preset` plus overrides); every rule is checked at construction and a broken one
raises `ConfigError` with one line that names the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# symbol -> sublayer kind (Megatron-core's hybrid syntax where it overlaps)
SUBLAYERS = {
    "M": "mamba",
    "G": "gla",
    "S": "swa",
    "*": "attention",
    "R": "rglru",
    "-": "mlp",
}
STAGE_BOUNDARY = "|"
KERNEL_MODES = ("auto", "reference", "cuda")
INIT_SCHEMES = ("normal", "samba")
MLP_ACTIVATIONS = ("swiglu", "relu2")


class ConfigError(ValueError):
    """A model/run configuration that breaks a rule; the message names the field."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_pattern(pattern: str) -> list[str]:
    """Pattern string -> list of sublayer kinds (stage boundaries dropped).

    >>> parse_pattern("M-S-")
    ['mamba', 'mlp', 'swa', 'mlp']
    """
    _require(isinstance(pattern, str) and len(pattern.replace(STAGE_BOUNDARY, "")) > 0,
             f"model.pattern={pattern!r}: needs at least one sublayer symbol ({' '.join(SUBLAYERS)})")
    for i, symbol in enumerate(pattern):
        _require(symbol in SUBLAYERS or symbol == STAGE_BOUNDARY,
                 f"model.pattern={pattern!r}: unknown symbol {symbol!r} at position {i} "
                 f"(allowed: {' '.join(SUBLAYERS)} and '|' for a pipeline-stage boundary)")
    stages = pattern.split(STAGE_BOUNDARY)
    _require(all(stages), f"model.pattern={pattern!r}: '|' must separate non-empty stages "
                          "(no leading, trailing or doubled '|')")
    return [SUBLAYERS[s] for s in pattern if s != STAGE_BOUNDARY]


def pattern_stages(pattern: str) -> list[list[int]]:
    """Sublayer indices of each pipeline stage marked by '|' (one stage if none)."""
    parse_pattern(pattern)
    stages, index = [], 0
    for stage in pattern.split(STAGE_BOUNDARY):
        stages.append(list(range(index, index + len(stage))))
        index += len(stage)
    return stages


@dataclass
class MambaConfig:
    version: int = 1            # 1: selective scan (Samba); 2: SSD with heads and groups
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # Mamba-1 only; None -> ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    head_dim: int = 64          # Mamba-2 only
    n_groups: int = 1           # Mamba-2 only: B and C shared by n_heads / n_groups heads
    chunk_size: int = 64        # Mamba-2's SSD chunk (Mamba-1's fused scan sizes its chunks to the cache)
    # Mamba-1 on packed training rows (no cache): `exact` restarts conv and state at every document
    # (Braid's Triton selective scan on GPU); `flow` lets them run on across the documents of a row, as
    # Samba trains, so mamba-ssm's CUDA selective_scan_fn (which has no reset input) runs. Generation
    # (a cache) always restarts at document starts, so left padding never leaks into a prompt.
    packed_resets: str = "exact"


@dataclass
class AttentionConfig:
    n_heads: int = 4
    n_kv_heads: int | None = None   # None -> n_heads (MHA); fewer -> grouped-query attention
    head_dim: int | None = None     # None -> d_model // n_heads
    window: int = 2048              # sliding window of `S`, in tokens, the query included
    rope: bool = True               # rotary positions on q and k; false: none at all (Nemotron-H's attention)
    rope_base: float = 10000.0


@dataclass
class GLAConfig:
    n_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64


@dataclass
class RGLRUConfig:
    width: int | None = None    # None -> d_model
    n_heads: int = 4            # block-diagonal gate blocks
    d_conv: int = 4
    c: float = 8.0              # log a_t = -c * r_t * softplus(Lambda)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 1536
    pattern: str = "M-S-" * 6
    mlp_hidden: int = 4096
    mlp_activation: str = "swiglu"    # `-`: swiglu (gated SiLU) | relu2 (non-gated squared ReLU, Nemotron-H's)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    init: str = "normal"              # normal | samba (HybridLM.reset_parameters says what each draws)
    max_seq_len: int = 4096           # training length (informational; nothing is sized by it)
    kernels: str = "auto"             # auto | reference | cuda
    mamba: MambaConfig = field(default_factory=MambaConfig)
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    gla: GLAConfig = field(default_factory=GLAConfig)
    rglru: RGLRUConfig = field(default_factory=RGLRUConfig)

    def __post_init__(self) -> None:
        for name, cls in (("mamba", MambaConfig), ("attn", AttentionConfig),
                          ("gla", GLAConfig), ("rglru", RGLRUConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _from_dict(cls, getattr(self, name), f"model.{name}"))
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        return parse_pattern(self.pattern)

    @property
    def n_sublayers(self) -> int:
        return len(self.layer_types)

    @property
    def dt_rank(self) -> int:
        return self.mamba.dt_rank or math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model

    @property
    def mamba2_heads(self) -> int:
        return self.d_inner // self.mamba.head_dim

    @property
    def head_dim(self) -> int:
        return self.attn.head_dim or self.d_model // self.attn.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.attn.n_kv_heads or self.attn.n_heads

    @property
    def rglru_width(self) -> int:
        return self.rglru.width or self.d_model

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        kinds = set(parse_pattern(self.pattern))
        for name in ("vocab_size", "d_model", "mlp_hidden", "max_seq_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"model.{name}={value!r}: must be a positive integer")
        _require(self.norm_eps > 0, f"model.norm_eps={self.norm_eps}: must be > 0")
        _require(self.init_std > 0, f"model.init_std={self.init_std}: must be > 0")
        _require(self.init in INIT_SCHEMES, f"model.init={self.init!r}: must be one of {', '.join(INIT_SCHEMES)}")
        _require(self.kernels in KERNEL_MODES, f"model.kernels={self.kernels!r}: must be one of {', '.join(KERNEL_MODES)}")
        _require(self.mlp_activation in MLP_ACTIVATIONS,
                 f"model.mlp_activation={self.mlp_activation!r}: must be one of {', '.join(MLP_ACTIVATIONS)}")
        if kinds & {"swa", "attention"}:
            a = self.attn
            _require(a.n_heads > 0, f"model.attn.n_heads={a.n_heads}: must be > 0")
            _require(a.head_dim is not None or self.d_model % a.n_heads == 0,
                     f"model.attn.n_heads={a.n_heads} does not divide model.d_model={self.d_model} "
                     "(set model.attn.head_dim to decouple them)")
            _require(not a.rope or self.head_dim % 2 == 0,
                     f"model.attn.head_dim={self.head_dim}: must be even for RoPE (or model.attn.rope=false)")
            _require(self.n_kv_heads > 0 and a.n_heads % self.n_kv_heads == 0,
                     f"model.attn.n_kv_heads={self.n_kv_heads} must divide model.attn.n_heads={a.n_heads}")
            _require(a.rope_base > 0, f"model.attn.rope_base={a.rope_base}: must be > 0")
        if "swa" in kinds:
            _require(isinstance(self.attn.window, int) and self.attn.window > 0,
                     f"model.attn.window={self.attn.window!r}: must be a positive integer")
        if "mamba" in kinds:
            m = self.mamba
            _require(m.version in (1, 2), f"model.mamba.version={m.version!r}: must be 1 or 2")
            for name in ("d_state", "d_conv", "expand", "chunk_size"):
                _require(getattr(m, name) > 0, f"model.mamba.{name}={getattr(m, name)}: must be > 0")
            _require(0 < m.dt_min <= m.dt_max, f"model.mamba.dt_min={m.dt_min}, dt_max={m.dt_max}: need 0 < dt_min <= dt_max")
            _require(m.packed_resets in ("exact", "flow"),
                     f"model.mamba.packed_resets={m.packed_resets!r}: must be exact or flow")
            if m.version == 2:
                _require(self.d_inner % m.head_dim == 0,
                         f"model.mamba.head_dim={m.head_dim} does not divide d_inner={self.d_inner} (expand * d_model)")
                _require(m.n_groups > 0 and self.mamba2_heads % m.n_groups == 0,
                         f"model.mamba.n_groups={m.n_groups} must divide the {self.mamba2_heads} Mamba-2 heads")
        if "gla" in kinds:
            g = self.gla
            _require(g.n_heads > 0, f"model.gla.n_heads={g.n_heads}: must be > 0")
            for name in ("expand_k", "expand_v"):
                width = getattr(g, name) * self.d_model
                _require(width == int(width) and int(width) % g.n_heads == 0,
                         f"model.gla.{name}={getattr(g, name)}: {name} * d_model={width} must be a whole number "
                         f"divisible by model.gla.n_heads={g.n_heads}")
            _require(g.gate_low_rank_dim > 0, f"model.gla.gate_low_rank_dim={g.gate_low_rank_dim}: must be > 0")
        if "rglru" in kinds:
            r = self.rglru
            _require(r.n_heads > 0 and self.rglru_width % r.n_heads == 0,
                     f"model.rglru.n_heads={r.n_heads} does not divide the RG-LRU width {self.rglru_width}")
            _require(r.d_conv > 0, f"model.rglru.d_conv={r.d_conv}: must be > 0")

    # ---- (de)serialisation ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a `model:` section: an optional `preset` name plus field overrides."""
        data = dict(data)
        preset = data.pop("preset", None)
        return _from_dict(cls, _merged(get_preset(preset).to_dict() if preset else {}, data), "model")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed; nested sections take dicts of their fields."""
        return _from_dict(ModelConfig, _merged(self.to_dict(), changes), "model")


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied; a nested section is updated field by field, not replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**data)


# ---- presets -------------------------------------------------------------

def _samba(n_pairs: int, d_model: int, n_heads: int, mlp_hidden: int) -> ModelConfig:
    # microsoft/Samba: Mamba-1 (d_state 16, expand 2), SWA 2048 with 128-dim heads, SwiGLU, tied,
    # initialised as Samba trains (its `mamba_init`).
    # packed_resets=flow: Samba trains on packed rows with mamba_simple's causal_conv1d_fn and
    # selective_scan_fn, whose state runs on across documents (SWA is still masked per document);
    # so its recipe is reproduced and mamba-ssm's CUDA scan runs. `exact` is one override away.
    return ModelConfig(
        vocab_size=32000, d_model=d_model, pattern="M-S-" * n_pairs, mlp_hidden=mlp_hidden, init="samba",
        max_seq_len=4096, mamba=MambaConfig(version=1, d_state=16, d_conv=4, expand=2, packed_resets="flow"),
        attn=AttentionConfig(n_heads=n_heads, window=2048),
    )


PRESETS: dict[str, Any] = {
    # CPU-sized, every sublayer type; trains at seconds per step on 2 cores.
    "tiny": lambda: ModelConfig(
        vocab_size=4096, d_model=128, pattern="M-G-S-R-*-", mlp_hidden=384, max_seq_len=256,
        mamba=MambaConfig(version=1, d_state=16, d_conv=4, expand=2),
        attn=AttentionConfig(n_heads=4, n_kv_heads=2, window=64),
        gla=GLAConfig(n_heads=2, chunk_size=32),
        rglru=RGLRUConfig(n_heads=4),
    ),
    "samba-421m": lambda: _samba(6, 1536, 12, 4096),
    "samba-1.3b": lambda: _samba(9, 2304, 18, 6144),
    # Griffin: two RG-LRU blocks per local-attention block, MQA, MLP expansion 3.
    "griffin": lambda: ModelConfig(
        vocab_size=32000, d_model=1024, pattern="R-R-S-" * 4, mlp_hidden=3072, max_seq_len=4096,
        attn=AttentionConfig(n_heads=8, n_kv_heads=1, window=2048),
        rglru=RGLRUConfig(n_heads=8),
    ),
    # Nemotron-H-like: mostly Mamba-2, a full-attention and an MLP sublayer every sixth.
    "mamba2-hybrid": lambda: ModelConfig(
        vocab_size=32000, d_model=1024, pattern="MMMMM*-" * 4, mlp_hidden=4096, max_seq_len=4096,
        mamba=MambaConfig(version=2, d_state=128, d_conv=4, expand=2, head_dim=64, n_groups=8),
        attn=AttentionConfig(n_heads=16, n_kv_heads=8),
    ),
    # Nemotron-H's block choices (NVIDIA Nemotron-H 8B, scaled down): one mixer per residual block,
    # Mamba-2, attention without RoPE, a non-gated squared-ReLU MLP, an untied head. Exports as
    # transformers' NemotronHForCausalLM (`braid convert to-hf --format native`).
    "nemotron-h": lambda: ModelConfig(
        vocab_size=32000, d_model=1024, pattern="M-M-M*-" * 4, mlp_hidden=4096, mlp_activation="relu2",
        tie_embeddings=False, max_seq_len=4096,
        mamba=MambaConfig(version=2, d_state=128, d_conv=4, expand=2, head_dim=64, n_groups=8),
        attn=AttentionConfig(n_heads=16, n_kv_heads=8, rope=False),
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r}: unknown preset (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def transformer_twin(cfg: ModelConfig) -> ModelConfig:
    """The Llama-style Transformer of the same width and depth, to measure a hybrid against.

    Every mixer sublayer (M, G, S, R, *) becomes full causal attention `*` with the
    config's attention heads, kv heads and rotary base; MLP sublayers `-` and stage
    marks `|` stay where they are, as do d_model, mlp_hidden and the vocabulary.
    Width is deliberately not changed to match parameters: the twin is smaller than a
    Samba hybrid because a Mamba-1 mixer (in_proj d x 4d, out_proj 2d x d, x/dt
    projections) holds more weights than attention (about 4 d^2). samba-421m: 421.8M
    parameters, twin 388.9M (-7.8%; -8.8% without the embedding); samba-1.3b: 1330.2M,
    twin 1220.4M (-8.3%; -8.7% without the embedding). Throughput ratios should be read
    with MFU beside them, which counts each model's own FLOPs.
    """
    pattern = "".join(s if s in ("-", STAGE_BOUNDARY) else "*" for s in cfg.pattern)
    return cfg.replace(pattern=pattern)
