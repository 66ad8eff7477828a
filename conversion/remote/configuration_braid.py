"""Hugging Face configuration of a Braid hybrid model (remote code, shipped in every exported folder).

The whole Braid `ModelConfig` travels under `braid`; the usual Hugging Face names
(`hidden_size`, `num_hidden_layers`, `layer_types`, ...) are derived from it for tools that read them.
In an exported folder this file sits beside the flattened model sources (`braid_*.py`).
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class BraidConfig(PretrainedConfig):
    model_type = "braid"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, braid: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                 tie_word_embeddings: bool | None = None, **kwargs: Any):
        self.braid = dict(braid or {})
        self.training = dict(training or {})      # step, tokens seen, sequence length of the checkpoint
        if self.braid:
            cfg = self.model_config()
            self.vocab_size = cfg.vocab_size
            self.hidden_size = cfg.d_model
            self.num_hidden_layers = cfg.n_sublayers
            self.layer_types = cfg.layer_types
            self.pattern = cfg.pattern
            self.intermediate_size = cfg.mlp_hidden
            self.rms_norm_eps = cfg.norm_eps
            self.sliding_window = cfg.attn.window if "swa" in cfg.layer_types else None
            self.num_attention_heads = cfg.attn.n_heads
            tie_word_embeddings = cfg.tie_embeddings
        # Hugging Face's own fields: derived above, so the copies it writes back are ignored on load
        for derived in ("vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "pattern",
                        "intermediate_size", "rms_norm_eps", "sliding_window", "num_attention_heads"):
            kwargs.pop(derived, None)
        super().__init__(tie_word_embeddings=bool(tie_word_embeddings), **kwargs)

    def model_config(self):
        """The Braid ModelConfig this folder was exported from."""
        from .braid_config import ModelConfig
        return ModelConfig.from_dict(self.braid)
