"""Where each token of a forward pass sits: its position in its document, and document starts.

Packed rows (several documents in one row) and left-padded batches are both described
by `doc_ids` (B, L): a new document starts wherever the id changes. Every block reads
the same `SequenceInfo`, built once per forward, so they agree on what a boundary is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SequenceInfo:
    positions: Tensor            # (B, L) long: index of the token within its document
    reset: Tensor | None         # (B, L) bool: True where a document starts in this chunk; None: no boundaries
    segments: Tensor | None      # (B, L) long: 0 for the document continuing from the cache, +1 per new start

    @property
    def packed(self) -> bool:
        return self.reset is not None


def sequence_info(shape: tuple[int, int], device: torch.device, doc_ids: Tensor | None = None,
                  offset: Tensor | None = None) -> SequenceInfo:
    """Positions and document starts for a (B, L) chunk.

    offset (B,): tokens of the current document already in the cache (0 with no cache);
    the chunk's first document continues it unless doc_ids mark more documents.
    """
    batch, length = shape
    steps = torch.arange(length, device=device).expand(batch, length)
    start = offset.to(device).view(batch, 1) if offset is not None else torch.zeros(batch, 1, dtype=torch.long, device=device)
    if doc_ids is None:
        return SequenceInfo(positions=steps + start, reset=None, segments=None)
    if doc_ids.shape != (batch, length):
        raise ValueError(f"doc_ids: expected shape {(batch, length)} like input_ids, got {tuple(doc_ids.shape)}")
    doc_ids = doc_ids.to(device)
    reset = torch.zeros(batch, length, dtype=torch.bool, device=device)
    reset[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    segments = reset.long().cumsum(1)
    # position = steps since the last document start (or continue the cached document)
    last_start = torch.where(reset, steps, torch.full_like(steps, -1)).cummax(1).values
    positions = torch.where(last_start >= 0, steps - last_start, steps + start)
    reset = reset | (positions == 0)
    return SequenceInfo(positions=positions, reset=reset, segments=segments)
