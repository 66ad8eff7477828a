"""chunk_linear_attention against linear_attention_naive (the definition)."""
import pytest
import torch

from model.ops.linear_attention import (chunk_linear_attention, linear_attention_naive,
                                        linear_attention_step)

F64 = torch.float64
B, H, K, V = 2, 2, 8, 6


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300)).item()


def make_inputs(length, vector_decay, with_state=False, with_reset=False, decay_scale=1.0,
                dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, K, generator=gen, dtype=dtype)
    k = torch.randn(B, H, length, K, generator=gen, dtype=dtype)
    v = torch.randn(B, H, length, V, generator=gen, dtype=dtype)
    g = -decay_scale * torch.rand(B, H, length, K if vector_decay else 1, generator=gen, dtype=dtype)
    state = torch.randn(B, H, K, V, generator=gen, dtype=dtype) if with_state else None
    reset = None
    if with_reset:
        reset = torch.rand(B, length, generator=gen) < 0.1
        reset[0, 0] = True
    return q, k, v, g, state, reset


def outputs_and_grads(fn, q, k, v, g, state, reset):
    """(o, final_state, d/dq, d/dk, d/dv, d/dg[, d/dstate]) for a fixed random loss."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g) + ((state,) if state is not None else ())]
    o, final = fn(*leaves[:4], leaves[4] if state is not None else None, reset)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() \
        + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    return [o.detach(), final.detach()] + list(torch.autograd.grad(loss, leaves))


def assert_matches_naive(inputs, chunk_size, tol=1e-8):
    got = outputs_and_grads(lambda *x: chunk_linear_attention(*x, chunk_size=chunk_size), *inputs)
    want = outputs_and_grads(linear_attention_naive, *inputs)
    names = ["o", "final_state", "grad_q", "grad_k", "grad_v", "grad_g", "grad_state"]
    for name, x, y in zip(names, got, want):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, y) < tol, name


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("chunk_size", [8, 32, 64])      # vector decay: 1, 4 and 8 sub-chunks
@pytest.mark.parametrize("vector_decay", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("with_state, with_reset", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "state", "reset", "state+reset"])
def test_matches_naive(length, chunk_size, vector_decay, with_state, with_reset):
    inputs = make_inputs(length, vector_decay, with_state, with_reset, seed=length)
    assert_matches_naive(inputs, chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 12, 24, 64])
@pytest.mark.parametrize("vector_decay", [False, True], ids=["scalar", "vector"])
def test_chunk_sizes(chunk_size, vector_decay):
    # Vector decay: sub-chunks of gcd(chunk_size, SUB_CHUNK=8): 12 -> 3 of 4, 24 -> 3 of 8,
    # 64 -> 8 of 8; 100 tokens leave a partial last chunk in each case.
    assert_matches_naive(make_inputs(100, vector_decay, True, True, seed=chunk_size), chunk_size)


@pytest.mark.parametrize("vector_decay", [False, True], ids=["scalar", "vector"])
def test_strong_and_zero_decays(vector_decay):
    q, k, v, g, state, reset = make_inputs(150, vector_decay, True, True, decay_scale=30.0)
    g = g.masked_fill(torch.rand(g.shape) < 0.3, 0.0)       # decay 1: the state is kept as is
    assert_matches_naive((q, k, v, g, state, reset), chunk_size=64)


@pytest.mark.parametrize("vector_decay", [False, True], ids=["scalar", "vector"])
def test_float32_strong_decay_is_stable(vector_decay):
    # Strong decays after weak ones are where cumsum differences would lose float32 precision.
    q, k, v, g, state, reset = make_inputs(300, vector_decay, True, True)
    gen = torch.Generator().manual_seed(1)
    g = torch.where(torch.rand(g.shape, generator=gen) < 0.5, -50.0, -0.01) * torch.rand(g.shape, generator=gen, dtype=F64)
    g[0] = -50.0
    want_o, want_state = linear_attention_naive(q, k, v, g, state, reset)
    leaves = [x.float().requires_grad_() for x in (q, k, v, g, state)]
    o, final = chunk_linear_attention(*leaves[:4], leaves[4], reset)
    (o.square().sum() + final.square().sum()).backward()
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert torch.isfinite(o).all() and all(torch.isfinite(x.grad).all() for x in leaves)
    assert rel_err(o, want_o) < 1e-4 and rel_err(final, want_state) < 1e-4


def test_reset_forgets_the_past():
    q, k, v, g, state, _ = make_inputs(40, True, True)
    reset = torch.zeros(B, 40, dtype=torch.bool)
    reset[:, 17] = True
    o, final = chunk_linear_attention(q, k, v, g, state, reset, chunk_size=16)
    o_tail, final_tail = chunk_linear_attention(q[:, :, 17:], k[:, :, 17:], v[:, :, 17:], g[:, :, 17:], chunk_size=16)
    assert rel_err(o[:, :, 17:], o_tail) < 1e-12 and rel_err(final, final_tail) < 1e-12


def test_step_continues_chunked():
    # Prefill with the chunked form, then decode one token with the step: same as one long pass.
    q, k, v, g, state, _ = make_inputs(51, True, True)
    o_all, final_all = chunk_linear_attention(q, k, v, g, state, chunk_size=16)
    _, prefill_state = chunk_linear_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], g[:, :, :50], state, chunk_size=16)
    o_step, final_step = linear_attention_step(q[:, :, 50], k[:, :, 50], v[:, :, 50], g[:, :, 50], prefill_state)
    assert rel_err(o_step, o_all[:, :, 50]) < 1e-12 and rel_err(final_step, final_all) < 1e-12


def test_low_precision_dtypes():
    q, k, v, g, state, reset = make_inputs(70, True, True, True, dtype=torch.bfloat16)
    o, final = chunk_linear_attention(q, k, v, g, state, reset)
    want_o, want_state = linear_attention_naive(*(x.double() for x in (q, k, v, g, state)), reset)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(o, want_o) < 1e-2 and rel_err(final, want_state) < 1e-5
