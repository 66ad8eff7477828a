"""attention (SDPA / blocked sliding window) and flash_attention against attention_naive."""

import sys
import types

import pytest
import torch

from model.ops.attention import (
    attention,
    attention_naive,
    default_block_size,
    flash_attention,
)

D = 16


def make_qkv(B=2, Hq=4, Hkv=2, Lq=64, Lk=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(grad) for x in (q, k, v)]


def packed_segments(B, Lq, Lk, seed=0, empty_slots=0, on=True):
    """Random packed documents over the Lk keys (contiguous runs of increasing ids);
    the first `empty_slots` cache slots are empty (-1). Returns (q_segments, k_segments)."""
    if not on:
        return None, None
    assert empty_slots <= Lk - Lq  # queries never sit in an empty slot
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, Lk, generator=g) < 0.08  # ~12-token documents
    k_seg = starts.long().cumsum(-1)
    k_seg[:, :empty_slots] = -1
    return k_seg[:, Lk - Lq :].clone(), k_seg


def rel_err(a, b):
    # clamp: some gradients are exactly zero (window = 1 makes every softmax constant)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# (Lq, prefix, window, block_size): blocks that divide Lq and that don't, a window of 1,
# windows >= L, blocks larger than Lq, decode-like Lq = 1 with a cache.
BLOCKED_CASES = [
    (64, 0, 16, 16),
    (64, 0, 16, None),
    (61, 0, 8, 16),
    (50, 0, 1, 7),
    (37, 0, 37, 8),
    (37, 0, 100, 16),
    (40, 0, 13, 64),
    (48, 20, 16, 16),
    (29, 35, 10, 8),
    (17, 9, 100, 5),
    (1, 30, 8, None),
    (3, 30, 1, 2),
]


@pytest.mark.parametrize("Lq, prefix, window, block_size", BLOCKED_CASES)
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("segments", [False, True])
def test_blocked_matches_naive(Lq, prefix, window, block_size, Hkv, segments):
    Lk = Lq + prefix
    q, k, v = make_qkv(Hkv=Hkv, Lq=Lq, Lk=Lk, seed=Lq + prefix + window)
    q_seg, k_seg = packed_segments(2, Lq, Lk, seed=Lq, empty_slots=prefix // 2, on=segments)
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    out = attention(q, k, v, block_size=block_size, **kw)
    ref = attention_naive(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("Lq, prefix", [(64, 0), (45, 0), (30, 19), (1, 40)])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("segments", [False, True])
def test_full_attention_matches_naive(Lq, prefix, Hkv, segments):
    Lk = Lq + prefix
    q, k, v = make_qkv(Hkv=Hkv, Lq=Lq, Lk=Lk, seed=Lq)
    q_seg, k_seg = packed_segments(2, Lq, Lk, seed=Lq, empty_slots=prefix // 2, on=segments)
    kw = dict(window=None, q_segments=q_seg, k_segments=k_seg)
    assert rel_err(attention(q, k, v, **kw), attention_naive(q, k, v, **kw)) < 1e-10


def test_scale_argument():
    q, k, v = make_qkv(Lq=40)
    for window in (None, 9):
        out = attention(q, k, v, window=window, scale=0.3, block_size=16)
        assert rel_err(out, attention_naive(q, k, v, window=window, scale=0.3)) < 1e-10
        # scale really is used: it differs from the default D ** -0.5
        assert rel_err(out, attention_naive(q, k, v, window=window)) > 1e-3


@pytest.mark.parametrize(
    "Lq, prefix, window, block_size, Hkv, segments",
    [
        (61, 0, 8, 16, 2, False),
        (48, 20, 16, 16, 1, True),
        (37, 0, 100, 8, 4, True),
        (40, 0, 1, 16, 2, False),
        (45, 0, None, None, 2, True),
        (30, 19, None, None, 1, False),
    ],
)
def test_gradients_match_naive(Lq, prefix, window, block_size, Hkv, segments):
    Lk = Lq + prefix
    q_seg, k_seg = packed_segments(2, Lq, Lk, seed=1, empty_slots=prefix // 2, on=segments)
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    grads = []
    for fn, extra in ((attention, dict(block_size=block_size)), (attention_naive, {})):
        q, k, v = make_qkv(Hkv=Hkv, Lq=Lq, Lk=Lk, seed=3, grad=True)
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=q.dtype)
        (fn(q, k, v, **kw, **extra) * do).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("window, block_size", [(None, None), (8, 16), (8, 5), (64, 16)])
def test_packed_row_equals_documents_alone(window, block_size):
    """Two documents packed in one row give each document's stand-alone output."""
    la, lb = 23, 18
    q, k, v = make_qkv(B=1, Lq=la + lb, seed=7)
    seg = torch.tensor([[0] * la + [1] * lb])
    kw = dict(window=window, block_size=block_size)
    packed = attention(q, k, v, q_segments=seg, k_segments=seg, **kw)
    for sl in (slice(0, la), slice(la, la + lb)):
        alone = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], **kw)
        assert rel_err(packed[:, :, sl], alone) < 1e-12


@pytest.mark.parametrize("window", [None, 4])
def test_query_without_visible_key_gives_zeros_not_nan(window):
    q, k, v = make_qkv(Lq=20, Lk=20, seed=5, grad=True)
    k_seg = torch.zeros(2, 20, dtype=torch.long)
    k_seg[0, :10] = -1  # empty slots: queries 0..9 of row 0 see nothing
    q_seg = torch.zeros(2, 20, dtype=torch.long)
    q_seg[1, 5] = 3  # a query whose document has no key at all
    k_seg[1, 15:] = q_seg[1, 15:] = -1  # padding marked -1 on both sides matches nothing
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    for fn in (attention, attention_naive):
        out = fn(q, k, v, **kw)
        out.sum().backward()
        assert not any(t.isnan().any() for t in (out, q.grad, k.grad, v.grad))
        assert out[0, :, :10].abs().max() == 0 and out[1, :, 5].abs().max() == 0
        assert out[1, :, 15:].abs().max() == 0
        q.grad = k.grad = v.grad = None
    assert rel_err(attention(q, k, v, **kw), attention_naive(q, k, v, **kw)) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("window", [None, 12])
def test_low_precision_inputs(dtype, tol, window):
    q_seg, k_seg = packed_segments(2, 70, 80, seed=2, empty_slots=4)
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    q, k, v = make_qkv(Lq=70, Lk=80, seed=6)
    ref = attention_naive(q, k, v, **kw)
    for fn in (attention, attention_naive):
        out = fn(*(x.to(dtype) for x in (q, k, v)), **kw)
        assert out.dtype == dtype
        assert rel_err(out, ref) < tol


def test_default_block_size():
    assert [default_block_size(w) for w in (1, 64, 512, 1024, 8192)] == [64, 64, 128, 256, 256]


def test_invalid_inputs():
    q, k, v = make_qkv(Lq=8)
    seg = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="Lk >= Lq"):
        attention(q, k[:, :, :4], v[:, :, :4], window=None)  # Lk < Lq
    with pytest.raises(ValueError, match="Hq % Hkv == 0"):
        attention(q[:, :3], k, v, window=None)  # Hq % Hkv != 0
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="both q_segments and k_segments"):
        attention(q, k, v, window=4, q_segments=seg)  # only one of the two


