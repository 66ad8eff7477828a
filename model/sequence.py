"""Where each token of a forward pass sits: its position in its document, and document starts.

Packed rows (several documents in one row) and left-padded batches are both described
by `doc_ids` (B, L): a new document starts wherever the id changes. Every block reads
the same `SequenceInfo`, built once per forward, so they agree on what a boundary is.

The varlen contract of the kernels is derived from it once per forward, on first use:
`seq_idx` (B, L) int32, the document index within each row (mamba-ssm, causal-conv1d), and
`cu_seqlens` (N+1,) int32, the document offsets of the rows flattened into one (fla, flash-attn:
a row start always starts a document).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SequenceInfo:
    positions: Tensor            # (B, L) long: index of the token within its document
    reset: Tensor | None         # (B, L) bool: True where a document starts in this chunk; None: no boundaries
    segments: Tensor | None      # (B, L) long: 0 for the document continuing from the cache, +1 per new start
    derived: dict = field(default_factory=dict, repr=False, compare=False)   # varlen forms, built on first use

    @property
    def packed(self) -> bool:
        return self.reset is not None

    @property
    def seq_idx(self) -> Tensor:
        """(B, L) int32 contiguous: document index within the row (zeros without boundaries)."""
        if "seq_idx" not in self.derived:
            segments = self.segments if self.segments is not None else torch.zeros_like(self.positions)
            self.derived["seq_idx"] = segments.to(torch.int32).contiguous()
        return self.derived["seq_idx"]

    @property
    def cu_seqlens(self) -> Tensor:
        """(N+1,) int32: start offsets of the N documents of the rows flattened into one, then B*L."""
        if "cu_seqlens" not in self.derived:
            batch, length = self.positions.shape
            starts = self.positions == 0 if self.reset is None else self.reset.clone()
            starts[:, 0] = True
            offsets = starts.flatten().nonzero().flatten()
            self.derived["cu_seqlens"] = F.pad(offsets, (0, 1), value=batch * length).to(torch.int32)
        return self.derived["cu_seqlens"]

    @property
    def row_cu_seqlens(self) -> Tensor:
        """(B+1,) int32: the rows as sequences, their documents ignored."""
        if "row_cu_seqlens" not in self.derived:
            batch, length = self.positions.shape
            self.derived["row_cu_seqlens"] = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32,
                                                          device=self.positions.device)
        return self.derived["row_cu_seqlens"]

    @property
    def max_seqlen(self) -> int:
        """Longest document (one host sync, once per forward)."""
        if "max_seqlen" not in self.derived:
            cu = self.cu_seqlens
            self.derived["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
        return self.derived["max_seqlen"]

    @property
    def last_documents(self) -> Tensor:
        """(B,) long: index in cu_seqlens order of each row's last document (its final state is the cache's)."""
        if "last_documents" not in self.derived:
            batch, length = self.positions.shape
            ends = torch.arange(1, batch + 1, device=self.positions.device) * length
            self.derived["last_documents"] = torch.searchsorted(self.cu_seqlens.long(), ends) - 1
        return self.derived["last_documents"]


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
