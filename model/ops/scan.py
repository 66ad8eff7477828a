"""Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t (Mamba-1's selective scan, RG-LRU).

`linear_scan_naive` is the definition. `linear_scan` computes the same thing in
O(L log chunk_size) work with only O(L / chunk_size) sequential Python steps:

1. split L into chunks of T and scan every chunk at once with a Hillis-Steele
   (log-depth) scan, starting each chunk from a zero state (on CPU, one cache-sized
   block of chunks at a time: see CPU_BLOCK_NUMEL);
2. walk the chunks in order to carry the true state from one chunk to the next;
3. add each chunk's carry-in times the chunk-local product of a's to every position.

Only products of a's and sums are formed: nothing is exponentiated and nothing is
divided by a, so a = 0 (a document reset) is exact and the result is as stable as
the sequential loop. Its backward is the same scan run backwards in time.

`linear_scan_kernel` runs the same recurrence, a = exp(log_a), on fla's Triton elementwise
recurrence (`fused_recurrent_hgrn`) over packed rows through cu_seqlens.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels import Kernel, kernel

SCAN_TRITON = Kernel("fla.fused_recurrent_hgrn", ("fla",), "triton")


def linear_scan_naive(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Reference loop. a, b: (B, L, *S); h0: (B, *S) or None (zeros) -> h: (B, L, *S)."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    hs = []
    # unbind, not a[:, t]: autograd then stacks the per-step gradients once, instead of
    # adding L full-size zero-padded gradients (O(L^2) in the backward pass).
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        hs.append(h)
    return torch.stack(hs, dim=1)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, chunk_size: int = 64) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = h0 (zeros if None), elementwise over the state.

    a, b: (B, L, *S), same shape (S is any trailing state shape, e.g. (D,) or (D, N));
    h0: (B, *S) or None. Returns h: (B, L, *S) in the dtype of b.
    Differentiable in a, b and h0 (first order only).
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a and b must have the same shape and dtype, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")
    return _LinearScan.apply(a, b, h0, chunk_size)


def linear_scan_kernel(log_a: Tensor, b: Tensor, cu_seqlens: Tensor) -> Tensor:
    """h_t = exp(log_a_t) * h_{t-1} + b_t from a zero state at every document start.

    log_a, b: (B, L, D) float32; cu_seqlens (N+1,) int32 of the rows flattened into one.
    Returns h (B, L, D) float32.
    """
    batch, length, width = b.shape
    recurrence = kernel("fla.ops.hgrn", "fused_recurrent_hgrn")
    h, _ = recurrence(b.reshape(1, batch * length, width), log_a.reshape(1, batch * length, width),
                      cu_seqlens=cu_seqlens.long())
    return h.view(batch, length, width)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None, chunk_size: int) -> Tensor:
        h = linear_scan_nograd(a, b, h0, chunk_size)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk_size = chunk_size
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):
        a, h, h0 = ctx.saved_tensors
        need_a, need_b, need_h0 = ctx.needs_input_grad[:3]
        # dh_t = grad_h_t + a_{t+1} dh_{t+1} (nothing flows back past t = L-1) is the same
        # recurrence read backwards in time: in reversed time u = L-1-t its coefficient is
        # a_{L-u} for u >= 1; at u = 0 it multiplies a zero state, so its value is moot.
        a_rev = torch.cat([torch.zeros_like(a[:, :1]), a[:, 1:].flip(1)], dim=1)
        dh = linear_scan_nograd(a_rev, grad_h.flip(1), None, ctx.chunk_size).flip(1)

        grad_a = grad_h0 = None
        if need_a:  # dL/da_t = dh_t * h_{t-1}
            grad_a = torch.empty_like(dh)
            torch.mul(dh[:, 1:], h[:, :-1], out=grad_a[:, 1:])
            if h0 is None:
                grad_a[:, 0].zero_()
            else:
                torch.mul(dh[:, 0], h0, out=grad_a[:, 0])
        if need_h0 and h0 is not None:
            grad_h0 = a[:, 0] * dh[:, 0]
        return grad_a, dh if need_b else None, grad_h0, None


# On CPU the scan is bound by memory traffic: every Hillis-Steele round is a full pass
# over its input. So the sequence is processed in blocks of whole chunks of about this
# many elements per tensor (1 MiB in float32), and all rounds of a block run while it is
# still in cache, in scratch buffers reused from block to block. This is 2-3x faster than
# one pass over everything. A GPU has no such cache to fit, and each block costs kernel
# launches, so there the whole sequence is one block.
CPU_BLOCK_NUMEL = 1 << 18


def linear_scan_nograd(a: Tensor, b: Tensor, h0: Tensor | None = None, chunk_size: int = 64) -> Tensor:
    """`linear_scan` without autograd, for callers that write their own backward
    (the fused selective scan); a and b are only read. Returns a new h."""
    batch, length, *state = b.shape
    h = torch.empty_like(b, memory_format=torch.contiguous_format)
    if length == 0:
        return h
    chunk_size = min(chunk_size, length)
    if b.is_cuda:
        block = length
    else:
        block = max(1, CPU_BLOCK_NUMEL // b[:, 0].numel() // chunk_size) * chunk_size
    block = min(block, length)
    scratch = [(a.new_empty(batch, block, *state), b.new_empty(batch, block, *state)) for _ in range(2)]

    carry = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    start = 0
    while start < length:
        # Whole chunks while they last; the shorter remainder is one chunk of its own,
        # so nothing is ever padded.
        steps = min(block, length - start)
        size = chunk_size if steps >= chunk_size else steps
        steps -= steps % size
        span = slice(start, start + steps)
        carry = _scan_block(a[:, span], b[:, span], carry, size, scratch, out=h[:, span])
        start += steps
    return h


def _scan_block(a: Tensor, b: Tensor, carry: Tensor, size: int,
                scratch: list[tuple[Tensor, Tensor]], out: Tensor) -> Tensor:
    """Scan a block of whole chunks of `size` steps from state `carry` into `out`.

    a, b, out: (B, n, *S) with n a multiple of size. Returns the state after the block.
    """
    steps = a.shape[1]
    a, b, out = (x.unflatten(1, (steps // size, size)) for x in (a, b, out))   # (B, C, T, *S)

    # 1. Hillis-Steele scan inside every chunk, all chunks of the block at once. A round
    # with offset d composes each step with the one d earlier,
    #     (a, b)_t <- (a_t a_{t-d}, a_t b_{t-d} + b_t),
    # so afterwards (a, b)_t covers the chunk's steps (t-2d, t]. After log2(T) rounds,
    # a_t = product of the chunk's a up to t, b_t = h_t for a zero state entering the
    # chunk. Rounds read one pair of buffers and write the other (ping-pong), so they need
    # no temporaries; the first reads the inputs, which are never written.
    offset, rounds = 1, 0
    while offset < size:
        a_next, b_next = (x[:, :steps].unflatten(1, (steps // size, size)) for x in scratch[rounds % 2])
        torch.addcmul(b[:, :, offset:], a[:, :, offset:], b[:, :, :-offset], out=b_next[:, :, offset:])
        torch.mul(a[:, :, offset:], a[:, :, :-offset], out=a_next[:, :, offset:])
        b_next[:, :, :offset] = b[:, :, :offset]                     # already complete
        a_next[:, :, :offset] = a[:, :, :offset]
        a, b = a_next, b_next
        offset, rounds = 2 * offset, rounds + 1

    # 2. Carry the true state across the chunks: one short step per chunk on (B, *S).
    carry_in = torch.empty_like(b[:, :, 0])                          # (B, C, *S)
    for c in range(b.shape[1]):
        carry_in[:, c] = carry
        carry = torch.addcmul(b[:, c, -1], a[:, c, -1], carry)

    # 3. h_t = (local h_t) + (chunk's product of a up to t) * (state entering the chunk).
    torch.addcmul(b, a, carry_in.unsqueeze(2), out=out)
    return carry
