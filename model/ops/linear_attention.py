"""Gated linear attention (GLA, Mamba-2/SSD) with per-document resets.

Recurrence, per batch and head, with state S of shape (K, V):

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t^T v_t        (S_t = k_t^T v_t where reset_t)
    o_t = q_t @ S_t

g = log_decay <= 0 is either per key dimension (B, H, L, K) (GLA) or one scalar per
head and step (B, H, L, 1) (Mamba-2/SSD). q is used as given (callers pre-scale).

`linear_attention_naive` is the definition, a loop over `linear_attention_step`.
`chunk_linear_attention` is the chunked form used for training and prefill; it is
plain PyTorch, differentiated by autograd. `linear_attention_kernel` runs fla's Triton kernels
(chunk_gla for per-key decay, chunk_simple_gla for scalar decay) on packed rows through cu_seqlens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import Kernel, kernel
from .precision import full_precision

GLA_TRITON = Kernel("fla.chunk_gla", ("fla",), "triton")
SIMPLE_GLA_TRITON = Kernel("fla.chunk_simple_gla", ("fla",), "triton")

# Side of the diagonal blocks of the intra-chunk decay tensor that the per-key-decay case
# materializes; see _intra_chunk_vector. Smaller blocks mean less elementwise work and a
# few more (cheap) matmuls: on CPU, 8 runs GLA shapes ~1.7x faster than 16.
SUB_CHUNK = 8


@full_precision
def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                          state: Tensor) -> tuple[Tensor, Tensor]:
    """One token. q, k: (B, H, K); v: (B, H, V); log_decay: (B, H, K) or (B, H, 1);
    state: (B, H, K, V). Returns o (B, H, V) in the dtype of v and the new state in
    float32 (float64 if any input is float64)."""
    dtype = _accumulation_dtype(q, k, v, log_decay, state)
    q, k, v, g, state = (x.to(dtype) for x in (q, k, v, log_decay, state))
    state = torch.addcmul(g.exp().unsqueeze(-1) * state, k.unsqueeze(-1), v.unsqueeze(-2))
    o = (q.unsqueeze(-2) @ state).squeeze(-2)
    return o.to(v.dtype), state


def linear_attention_kernel(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, cu_seqlens: Tensor,
                            last_documents: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """`chunk_linear_attention` without initial state on fla's kernels, in fla's layout.

    q, k: (B, L, H, K); v: (B, L, H, V); log_decay: (B, L, H, K) (GLA) or (B, L, H) (scalar, SSD);
    cu_seqlens (N+1,) int32: the documents of the rows flattened into one (fla's varlen form needs
    batch 1). last_documents (B,): the document whose final state each row hands to a cache, or None
    for no state. Returns o (B, L, H, V) in v's dtype and the states (B, H, K, V) float32 or None.
    """
    batch, length = q.shape[:2]
    flat = lambda t: t.reshape(1, batch * length, *t.shape[2:])
    scalar = log_decay.dim() == 3
    chunk = kernel("fla.ops.simple_gla", "chunk_simple_gla") if scalar else kernel("fla.ops.gla", "chunk_gla")
    o, states = chunk(flat(q), flat(k), flat(v), g=flat(log_decay), scale=1.0, output_final_state=last_documents is not None,
                      cu_seqlens=cu_seqlens.long())
    o = o.view(batch, length, *o.shape[2:]).to(v.dtype)
    return o, (states[last_documents].float() if last_documents is not None else None)


def linear_attention_naive(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                           initial_state: Tensor | None = None,
                           reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference loop; same arguments and results as `chunk_linear_attention`."""
    batch, heads, length, dk = q.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1], dtype=_accumulation_dtype(q, k, v, log_decay))
    if initial_state is not None:
        state = initial_state.to(state.dtype)
    outputs = []
    # unbind rather than indexing q[:, :, t]: indexing would make autograd add up L
    # full-size zero-padded gradients, an O(L^2) backward pass.
    steps = zip(*(x.unbind(2) for x in (q, k, v, log_decay)))
    for t, (q_t, k_t, v_t, g_t) in enumerate(steps):
        if reset is not None:  # a new document starts at t: forget everything before it
            state = state.masked_fill(reset[:, t, None, None, None], 0.0)
        o, state = linear_attention_step(q_t, k_t, v_t, g_t, state)
        outputs.append(o)
    return torch.stack(outputs, dim=2), state


