"""Batched generation with the hybrid cache: one parallel prefill, then one token per step.

Prompts of different lengths are left-padded and the padding is marked as its own
document, so recurrent states restart at each prompt and attention never sees the pad.
Memory stays constant in the generated length for every pattern without `*`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .hybrid import HybridLM


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,): argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p      # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: HybridLM, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Iterable[int] = (), pad_token_id: int = 0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens`; a row ends after emitting a stop token.

    Returns the new tokens of each prompt (a final stop token included, the prompt not).
    """
    rows = prompts.tolist() if isinstance(prompts, Tensor) else [list(map(int, p)) for p in prompts]
    vocab = model.cfg.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if min(row) < 0 or max(row) >= vocab:
            raise ValueError(f"prompts[{i}] has a token id outside [0, {vocab})")
    if max_new_tokens <= 0:
        return [[] for _ in rows]
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    doc_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        doc_ids[i, width - len(row):] = 1
    padded = any(len(r) < width for r in rows)
    cache = model.new_cache()
    logits = model(ids.to(device), doc_ids=doc_ids.to(device) if padded else None, cache=cache,
                   logits_to_keep=1)[:, -1]

    stops = set(int(t) for t in stop_tokens)
    outputs: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        for i, token in enumerate(next_ids.tolist()):
            if not done[i]:
                outputs[i].append(token)
                done[i] = token in stops
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(next_ids.unsqueeze(1), cache=cache)[:, -1]
    return outputs
