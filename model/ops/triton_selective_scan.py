"""Mamba-1's selective scan with document resets as a Triton kernel, forward and backward:

    h_t = exp(dt_t * A) * h_{t-1} * (1 - reset_t) + dt_t * x_t * B_t,      y_t = C_t . h_t

the contract of `ops.selective_scan.selective_scan` (x, dt: (B, L, D); A: (D, N); B, C: (B, L, N);
reset (B, L) bool or None; no initial state) -> y (B, L, D), final state (B, D, N), in float32.
mamba-ssm's CUDA `selective_scan_fn` has no reset input, so packed rows with exact per-document
states (`model.mamba.packed_resets: exact`) run here.

One program per (row, block of channels) walks the row in time with its (BLOCK_D, N) state in
registers. The forward stores the state entering every chunk of T steps; the backward walks the
chunks in reverse, recomputes a chunk's states into a scratch buffer and runs the reverse
recurrence over them (what mamba-ssm's CUDA kernel does in shared memory). B's and C's gradients
are summed over the channel blocks in PyTorch, A's over the rows. Checked against the reference
under Triton's CPU interpreter (tests/test_kernels_interpreter.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK = 64          # steps between saved states: backward scratch is (T + 1) x BLOCK_D x N per program
BLOCK_D = 32


@triton.jit
def _selective_scan_fwd(x, dt, A, Bm, Cm, keep, y, chunk_states, final_state, L, D, N, n_chunks,
                        HAS_RESET: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * N + offs_n[None, :]
    a = tl.load(A + tile, mask=mask_dn, other=0.0)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for t in range(0, L):
        if t % T == 0:
            tl.store(chunk_states + (row * n_chunks + t // T) * D * N + tile, h, mask=mask_dn)
        step = row * L + t
        x_t = tl.load(x + step * D + offs_d, mask=mask_d, other=0.0)
        dt_t = tl.load(dt + step * D + offs_d, mask=mask_d, other=0.0)
        b_t = tl.load(Bm + step * N + offs_n, mask=mask_n, other=0.0)
        c_t = tl.load(Cm + step * N + offs_n, mask=mask_n, other=0.0)
        decay = tl.exp(dt_t[:, None] * a)
        if HAS_RESET:
            decay = decay * tl.load(keep + step)
        h = decay * h + (dt_t * x_t)[:, None] * b_t[None, :]
        tl.store(y + step * D + offs_d, tl.sum(h * c_t[None, :], axis=1), mask=mask_d)
    tl.store(final_state + row * D * N + tile, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd(x, dt, A, Bm, Cm, keep, dy, d_final, chunk_states, scratch,
                        dx, ddt, dA, dB, dC, L, D, N, n_chunks, n_blocks,
                        HAS_RESET: tl.constexpr, HAS_D_FINAL: tl.constexpr, T: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile = offs_d[:, None] * N + offs_n[None, :]
    local = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]     # this program's scratch tile
    own_scratch = scratch + (row * n_blocks + block) * (T + 1) * BLOCK_D * BLOCK_N
    a = tl.load(A + tile, mask=mask_dn, other=0.0)
    dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_D_FINAL:
        dh += tl.load(d_final + row * D * N + tile, mask=mask_dn, other=0.0)
    da = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for reverse_chunk in range(0, n_chunks):
        chunk = n_chunks - 1 - reverse_chunk
        start = chunk * T
        # scratch slot 0: the state entering the chunk; slot j + 1: the state after step start + j
        h = tl.load(chunk_states + (row * n_chunks + chunk) * D * N + tile, mask=mask_dn, other=0.0)
        tl.store(own_scratch + local, h)
        for j in range(0, T):
            t = start + j
            if t < L:
                step = row * L + t
                x_t = tl.load(x + step * D + offs_d, mask=mask_d, other=0.0)
                dt_t = tl.load(dt + step * D + offs_d, mask=mask_d, other=0.0)
                b_t = tl.load(Bm + step * N + offs_n, mask=mask_n, other=0.0)
                decay = tl.exp(dt_t[:, None] * a)
                if HAS_RESET:
                    decay = decay * tl.load(keep + step)
                h = decay * h + (dt_t * x_t)[:, None] * b_t[None, :]
                tl.store(own_scratch + (j + 1) * BLOCK_D * BLOCK_N + local, h)
        tl.debug_barrier()
        for reverse_j in range(0, T):
            j = T - 1 - reverse_j
            t = start + j
            if t < L:
                step = row * L + t
                x_t = tl.load(x + step * D + offs_d, mask=mask_d, other=0.0)
                dt_t = tl.load(dt + step * D + offs_d, mask=mask_d, other=0.0)
                b_t = tl.load(Bm + step * N + offs_n, mask=mask_n, other=0.0)
                c_t = tl.load(Cm + step * N + offs_n, mask=mask_n, other=0.0)
                dy_t = tl.load(dy + step * D + offs_d, mask=mask_d, other=0.0)
                h_t = tl.load(own_scratch + (j + 1) * BLOCK_D * BLOCK_N + local)
                h_prev = tl.load(own_scratch + j * BLOCK_D * BLOCK_N + local)
                decay = tl.exp(dt_t[:, None] * a)
                if HAS_RESET:
                    decay = decay * tl.load(keep + step)
                dh += dy_t[:, None] * c_t[None, :]
                part = (step * n_blocks + block) * N + offs_n                  # this block's share of dB, dC
                tl.store(dC + part, tl.sum(h_t * dy_t[:, None], axis=0), mask=mask_n)
                tl.store(dB + part, tl.sum(dh * (dt_t * x_t)[:, None], axis=0), mask=mask_n)
                d_log_decay = dh * h_prev * decay                               # dL/d(dt_t A): 0 where reset
                da += d_log_decay * dt_t[:, None]
                d_drive = tl.sum(dh * b_t[None, :], axis=1)                     # dL/d(dt_t x_t)
                tl.store(ddt + step * D + offs_d, tl.sum(d_log_decay * a, axis=1) + d_drive * x_t, mask=mask_d)
                tl.store(dx + step * D + offs_d, d_drive * dt_t, mask=mask_d)
                dh = dh * decay
        tl.debug_barrier()
    tl.store(dA + row * D * N + tile, da, mask=mask_dn)


def selective_scan_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y (B, L, D) and the final state (B, D, N), float32; differentiable in x, dt, A, B, C."""
    return _TritonSelectiveScan.apply(x, dt, A, B, C, reset)


