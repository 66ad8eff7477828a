"""Hugging Face causal-LM wrapper of a Braid hybrid model (remote code, shipped in every exported folder).

`BraidForCausalLM.model` is Braid's own `HybridLM` (flattened beside this file as `braid_*.py`),
so an exported folder computes exactly what training computed. Generation carries Braid's
`HybridCache` as `past_key_values`: recurrent layers keep a fixed-size state and window
layers a ring buffer, so memory does not grow with the generated length (only `*` layers grow).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .braid_cache import HybridCache
from .braid_hybrid import HybridLM
from .configuration_braid import BraidConfig


class BraidPreTrainedModel(PreTrainedModel):
    config_class = BraidConfig
    base_model_prefix = "model"
    _no_split_modules = ["Sublayer"]
    # recurrent state cannot be cropped or rolled back: transformers then leaves the cache to this model
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: HybridLM initialises itself when built, and a loaded folder brings every weight."""


class BraidForCausalLM(BraidPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["model.lm_head.weight"]

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

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values: HybridCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """attention_mask: 0 marks padding (left or right); padded tokens are a separate document,
        so no real token sees them. It is read when the cache is empty; a filled cache already
        knows where each row's text starts."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = self.model.new_cache()
        prefill = past_key_values is None or past_key_values.offset is None
        doc_ids = None
        if attention_mask is not None and prefill and not bool(attention_mask.all()):
            doc_ids = attention_mask[:, -input_ids.shape[1]:].long()
        logits = self.model(input_ids, doc_ids=doc_ids, cache=past_key_values, logits_to_keep=logits_to_keep or 0)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, past_key_values) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: HybridCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict[str, Any]:
        """Prefill with the whole prompt, then feed only the newest token to the cache."""
        if past_key_values is not None and past_key_values.offset is not None:
            input_ids = input_ids[:, -1:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": use_cache}
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values: HybridCache, beam_idx: Tensor) -> HybridCache:
        """Beam search: every row-indexed tensor of the cache follows its beam."""
        return past_key_values.select_rows(beam_idx)
