"""Mamba-1's selective scan, fused: per channel d and state n,

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t,      y_t = sum_n C_t * h_t

`selective_scan_naive` is the definition. `selective_scan` computes the same in
chunks of T steps: only one chunk's (B, T, D, N) decay, input and state tensors
exist at a time (small enough to stay in cache), the states between chunks are the
only thing saved for backward, and backward recomputes each chunk and runs the
reverse recurrence with the gradients written out by hand. The unfused form
(materialise (B, L, D, N), scan, contract) spends its time moving those tensors
through memory; this is what mamba-ssm's CUDA kernel does, in PyTorch.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .precision import full_precision
from .scan import linear_scan_nograd

# inner Hillis-Steele chunk: 4 rounds, then a short carry loop over the T/16 sub-chunks
_SCAN_CHUNK = 16

# elements of one chunk's (B, T, D, N) tensors: ~1 MiB of fp32, cache-sized on CPU
_CHUNK_NUMEL = 1 << 18


def selective_scan_naive(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None,
                         reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference loop. x, dt: (B, L, D); A: (D, N); B, C: (B, L, N); h0: (B, D, N);
    reset: (B, L) bool, True where h_{t-1} is dropped (a document starts). -> y (B, L, D), h_L."""
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0
    keep = (~reset).to(x.dtype).unbind(1) if reset is not None else [None] * x.shape[1]
    ys = []
    # unbind, not x[:, t]: indexing makes autograd's backward O(L^2) in the loop
    for x_t, dt_t, B_t, C_t, keep_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1), keep):
        decay = torch.exp(dt_t[:, :, None] * A)
        if keep_t is not None:
            decay = decay * keep_t[:, None, None]
        h = decay * h + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    return torch.stack(ys, dim=1), h


@full_precision
def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None,
                   reset: Tensor | None = None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunked fused scan; same arguments and results as `selective_scan_naive`.

    All tensors must share one floating dtype (the mixer passes float32). chunk_size
    None picks T so a chunk's (B, T, D, N) tensor holds about 256K elements.
    Differentiable in x, dt, A, B, C and h0 (first order).
    """
    batch, length, channels = x.shape
    if chunk_size is None:
        chunk_size = max(8, min(256, _CHUNK_NUMEL // max(1, batch * channels * A.shape[1])))
    return _SelectiveScan.apply(x, dt, A, B, C, h0, reset, chunk_size)


def _chunk_inputs(x, dt, A, B, reset, s, e):
    decay = torch.exp(dt[:, s:e, :, None] * A)                              # (B, T, D, N)
    if reset is not None:
        decay.masked_fill_(reset[:, s:e, None, None], 0.0)
    drive = (dt[:, s:e] * x[:, s:e]).unsqueeze(-1) * B[:, s:e, None, :]     # (B, T, D, N)
    return decay, drive


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, reset, chunk_size):
        batch, length, channels = x.shape
        h = x.new_zeros(batch, channels, A.shape[1]) if h0 is None else h0.to(x.dtype)
        y = x.new_empty(batch, length, channels)
        entering = []                                                        # state entering each chunk
        for s in range(0, length, chunk_size):
            e = min(s + chunk_size, length)
            entering.append(h)
            decay, drive = _chunk_inputs(x, dt, A, B, reset, s, e)
            states = linear_scan_nograd(decay, drive, h, _SCAN_CHUNK)          # (B, T, D, N)
            y[:, s:e] = torch.einsum("btdn,btn->btd", states, C[:, s:e])
            h = states[:, -1].clone()
        ctx.save_for_backward(x, dt, A, B, C, h0, reset, torch.stack(entering, 1))
        ctx.chunk_size = chunk_size
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, h0, reset, entering = ctx.saved_tensors
        T = ctx.chunk_size
        length = x.shape[1]
        grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        carry = torch.zeros_like(entering[:, 0]) if grad_h_last is None else grad_h_last.clone()
        grad_y = grad_y if grad_y is not None else torch.zeros_like(x)
        starts = list(range(0, length, T))
        for c in reversed(range(len(starts))):
            s, e = starts[c], min(starts[c] + T, length)
            h_in = entering[:, c]
            decay, drive = _chunk_inputs(x, dt, A, B, reset, s, e)
            states = linear_scan_nograd(decay, drive, h_in, _SCAN_CHUNK)      # recompute h_s..h_e
            grad_C[:, s:e] = torch.einsum("btdn,btd->btn", states, grad_y[:, s:e])
            # dL/dh_t = direct (C_t dy_t) + a_{t+1} dL/dh_{t+1}: the same scan, backwards in time
            direct = grad_y[:, s:e, :, None] * C[:, s:e, None, :]
            direct[:, -1] += carry
            next_decay = torch.cat([decay[:, 1:], torch.zeros_like(decay[:, :1])], dim=1)
            grad_h = linear_scan_nograd(next_decay.flip(1), direct.flip(1), None, _SCAN_CHUNK).flip(1)
            # a_t = exp(dt_t A): dL/d(dt_t A) = dL/da_t * a_t, with dL/da_t = dh_t * h_{t-1}
            previous = torch.cat([h_in[:, None], states[:, :-1]], dim=1)
            grad_log_decay = grad_h * previous * decay                        # 0 where reset zeroed a_t
            grad_A += torch.einsum("btdn,btd->dn", grad_log_decay, dt[:, s:e])
            # b_t = dt_t x_t B_t
            grad_drive_B = torch.einsum("btdn,btn->btd", grad_h, B[:, s:e])   # sum_n dh * B
            grad_dt[:, s:e] = torch.einsum("btdn,dn->btd", grad_log_decay, A) + grad_drive_B * x[:, s:e]
            grad_x[:, s:e] = grad_drive_B * dt[:, s:e]
            grad_B[:, s:e] = torch.einsum("btdn,btd->btn", grad_h, dt[:, s:e] * x[:, s:e])
            carry = decay[:, 0] * grad_h[:, 0]                                # into the entering state
        grad_h0 = carry if h0 is not None and ctx.needs_input_grad[5] else None
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_h0, None, None
