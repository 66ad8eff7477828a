"""Hugging Face causal-LM wrapper of a Braid hybrid model (remote code, shipped in every exported folder).

`BraidForCausalLM.model` is Braid's own `HybridLM` (flattened beside this file as `braid_*.py`),
so an exported folder computes exactly what training computed. Generation carries Braid's
`HybridCache`: recurrent layers keep a fixed-size state and window layers a ring buffer, so
memory does not grow with the generated length (only `*` layers grow).

One file for transformers 4.57 and 5.x. What differs between them, and how it is met here:
- the cache argument is `past_key_values` in 4.x and `cache` in 5.24+ (old name deprecated):
  forward and prepare_inputs_for_generation take both, and the output names it as the running
  version's CausalLMOutputWithPast does;
- 5.x builds its own DynamicCache unless the model declines (`_supports_default_dynamic_cache`);
- 5.x ties weights from a `{target: source}` map (4.x iterates the same dict's keys);
- 5.x pops generation settings out of configs, so `config.use_cache` may be missing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .braid_cache import HybridCache
from .braid_hybrid import HybridLM
from .configuration_braid import BraidConfig

# the output field that holds the cache: `cache` from transformers 5.24, `past_key_values` before
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class BraidPreTrainedModel(PreTrainedModel):
    config_class = BraidConfig
    base_model_prefix = "model"
    _no_split_modules = ["Sublayer"]
    # recurrent state cannot be cropped or rolled back: transformers then leaves the cache to this model
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: the model makes its own HybridCache on the first forward (transformers 5.5+ would
        otherwise hand it a DynamicCache of attention layers)."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: HybridLM initialises itself when built, and a loaded folder brings every weight."""


class BraidForCausalLM(BraidPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: BraidConfig):
        super().__init__(config)
        self.model = HybridLM(config.model_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.lm_head = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: HybridCache | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                return_dict: bool | None = None, past_key_values: HybridCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """attention_mask: 0 marks padding (left or right); padded tokens are a separate document,
        so no real token sees them. It is read when the cache is empty; a filled cache already
        knows where each row's text starts. `cache` and `past_key_values` are the same argument."""
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None and not self.training:
            cache = self.model.new_cache()
        prefill = cache is None or cache.offset is None
        doc_ids = None
        if attention_mask is not None and prefill and not bool(attention_mask.all()):
            doc_ids = attention_mask[:, -input_ids.shape[1]:].long()
        logits = self.model(input_ids, doc_ids=doc_ids, cache=cache, logits_to_keep=logits_to_keep or 0)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: HybridCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      past_key_values: HybridCache | None = None, **kwargs: Any) -> dict[str, Any]:
        """Prefill with the whole prompt, then feed only the newest token to the cache."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.offset is not None:
            input_ids = input_ids[:, -1:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, cache: HybridCache, beam_idx: Tensor) -> HybridCache:
        """Beam search: every row-indexed tensor of the cache follows its beam."""
        return cache.select_rows(beam_idx)