def _blocks(D: int, N: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(N)
    block_d = min(BLOCK_D, triton.next_power_of_2(D))
    return block_d, block_n, triton.cdiv(D, block_d)


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, reset):
        x, dt, A, B, C = (t.float().contiguous() for t in (x, dt, A, B, C))
        batch, length, channels = x.shape
        state = A.shape[1]
        keep = (~reset).float().contiguous() if reset is not None else x.new_empty(0)
        block_d, block_n, n_blocks = _blocks(channels, state)
        n_chunks = triton.cdiv(length, CHUNK)
        y = torch.empty_like(x)
        final = x.new_empty(batch, channels, state)
        chunk_states = x.new_empty(batch, n_chunks, channels, state)
        _selective_scan_fwd[(batch, n_blocks)](
            x, dt, A, B, C, keep, y, chunk_states, final, length, channels, state, n_chunks,
            HAS_RESET=reset is not None, T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        ctx.save_for_backward(x, dt, A, B, C, keep, chunk_states)
        ctx.has_reset = reset is not None
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, d_final):
        x, dt, A, B, C, keep, chunk_states = ctx.saved_tensors
        batch, length, channels = x.shape
        state = A.shape[1]
        block_d, block_n, n_blocks = _blocks(channels, state)
        n_chunks = chunk_states.shape[1]
        dy = torch.zeros_like(x) if dy is None else dy.float().contiguous()
        d_final_arg = d_final.float().contiguous() if d_final is not None else x.new_empty(0)
        scratch = x.new_empty(batch * n_blocks * (CHUNK + 1) * block_d * block_n)
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dA = x.new_empty(batch, channels, state)
        dB = x.new_zeros(batch, length, n_blocks, state)
        dC = x.new_zeros(batch, length, n_blocks, state)
        _selective_scan_bwd[(batch, n_blocks)](
            x, dt, A, B, C, keep, dy, d_final_arg, chunk_states, scratch, dx, ddt, dA, dB, dC,
            length, channels, state, n_chunks, n_blocks,
            HAS_RESET=ctx.has_reset, HAS_D_FINAL=d_final is not None, T=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
        return dx, ddt, dA.sum(0), dB.sum(2), dC.sum(2), None