# --------------------------------------------------------------------------------------
# flash_attention: real parity on CUDA; its plumbing on CPU against a stand-in flash_attn.

FLASH_CASES = [(None, False), (None, True), (1, False), (16, False), (16, True), (100, True)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs CUDA")
@pytest.mark.parametrize("window, segments", FLASH_CASES)
@pytest.mark.parametrize("Hkv", [4, 1])
def test_flash_attention_matches_naive_cuda(window, segments, Hkv):
    pytest.importorskip("flash_attn")
    L = 300
    q, k, v = (x.cuda().bfloat16() for x in make_qkv(Hkv=Hkv, Lq=L, seed=8))
    q_seg, k_seg = packed_segments(2, L, L, seed=8, on=segments)
    if segments:
        q_seg, k_seg = q_seg.cuda(), k_seg.cuda()
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    out = flash_attention(q, k, v, **kw)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel_err(out, attention_naive(q, k, v, **kw)) < 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs CUDA")
def test_flash_attention_with_cache_prefix_cuda():
    pytest.importorskip("flash_attn")
    q, k, v = (x.cuda().bfloat16() for x in make_qkv(Hkv=2, Lq=40, Lk=130, seed=9))
    out = flash_attention(q, k, v, window=32)
    assert rel_err(out, attention_naive(q, k, v, window=32)) < 3e-2


def _stand_in_flash_attn():
    """A dense, CPU flash_attn module following flash-attn 2's documented semantics:
    (B, L, H, D) layout, half-precision inputs, causal mask aligned bottom-right, query i
    sees keys [i + Lk - Lq - left, i + Lk - Lq + right] for window_size=(left, right)."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        assert q.dtype in (torch.float16, torch.bfloat16) and causal
        Lq, Lk = q.shape[1], k.shape[1]
        i = torch.arange(Lq)[:, None] + Lk - Lq
        j = torch.arange(Lk)[None, :]
        left, right = window_size
        visible = j <= i + max(right, 0)  # causal=True: right is 0 or -1
        if left >= 0:
            visible = visible & (j >= i - left)
        G = q.shape[2] // k.shape[2]
        k, v = (x.float().repeat_interleave(G, dim=2) for x in (k, v))
        s = torch.einsum("bihd,bjhd->bhij", q.float(), k) * softmax_scale
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        return torch.einsum("bhij,bjhd->bihd", p, v).to(q.dtype)

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw
    ):
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        outs = [
            flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], **kw)[0]
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(outs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


@pytest.mark.parametrize("window, segments", FLASH_CASES)
def test_flash_attention_plumbing_with_stand_in(monkeypatch, window, segments):
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in_flash_attn())
    L = 50
    q, k, v = make_qkv(Hkv=2, Lq=L, seed=10)
    q_seg, k_seg = packed_segments(2, L, L, seed=10, on=segments)
    kw = dict(window=window, q_segments=q_seg, k_segments=k_seg)
    out = flash_attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, attention_naive(q, k, v, **kw)) < 3e-2
    if segments:
        with pytest.raises(ValueError, match="Lq == Lk"):
            flash_attention(
                q[:, :, 1:], k, v, window=window, q_segments=q_seg[:, 1:], k_segments=k_seg
            )
