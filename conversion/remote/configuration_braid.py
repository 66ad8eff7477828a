"""Hugging Face configuration of a Braid hybrid model (remote code, shipped in every exported folder).

The whole Braid `ModelConfig` travels under `braid`; the usual Hugging Face names
(`hidden_size`, `num_hidden_layers`, ...) are derived from it for tools that read them.
Braid's sublayer kinds are written as `sublayer_kinds`, never as `layer_types`: transformers 5
checks `layer_types` against its own vocabulary (full_attention, linear_attention, ...), for this
config and for the generic one AutoTokenizer reads. In an exported folder this file sits beside
the flattened model sources (`braid_*.py`). Runs on transformers 4.57 and 5.x.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# derived from `braid` on every load, so the copies Hugging Face writes back are ignored
DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "sublayer_kinds", "pattern", "intermediate_size",
           "rms_norm_eps", "sliding_window", "num_attention_heads", "num_key_value_heads", "layer_types")


class BraidConfig(PretrainedConfig):
    model_type = "braid"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, braid: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                 tie_word_embeddings: bool | None = None, **kwargs: Any):
        for derived in DERIVED:
            kwargs.pop(derived, None)
        self.braid = dict(braid or {})
        self.training = dict(training or {})      # step, tokens seen, sequence length of the checkpoint
        if self.braid:
            cfg = self.model_config()
            self.vocab_size = cfg.vocab_size
            self.hidden_size = cfg.d_model
            self.num_hidden_layers = cfg.n_sublayers
            self.sublayer_kinds = cfg.layer_types
            self.pattern = cfg.pattern
            self.intermediate_size = cfg.mlp_hidden
            self.rms_norm_eps = cfg.norm_eps
            self.sliding_window = cfg.attn.window if "swa" in cfg.layer_types else None
            self.num_attention_heads = cfg.attn.n_heads
            self.num_key_value_heads = cfg.n_kv_heads
            tie_word_embeddings = cfg.tie_embeddings
        super().__init__(tie_word_embeddings=bool(tie_word_embeddings), **kwargs)

    def model_config(self):
        """The Braid ModelConfig this folder was exported from."""
        from .braid_config import ModelConfig
        return ModelConfig.from_dict(self.braid)
