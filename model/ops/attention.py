"""Causal softmax attention: full or sliding-window, GQA, KV-cache prefix, packed segments.

One definition, three implementations:

* ``attention_naive``  the dense Lq x Lk masked softmax. It is the spec: O(Lq * Lk).
* ``attention``        the reference path the model uses on CPU. Full attention goes to
                       torch's SDPA; sliding-window attention uses a blocked kernel that is
                       O(Lq * W) in time and memory.
* ``flash_attention``  the CUDA fast path through flash-attn (imported lazily).
* ``flex_attention``   torch's FlexAttention with a block-sparse causal + window + document
                       mask: the kernel where flash-attn is not built (compiled on CUDA).

Conventions shared by all three
-------------------------------
q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Lk >= Lq and Hq % Hkv == 0. Query head h
reads kv head h // (Hq // Hkv) (grouped-query attention).

The keys are Lk - Lq earlier tokens (a generation cache) followed by the Lq current
tokens, so query i sits at absolute position p = Lk - Lq + i. It sees key j iff

    j <= p  and  (window is None or j > p - window)                      # causal band
            and  q_segments[b, i] == k_segments[b, j]  and  k_segments[b, j] >= 0

i.e. a window of W tokens includes the query itself (flash-attn ``window_size=(W-1, 0)``).
Segments separate the documents of a packed row; a negative key segment marks an empty
cache slot. Scores are scaled by ``scale`` (default D ** -0.5), the softmax runs in
float32 (float64 stays float64), the output has q's dtype, and a query that sees no key
gets a zero output rather than NaN.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import Kernel, flash_attn_rule, kernel
from .precision import full_precision

ATTN_CUDA = Kernel("flash_attn.varlen", ("flash_attn",), "cuda")
ATTN_FLEX = Kernel("torch.flex_attention", (), "torch")


def attention_kernels(head_dim: int) -> list[tuple[Kernel, str | None]]:
    """The attention kernels in order of preference, each with the shape rule it breaks (or None)."""
    return [(ATTN_CUDA, flash_attn_rule(head_dim)), (ATTN_FLEX, None)]

# `enable_gqa` appeared in torch 2.5; this file also runs as Hugging Face remote code on
# whatever torch the user has, so fall back to expanding k/v on older versions.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@full_precision
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    scale: float | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Causal attention, full (``window=None``) or over the last ``window`` tokens.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); q_segments: (B, Lq), k_segments: (B, Lk)
    integer ids or None. Returns (B, Hq, Lq, D) in q's dtype. See the module docstring.
    ``block_size`` is the query block length of the sliding-window kernel (default
    ``default_block_size(window)``); it changes speed and memory, never the result.
    """
    _check_inputs(q, k, v, window, q_segments, k_segments)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window is None:
        return _full_attention(q, k, v, q_segments, k_segments, scale)
    return _sliding_window_attention(q, k, v, window, q_segments, k_segments, scale, block_size)


def attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference: dense (Lq x Lk) masked softmax. Same contract as ``attention``."""
    _check_inputs(q, k, v, window, q_segments, k_segments)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    dtype = _softmax_dtype(q.dtype)
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    k, v = k.to(dtype)[:, kv_head], v.to(dtype)[:, kv_head]  # (B, Hq, Lk, D)

    scores = q.to(dtype) @ k.transpose(-1, -2) * scale  # (B, Hq, Lq, Lk)
    visible = _visibility_mask(Lq, k.shape[2], window, q_segments, k_segments, q.device)
    visible = visible[:, None]  # broadcast over heads
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    # A row with no visible key is all -inf, hence NaN after softmax; it is defined as 0.
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)
    return (probs @ v).to(q.dtype)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
) -> Tensor:
    """CUDA path through flash-attn 2. Same contract as ``attention``.

    Computes in bf16 unless the inputs are already fp16/bf16. With segments, the row's
    documents are packed into flash-attn's varlen format; this needs Lq == Lk and
    q_segments == k_segments, each document a contiguous run of equal ids. ``cu_seqlens``
    and ``max_seqlen`` (``SequenceInfo``'s, shared by every layer) save deriving them again.
    """
    # Lazy: the CPU paths and remote-code loading must work without flash-attn installed.
    flash_attn_func = kernel("flash_attn", "flash_attn_func")
    flash_attn_varlen_func = kernel("flash_attn", "flash_attn_varlen_func")

    _check_inputs(q, k, v, window, q_segments, k_segments)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    # flash-attn's causal mask is aligned bottom-right (query i at Lk - Lq + i), as ours.
    window_size = (-1, -1) if window is None else (window - 1, 0)
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    # flash-attn wants (B, L, H, D); a transposed view is fine as long as D is contiguous.
    q_, k_, v_ = (x.transpose(1, 2).to(half) for x in (q, k, v))

    if q_segments is None and cu_seqlens is None:
        out = flash_attn_func(
            q_, k_, v_, softmax_scale=scale, causal=True, window_size=window_size
        )
    else:
        if Lq != Lk:
            raise ValueError(
                f"flash_attention with segments needs Lq == Lk (no cache prefix), got {Lq=} {Lk=}"
            )
        if cu_seqlens is None:
            if q_segments is not k_segments and not torch.equal(q_segments, k_segments):
                raise ValueError("flash_attention with segments needs q_segments == k_segments")
            cu_seqlens, max_seqlen = _cu_seqlens(q_segments)
        out = flash_attn_varlen_func(
            q_.reshape(B * Lq, Hq, D),
            k_.reshape(B * Lk, Hkv, D),
            v_.reshape(B * Lk, Hkv, D),
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=scale,
            causal=True,
            window_size=window_size,
        ).view(B, Lq, Hq, D)
    return out.transpose(1, 2).to(q.dtype)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, seq_idx: Tensor,
                   scale: float | None = None, masks: dict | None = None) -> Tensor:
    """torch's FlexAttention, no cache prefix (Lq == Lk). Same contract as ``attention``, the
    documents given by ``seq_idx`` (B, L) (each a contiguous run). ``masks``: a dict to keep the
    block mask in (``SequenceInfo.derived``), so the layers of one forward build it once per window.
    """
    from torch.nn.attention import flex_attention as flex

    B, Hq, L, D = q.shape
    key = ("flex_block_mask", window)
    block_mask = masks.get(key) if masks is not None else None
    if block_mask is None:
        def mask_mod(b, h, q_idx, kv_idx):
            visible = (kv_idx <= q_idx) & (seq_idx[b, q_idx] == seq_idx[b, kv_idx])
            return visible if window is None else visible & (q_idx - kv_idx < window)
        block_mask = flex.create_block_mask(mask_mod, B, None, L, L, device=q.device, _compile=q.is_cuda)
        if masks is not None:
            masks[key] = block_mask
    run = _compiled_flex_attention() if q.is_cuda else flex.flex_attention
    return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != Hq)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention import flex_attention as flex
    return torch.compile(flex.flex_attention, dynamic=False)


def default_block_size(window: int) -> int:
    """Query block length C of the sliding-window kernel: W / 4, clamped to [64, 256].

    A block of C queries scores C + W - 1 keys, of which each query uses W, so a fraction
    (C - 1) / (C + W - 1) of the score/softmax work and memory is masked-out waste: 50% at
    C = W, 20% at C = W / 4. Smaller blocks waste less but gather every key
    (C + W - 1) / C times (k and v windows are copied for the matmuls and summed back in
    backward) and make many small matmuls; below 64 that costs more time and memory than
    it saves, above 256 the matmuls gain nothing more. Measured on a 2-core CPU (fp32,
    D = 64, L = 8192, forward+backward, 1 and 2 threads; benchmarks/
    bench_window_attention.py --sweep-block), this rule was within 7% of the fastest
    block size for every W in {64, 256, 512, 1024, 4096}, and at or near the least memory.
    """
    return min(max(window // 4, 64), 256)


# --------------------------------------------------------------------------------------
# CPU implementations


def _full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_segments: Tensor | None,
    k_segments: Tensor | None,
    scale: float,
) -> Tensor:
    Lq, Lk = q.shape[2], k.shape[2]
    if q_segments is None and Lq == Lk:
        # SDPA's is_causal is top-left aligned, which matches ours only without a prefix.
        return _sdpa(q, k, v, attn_mask=None, is_causal=True, scale=scale)
    visible = _visibility_mask(Lq, Lk, None, q_segments, k_segments, q.device)[:, None]
    if q_segments is None:
        return _sdpa(q, k, v, attn_mask=visible, is_causal=False, scale=scale)
    # Only segments can leave a query with no visible key. Older torch returns NaN for
    # such rows, so let them attend everywhere (finite) and zero them afterwards.
    any_visible = visible.any(-1, keepdim=True)
    out = _sdpa(q, k, v, attn_mask=visible | ~any_visible, is_causal=False, scale=scale)
    return out * any_visible


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
) -> Tensor:
    # SDPA keeps the softmax in float32 for half inputs internally, so no upcast here.
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq == Hkv:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
        )
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    k, v = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )


def _sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    q_segments: Tensor | None,
    k_segments: Tensor | None,
    scale: float,
    block_size: int | None,
) -> Tensor:
    """Blocked sliding-window attention, O(Lq * W) time and memory, all blocks at once.

    Queries are cut into n blocks of C; block b attends to the K = C + W - 1 keys from
    W - 1 before its first query up to its last query. The keys are left/right padded so
    that these ranges are exactly the overlapping windows ``unfold(K, step=C)`` of one
    tensor: no Lq x Lk mask or score matrix is ever built.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    prefix = Lk - Lq
    W = min(window, Lk)  # a window reaching past key 0 is plain causal attention
    C = min(block_size or default_block_size(W), Lq)
    n = -(-Lq // C)
    K = C + W - 1
    dtype = _softmax_dtype(q.dtype)

    # Padded key index t (0 <= t < n*C + W - 1) holds absolute position t + first, where
    # first = prefix - (W - 1) is the oldest key any query can see. Keys before it are
    # dropped; positions < 0 (left pad) and >= Lk (right pad, seen only by the padded
    # queries past Lq, which are discarded) are zeros.
    first = prefix - (W - 1)
    keep_from = max(first, 0)
    pad_left, pad_right = keep_from - first, n * C - Lq

    def key_blocks(x: Tensor, value: float = 0.0) -> Tensor:
        """(..., Lk, E) -> (..., n, E, K): each query block's keys, as an overlapping view."""
        x = F.pad(x[..., keep_from:, :], (0, 0, pad_left, pad_right), value=value)
        return x.unfold(-2, K, C)

    k_blocks = key_blocks(k.to(dtype))  # (B, Hkv, n, D, K): already k^T per block
    v_blocks = key_blocks(v.to(dtype)).transpose(-1, -2)  # (B, Hkv, n, K, D)

    # GQA without copying k/v: the G query heads sharing a kv head are stacked as extra
    # rows of one matmul, (G*C, D) @ (D, K) per (batch, kv head, block).
    qb = (q.to(dtype) * scale).reshape(B, Hkv, G, Lq, D)
    qb = F.pad(qb, (0, 0, 0, n * C - Lq)).view(B, Hkv, G, n, C, D)
    qb = qb.transpose(2, 3).reshape(B, Hkv, n, G * C, D)
    scores = (qb @ k_blocks).view(B, Hkv, n, G, C, K)

    # Query row r and key column c of any block are (W - 1) + r - c positions apart, so
    # the causal band is the same (C, K) pattern in every block.
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(K, device=q.device)[None, :]
    visible = (c >= r) & (c <= r + W - 1)  # (C, K)
    if q_segments is None:
        key_exists = torch.arange(n * C + W - 1, device=q.device) >= pad_left
        visible = visible & key_exists.unfold(0, K, C)[:, None, :]  # (n, C, K)
    else:
        # Pad key segments with -1: the left pad then counts as "no key" like empty slots.
        k_seg = key_blocks(k_segments[..., None], value=-1).squeeze(-2)  # (B, n, K)
        q_seg = F.pad(q_segments, (0, n * C - Lq)).view(B, n, C)
        same_doc = (q_seg[..., :, None] == k_seg[..., None, :]) & (k_seg >= 0)[..., None, :]
        visible = visible & same_doc  # (B, n, C, K)
    visible = visible.view(-1, 1, n, 1, C, K)  # broadcast over kv heads and groups

    # Mask with the most negative finite value, not -inf: a row with no visible key then
    # gets a finite uniform softmax (zeroed below) instead of NaN in forward and backward.
    # In place: the matmul does not need its output for backward, so this saves a copy.
    scores.masked_fill_(~visible, torch.finfo(dtype).min)
    probs = torch.softmax(scores, dim=-1).view(B, Hkv, n, G * C, K)
    out = (probs @ v_blocks).view(B, Hkv, n, G, C, D)
    if q_segments is not None:  # only segments can hide every key from a query
        out = out * visible.any(-1, keepdim=True)

    out = out.transpose(2, 3).reshape(B, Hq, n * C, D)[:, :, :Lq]
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------
# Helpers


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the input dtype (float64 stays exact for tests)."""
    return torch.promote_types(dtype, torch.float32)


def _visibility_mask(
    Lq: int,
    Lk: int,
    window: int | None,
    q_segments: Tensor | None,
    k_segments: Tensor | None,
    device: torch.device,
) -> Tensor:
    """(B or 1, Lq, Lk) bool: may query i see key j. The definition, built densely."""
    q_pos = torch.arange(Lk - Lq, Lk, device=device)[:, None]
    k_pos = torch.arange(Lk, device=device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    if q_segments is None:
        return visible[None]
    same_doc = q_segments[:, :, None] == k_segments[:, None, :]
    return visible & same_doc & (k_segments >= 0)[:, None, :]


def _cu_seqlens(segments: Tensor) -> tuple[Tensor, int]:
    """Runs of equal ids in (B, L) segments, rows flattened -> (int32 (N+1,) offsets, max run)."""
    B, L = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a row start always starts a run
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = F.pad(offsets, (0, 1), value=B * L).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None,
    q_segments: Tensor | None,
    k_segments: Tensor | None,
) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q (B, Hq, Lq, D), k = v (B, Hkv, Lk, D); got {q.shape=} {k.shape=} "
            f"{v.shape=}"
        )
    (B, Hq, Lq, D), (Bk, Hkv, Lk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or Hq % Hkv or Lk < Lq:
        raise ValueError(f"need same B and D, Hq % Hkv == 0, Lk >= Lq; got {q.shape=} {k.shape=}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if (q_segments is None) != (k_segments is None):
        raise ValueError("pass both q_segments and k_segments, or neither")
    if q_segments is not None and (q_segments.shape != (B, Lq) or k_segments.shape != (B, Lk)):
        raise ValueError(
            f"expected segments (B, Lq), (B, Lk); got {q_segments.shape=} {k_segments.shape=}"
        )