@full_precision
def chunk_linear_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                           initial_state: Tensor | None = None, reset: Tensor | None = None,
                           chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Chunked gated linear attention.

    q, k: (B, H, L, K); v: (B, H, L, V); log_decay: (B, H, L, K) or (B, H, L, 1), <= 0;
    initial_state: (B, H, K, V) or None (zeros); reset: (B, L) bool, True where a token
    starts a new document (the state before it is dropped). Returns o (B, H, L, V) in
    the dtype of v and the final state (B, H, K, V) in float32 (float64 for float64 inputs).

    Every decay is exp(sum of g over a run of steps) <= 1. The exponents are built as
    such sums directly (prefix, suffix and segment sums inside a chunk), never as a
    difference of two long cumulative sums: that difference loses all precision when
    a strong decay precedes a weak one (e.g. -1600 - (-1599.99) in float32), and the
    exponent it rounds to could even be positive. So nothing overflows, however
    negative g is, and float32 results stay close to the float32 loop. Per chunk, with
    P_t = sum of g over [start, t] and R_s = sum over (s, end]:

        o     = (q * exp(P)) @ S_in  +  (causal intra-chunk attention with decays) @ v
        S_out = exp(P_end)[:, None] * S_in  +  (k * exp(R))^T @ v

    Everything except the S_in -> S_out recurrence is batched over all chunks; that
    recurrence is a short loop of elementwise updates. Resets only mask terms: a pair
    (t, s) needs no reset in (s, t], the incoming state needs no reset in
    [chunk start, t], both tested on a segment index (running count of resets), so g
    itself is never altered and gradients stay finite.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    out_dtype = v.dtype
    dtype = _accumulation_dtype(q, k, v, log_decay)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, log_decay))

    # A chunk much longer than the sequence would only add padding.
    size = min(chunk_size, -(-length // SUB_CHUNK) * SUB_CHUNK)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    if pad:  # padded tokens have k = v = 0 and g = 0: they leave the state untouched
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    q, k, v, g = (x.reshape(batch, heads, n_chunks, size, -1) for x in (q, k, v, g))
    prefix = g.cumsum(dim=-2)                    # (B, H, N, T, K or 1): sum over [start, t]
    suffix = _suffix_sum(g)                      # sum over (s, end]

    # Reset masks (None: everything visible). same_doc: pair (t, s) in one document;
    # from_start: the state entering the chunk reaches t; to_end: s reaches the chunk's
    # end; keep_state: the entering state survives the whole chunk.
    same_doc = from_start = to_end = keep_state = None
    if reset is not None:
        reset = F.pad(reset.to(torch.long), (0, pad)).view(batch, 1, n_chunks, size)
        segment = reset.cumsum(dim=-1)          # resets in [chunk start, t]
        same_doc = segment.unsqueeze(-1) == segment.unsqueeze(-2)          # (B, 1, N, T, T)
        from_start = (segment == 0).unsqueeze(-1)                           # (B, 1, N, T, 1)
        to_end = (segment == segment[..., -1:]).unsqueeze(-1)               # (B, 1, N, T, 1)
        keep_state = (segment[..., -1:] == 0).unsqueeze(-1)                 # (B, 1, N, 1, 1)

    # Each chunk's contribution to the state it hands on, and its decay of the incoming one.
    chunk_update = (k * _masked_exp(suffix, to_end)).transpose(-1, -2) @ v          # (B, H, N, K, V)
    chunk_decay = _masked_exp(prefix[..., -1:, :], keep_state).transpose(-1, -2)  # (B, H, N, K or 1, 1)

    state = q.new_zeros(batch, heads, dk, dv)
    if initial_state is not None:
        state = initial_state.to(dtype)
    incoming = []
    for n in range(n_chunks):
        incoming.append(state)
        state = torch.addcmul(chunk_update[:, :, n], chunk_decay[:, :, n], state)
    incoming = torch.stack(incoming, dim=2)                           # (B, H, N, K, V)

    o = (q * _masked_exp(prefix, from_start)) @ incoming
    if log_decay.shape[-1] == 1:
        o = o + _intra_chunk_scalar(q, k, v, g, same_doc)
    else:
        o = o + _intra_chunk_vector(q, k, v, g, same_doc)
    o = o.reshape(batch, heads, n_chunks * size, dv)[:, :, :length]
    return o.to(out_dtype), state


def _intra_chunk_scalar(q: Tensor, k: Tensor, v: Tensor, g: Tensor, same_doc: Tensor | None) -> Tensor:
    """Scalar decay: one (T, T) decay matrix per chunk and head scales q @ k^T."""
    mask = _causal(q.shape[-2], q.device, same_doc)
    decay = _segment_sum(g.squeeze(-1)).exp() * mask             # (B, H, N, T, T)
    return ((q @ k.transpose(-1, -2)) * decay) @ v


def _intra_chunk_vector(q: Tensor, k: Tensor, v: Tensor, g: Tensor, same_doc: Tensor | None) -> Tensor:
    """Per-key decay: the (T, T, K) decay tensor, of which only diagonal blocks are formed.

    Cut the chunk into sub-chunks of c tokens. Between a query t in sub-chunk i and a key
    s in an earlier sub-chunk j, the decay factors through the sub-chunk boundaries:
    (rest of j after s) + (whole sub-chunks j+1 .. i-1) + (start of i up to t), each term
    <= 0. So those blocks are plain matmuls of q and k rescaled by exp(<= 0) factors. In
    a sub-chunk's own diagonal block no such split exists, so the (c, c, K) block of
    decays is materialized: T*c*K numbers per chunk instead of T*T*K.
    """
    *lead, size, dk = q.shape
    sub = math.gcd(size, SUB_CHUNK)
    n_sub = size // sub
    qs, ks, vs, gs = (x.reshape(*lead, n_sub, sub, x.shape[-1]) for x in (q, k, v, g))

    # Diagonal blocks: decays (..., n_sub, c_t, c_s, K), exponent = sum of g over (s, t].
    decay = _segment_sum(gs.transpose(-1, -2)).movedim(-3, -1).exp()
    scores = ((qs.unsqueeze(-2) * decay) * ks.unsqueeze(-3)).sum(-1)   # (..., n_sub, c, c)
    same_doc_diag = None if same_doc is None else _diagonal_blocks(same_doc, n_sub, sub)
    scores = scores * _causal(sub, q.device, same_doc_diag)
    o = (scores @ vs).flatten(-3, -2)                                   # (..., T, V)

    # Blocks below the diagonal. keys holds the keys of sub-chunks 0 .. i-1, each decayed
    # up to the start of sub-chunk i; one matmul per i, batched over everything else.
    head = gs.cumsum(dim=-2)                         # sum over [start of sub-chunk, t]
    q_head = qs * head.exp()
    k_tail = ks * _suffix_sum(gs).exp()              # sum over (s, end of sub-chunk]
    sub_decay = head[..., -1, :].exp()               # (..., n_sub, K): decay across a sub-chunk
    below = [o.new_zeros(*lead, sub, v.shape[-1])]
    keys = k_tail[..., 0, :, :]
    for i in range(1, n_sub):
        if i > 1:
            keys = torch.cat([keys * sub_decay[..., i - 1, None, :], k_tail[..., i - 1, :, :]], dim=-2)
        scores = q_head[..., i, :, :] @ keys.transpose(-1, -2)          # (..., c, i*c)
        if same_doc is not None:  # all earlier keys are causal, but a reset may hide them
            scores = scores * same_doc[..., i * sub:(i + 1) * sub, :i * sub]
        below.append(scores @ v[..., :i * sub, :])
    return o + torch.cat(below, dim=-2)


def _segment_sum(x: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): out[..., t, s] = sum of x over (s, t], 0 where s >= t.

    Summed directly along each column rather than as cumsum_t - cumsum_s, which cancels
    catastrophically when large terms precede s.
    """
    size = x.shape[-1]
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1)
    terms = x.unsqueeze(-1).expand(*x.shape, size).masked_fill(~strictly_lower, 0.0)   # [t, s] = x_t
    return terms.cumsum(dim=-2)


def _suffix_sum(x: Tensor) -> Tensor:
    """out[..., s, :] = sum of x[..., u, :] over u > s (along dim -2)."""
    inclusive = x.flip(-2).cumsum(dim=-2).flip(-2)
    return F.pad(inclusive[..., 1:, :], (0, 0, 0, 1))


def _causal(size: int, device: torch.device, same_doc: Tensor | None) -> Tensor:
    """Mask of the pairs (t, s) that may interact: s <= t, and in one document if given."""
    mask = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    return mask if same_doc is None else mask & same_doc


def _diagonal_blocks(mask: Tensor, n_sub: int, sub: int) -> Tensor:
    """(..., T, T) -> (..., n_sub, c, c): the diagonal c x c blocks."""
    blocks = mask.unflatten(-1, (n_sub, sub)).unflatten(-3, (n_sub, sub))   # (..., n, c, n, c)
    return torch.diagonal(blocks, dim1=-4, dim2=-2).movedim(-1, -3)


def _masked_exp(x: Tensor, mask: Tensor | None) -> Tensor:
    """exp(x) where mask (None: everywhere), else 0."""
    return x.exp() if mask is None else x.exp() * mask


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
