"""Generation cache: one entry per sublayer, constant in size for recurrent and window layers.

- `RecurrentState` (Mamba-1/2, GLA, RG-LRU): the conv tail and the recurrent state.
- `KVCache`: keys/values; a ring buffer of the last `window` tokens for `S`, a
  growing buffer for `*` (the only entry whose size depends on the context length).
Segments in a KVCache are relative to the document being generated: 0 for its
tokens, -1 for empty slots and earlier documents (left padding), so no query sees them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RecurrentState:
    conv: Tensor | None = None      # (B, K-1, C) inputs of the short conv
    state: Tensor | None = None     # block-specific recurrent state, fp32

    @property
    def empty(self) -> bool:
        return self.state is None


@dataclass
class KVCache:
    window: int | None                  # None: full attention, keep every token
    k: Tensor | None = None             # (B, Hkv, capacity, D)
    v: Tensor | None = None
    segments: Tensor | None = None      # (B, capacity)
    length: int = 0                     # tokens written so far

    @property
    def empty(self) -> bool:
        return self.length == 0

    def ordered(self) -> tuple[Tensor, Tensor, Tensor]:
        """The cached keys, values and segments, oldest first."""
        if self.window is None:
            n = self.length
            return self.k[:, :, :n], self.v[:, :, :n], self.segments[:, :n]
        if self.length < self.window:
            n = self.length
            return self.k[:, :, :n], self.v[:, :, :n], self.segments[:, :n]
        order = (torch.arange(self.window, device=self.k.device) + self.length) % self.window
        return self.k[:, :, order], self.v[:, :, order], self.segments[:, order]

    def store(self, k: Tensor, v: Tensor, segments: Tensor) -> None:
        """Replace the cache by the tail of k/v (B, Hkv, T, D), oldest first, after a parallel forward."""
        segments = torch.where(segments == segments[:, -1:], 0, -1)
        if self.window is not None:
            k, v, segments = k[:, :, -self.window:], v[:, :, -self.window:], segments[:, -self.window:]
            capacity = self.window
        else:
            capacity = max(16, k.shape[2] * 2)     # room to decode before the first regrow
        self.k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
        self.v = torch.zeros_like(self.k)
        self.segments = segments.new_full((k.shape[0], capacity), -1)
        n = k.shape[2]
        self.k[:, :, :n], self.v[:, :, :n], self.segments[:, :n] = k, v, segments
        self.length = n

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one decoded token (B, Hkv, 1, D) of the current document."""
        if self.window is not None:
            slot = self.length % self.window
        else:
            slot = self.length
            if slot == self.k.shape[2]:        # full: double, amortised O(1) per token
                grow = lambda t, fill: torch.cat([t, torch.full_like(t, fill)], dim=2 if t.dim() == 4 else 1)
                self.k, self.v, self.segments = grow(self.k, 0), grow(self.v, 0), grow(self.segments, -1)
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        self.segments[:, slot] = 0
        self.length += 1


@dataclass
class HybridCache:
    layers: list[RecurrentState | KVCache | None]
    offset: Tensor | None = None        # (B,) tokens of the current document already seen

    def select_rows(self, index: Tensor) -> "HybridCache":
        """A cache whose row i is row index[i] of this one (beam search reorders rows every step)."""
        layers = []
        for entry in self.layers:
            if entry is not None:
                entry = dataclasses.replace(entry, **{
                    f.name: getattr(entry, f.name).index_select(0, index.to(getattr(entry, f.name).device))
                    for f in dataclasses.fields(entry) if isinstance(getattr(entry, f.name), Tensor)})
            layers.append(entry)
        offset = self.offset.index_select(0, index.to(self.offset.device)) if self.offset is not None else None
        return HybridCache(layers=layers, offset=offset)

    def nbytes(self) -> int:
        total = 0
        for entry in self.layers:
            if entry is None:
                continue
            for f in dataclasses.fields(entry):
                value = getattr(entry, f.name)
                if isinstance(value, Tensor):
                    total += value.numel() * value.element_size()
        return total
