"""Depthwise causal 1-D convolution (Mamba's and Griffin's short conv) with state and resets.

`causal_conv1d` is the reference path; `causal_conv1d_kernel` runs causal-conv1d's CUDA kernel
(documents by seq_idx) or fla's Triton kernel (documents by cu_seqlens) on the same contract.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import Kernel, causal_conv1d_rule, kernel

CONV_CUDA = Kernel("causal_conv1d", ("causal_conv1d",), "cuda")
CONV_TRITON = Kernel("fla.causal_conv1d", ("fla",), "triton")


def conv_kernels(channels: int, width: int) -> list[tuple[Kernel, str | None]]:
    """The conv kernels in order of preference, each with the shape rule it breaks (or None)."""
    return [(CONV_CUDA, causal_conv1d_rule(channels, width)), (CONV_TRITON, None)]


def causal_conv1d_kernel(name: str, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                         cu_seqlens: Tensor, silu: bool) -> Tensor:
    """`causal_conv1d` without state, then silu if asked, on kernel `name`.

    x (B, L, C); the documents: seq_idx (B, L) int32 (None: one per row) for causal-conv1d,
    cu_seqlens (N+1,) int32 of the flattened rows for fla.
    """
    batch, length, channels = x.shape
    if name == CONV_CUDA.name:
        causal_conv1d_fn = kernel("causal_conv1d", "causal_conv1d_fn")
        # channel-last (B, C, L) view, as seq_idx requires; its strides must be multiples of 8
        if x.stride(-1) != 1 or x.stride(1) % 8 or x.stride(0) % 8:
            x = x.contiguous()
        y = causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx, activation="silu" if silu else None)
        return y.transpose(1, 2)
    fla_conv = kernel("fla.modules.causal_conv1d", "causal_conv1d")
    y, _ = fla_conv(x.reshape(1, batch * length, channels), weight, bias, activation="silu" if silu else None,
                    cu_seqlens=cu_seqlens.long())
    return y.view(batch, length, channels)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  initial_state: Tensor | None = None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = bias + sum_j weight[:, K-1-j] * x_{t-j}, over lags j the current document can see.

    x: (B, L, C); weight: (C, K); bias: (C,); initial_state: (B, K-1, C), the inputs
    before x (zeros if None); reset: (B, L) bool, True where a document starts: lags
    that reach back across it read zeros, as at the start of a sequence.
    Returns y (B, L, C) and the final state (B, K-1, C): the last K-1 inputs of the
    current document (earlier documents' inputs zeroed, so a decode step cannot see them).
    """
    batch, length, channels = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, width - 1, channels)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=1)           # (B, K-1+L, C)
    segment = None
    if reset is not None:
        # the initial state continues the first document: it shares segment 0
        segment = torch.cat([reset.new_zeros(batch, width - 1, dtype=torch.long),
                             reset.long().cumsum(1)], dim=1)            # (B, K-1+L)
    y = x * weight[:, width - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, weight[:, width - 1])
    for lag in range(1, width):
        tap = padded[:, width - 1 - lag: width - 1 - lag + length]
        if segment is not None:
            same_doc = segment[:, width - 1 - lag: width - 1 - lag + length] == segment[:, width - 1:]
            tap = tap * same_doc.unsqueeze(-1).to(x.dtype)
        y = y + tap * weight[:, width - 1 - lag]
    return y, conv_tail(padded, width, segment)


def conv_tail(inputs: Tensor, width: int, segment: Tensor | None = None) -> Tensor:
    """The conv state after `inputs` (B, T, C): its last K-1 rows, left-padded with zeros
    when T < K-1, and zeroed where they belong to an earlier document than the last token
    (segment: (B, T) running document index, or None)."""
    tail = inputs[:, -(width - 1):]
    if segment is not None:
        same_doc = segment[:, -(width - 1):] == segment[:, -1:]
        tail = tail * same_doc.unsqueeze(-1).to(tail.dtype)
    return F.pad(tail, (0, 0, width - 1 - tail.shape[1], 0))


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: x (B, C), state (B, K-1, C) -> y (B, C), new state."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(1)], dim=1)     # (B, K, C)
    y = torch.einsum("bkc,ck->bc", window, weight.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y, window[:, 1:]
