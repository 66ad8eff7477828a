"""The hybrid language model: embedding -> pattern of pre-norm residual sublayers -> norm -> tied head.

    x = embed(tokens)
    for each symbol in the pattern:  x = x + mixer(RMSNorm(x))
    logits = RMSNorm(x) @ embed.weight^T

Forward takes optional `doc_ids` (B, L) marking the documents of packed rows (or the
padding of a left-padded batch): no document sees another, in any sublayer. With a
`HybridCache` the same forward prefills it (parallel form) or steps it (one token).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import HybridCache
from .config import ModelConfig
from .kernels import dispatch_record
from .layers import LinearSpec, RMSNorm, build_mixer
from .sequence import sequence_info


class Sublayer(nn.Module):
    """Pre-norm residual: x + mixer(norm(x))."""

    def __init__(self, kind: str, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg, spec)

    def forward(self, x: Tensor, seq, cache=None) -> Tensor:
        return x + self.mixer(self.norm(x), seq, cache)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LinearSpec | None = None):
        super().__init__()
        self.cfg = cfg
        spec = spec or LinearSpec()
        self.embed = spec.embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Sublayer(kind, cfg, spec) for kind in cfg.layer_types)
        for i, layer in enumerate(self.layers):
            layer.mixer.block_name = f"layers.{i} ({layer.kind})"     # what dispatch records and errors name
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = spec.lm_head(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Sublayer kinds (pattern symbols) recomputed in backward instead of keeping their activations.
        self.checkpointed_kinds: set[str] = set()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every weight by the config's scheme (`model.init`), then each mixer's own parameters.

        normal: N(0, init_std) for every Linear and the embedding, output projections (each mixer's
          `output_projections`: o_proj, out_proj, down_proj, linear_out) N(0, init_std / sqrt(#sublayers)),
          biases zero; convolutions keep PyTorch's default.
        samba:  as microsoft/Samba trains (lit_gpt/model.py `_init_weights` with `mamba_init`): Linear
          weights keep PyTorch's default kaiming-uniform (a=sqrt(5): std 1/sqrt(3 fan_in)), biases zero;
          output projections the same divided by sqrt(#sublayers) (Samba's sqrt(n_residuals_per_layer *
          n_layer)); embedding N(0, init_std) (Samba ties the head; an untied one is a Linear like the
          others); convolutions PyTorch's default (uniform +-1/sqrt(d_conv)). At samba-421m:
          q/k/v, in_proj, gate/up 0.0147, o_proj 0.0030, Mamba out_proj 0.0021, down_proj 0.0018.
        Both: then each mixer's reset_special_parameters (Mamba's A_log = log(1..d_state), D = 1, dt_proj
        uniform +-dt_rank^-0.5 with its bias the inverse softplus of a log-uniform dt; RG-LRU's gates and
        Lambda; Mamba-2's A, D, dt bias), as Samba's Mamba module draws them. RMSNorm weights stay 1.
        """
        std = self.cfg.init_std
        depth_scale = 1.0 / math.sqrt(self.cfg.n_sublayers)
        samba = self.cfg.init == "samba"
        tied_head = self.lm_head if self.cfg.tie_embeddings else None
        for module in self.modules():
            if samba and isinstance(module, nn.Linear) and module is not tied_head:
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            elif samba and isinstance(module, nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            for name in layer.mixer.output_projections:
                weight = getattr(layer.mixer, name).weight
                if samba:
                    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                    weight.mul_(depth_scale)
                else:
                    nn.init.normal_(weight, std=std * depth_scale)
            if hasattr(layer.mixer, "reset_special_parameters"):
                layer.mixer.reset_special_parameters()

    def new_cache(self) -> HybridCache:
        return HybridCache(layers=[layer.mixer.empty_cache() for layer in self.layers])

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None, cache: HybridCache | None = None,
                logits_to_keep: int = 0) -> Tensor:
        """input_ids (B, L) -> logits (B, L, vocab) in float32 (tensor parallel: this rank's vocabulary slice).

        logits_to_keep > 0: only the last that many positions get logits (a prefill needs one).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, length), got {tuple(input_ids.shape)}")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache: has {len(cache.layers)} layer entries, the model has {len(self.layers)} sublayers")
        seq = sequence_info(tuple(input_ids.shape), input_ids.device, doc_ids,
                            cache.offset if cache is not None else None)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if layer.kind in self.checkpointed_kinds and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, seq, use_reentrant=False)
            else:
                x = layer(x, seq, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.offset = seq.positions[:, -1] + 1
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x)).float()

    def dispatch_record(self) -> dict[str, dict[str, str]]:
        """{block: {op: kernel or "reference"}}: the path each sublayer's ops took in the last forward."""
        return dispatch_record(self)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total
