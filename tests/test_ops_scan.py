"""linear_scan (chunked, custom backward) against linear_scan_naive (the definition)."""
import pytest
import torch

from model.ops import scan
from model.ops.scan import linear_scan, linear_scan_naive

F64 = torch.float64


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item()


def make_inputs(length, state=(3, 4), batch=2, dtype=F64, with_h0=True, resets=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, length, *state, generator=gen, dtype=dtype)
    if resets:  # a = 0 is a document boundary: the state before it is forgotten exactly
        starts = torch.rand(batch, length, generator=gen) < 0.1
        starts[0, 0] = True
        a = a.masked_fill(starts.view(batch, length, *[1] * len(state)), 0.0)
    b = torch.randn(batch, length, *state, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, *state, generator=gen, dtype=dtype) if with_h0 else None
    return a, b, h0


def grads(fn, a, b, h0, weight):
    inputs = [x.detach().requires_grad_() for x in (a, b) + ((h0,) if h0 is not None else ())]
    h = fn(*inputs[:2], inputs[2] if h0 is not None else None)
    return [h.detach()] + list(torch.autograd.grad((h * weight).sum(), inputs))


@pytest.mark.parametrize("length", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("chunk_size", [4, 16, 64])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("resets", [False, True])
def test_matches_naive_values_and_grads(length, chunk_size, with_h0, resets):
    a, b, h0 = make_inputs(length, with_h0=with_h0, resets=resets, seed=length)
    weight = torch.randn(b.shape, dtype=F64)
    got = grads(lambda a, b, h0: linear_scan(a, b, h0, chunk_size=chunk_size), a, b, h0, weight)
    want = grads(linear_scan_naive, a, b, h0, weight)
    for name, x, y in zip(["h", "grad_a", "grad_b", "grad_h0"], got, want):
        assert rel_err(x, y) < 1e-8, name


@pytest.mark.parametrize("block_numel", [1, 5 * 24 * 8])
def test_cpu_blocks(monkeypatch, block_numel):
    # 24 numbers per step (batch 2, state 3 x 4): blocks of one chunk of 8 steps (never
    # less), then of 5 chunks; 101 steps also leave a remainder chunk of 5 steps.
    monkeypatch.setattr(scan, "CPU_BLOCK_NUMEL", block_numel)
    a, b, h0 = make_inputs(101, resets=True)
    weight = torch.randn(b.shape, dtype=F64)
    got = grads(lambda a, b, h0: linear_scan(a, b, h0, chunk_size=8), a, b, h0, weight)
    want = grads(linear_scan_naive, a, b, h0, weight)
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-8


@pytest.mark.parametrize("state", [(), (5,), (3, 4)])
def test_state_shapes(state):
    a, b, h0 = make_inputs(37, state=state)
    assert rel_err(linear_scan(a, b, h0, chunk_size=8), linear_scan_naive(a, b, h0)) < 1e-12


def test_gradcheck():
    a, b, h0 = make_inputs(11, state=(3,))
    inputs = tuple(x.requires_grad_() for x in (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, chunk_size=4), inputs)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_requires_grad(needs):
    a, b, h0 = make_inputs(20)
    a, b, h0 = (x.requires_grad_(n) for x, n in zip((a, b, h0), needs))
    linear_scan(a, b, h0, chunk_size=8).sum().backward()
    for x, n in zip((a, b, h0), needs):
        assert (x.grad is not None) == n


def test_inputs_untouched_and_output_writable():
    a, b, h0 = make_inputs(64)
    a_copy, b_copy, h0_copy = a.clone(), b.clone(), h0.clone()
    h = linear_scan(a.requires_grad_(), b.requires_grad_(), h0, chunk_size=16)
    assert torch.equal(a, a_copy) and torch.equal(b, b_copy) and torch.equal(h0, h0_copy)
    h.mul_(2)  # not a view: in-place use of the output is allowed


def test_non_contiguous_inputs():
    a, b, h0 = make_inputs(50, state=(6,))
    a_t, b_t = a.transpose(0, 1).contiguous().transpose(0, 1), b.transpose(0, 1).contiguous().transpose(0, 1)
    assert not a_t.is_contiguous()
    assert rel_err(linear_scan(a_t, b_t, h0, chunk_size=8), linear_scan_naive(a, b, h0)) < 1e-12


def test_float32_strong_decay_is_stable():
    # Tiny a (like exp(-50)): products underflow to 0, which must not turn into inf or nan.
    a, b, h0 = make_inputs(300, state=(16,), with_h0=True, resets=True)
    a = a * torch.exp(-50 * torch.rand(a.shape, dtype=F64))
    want = linear_scan_naive(a, b, h0)
    inputs = [x.float().requires_grad_() for x in (a, b, h0)]
    got = linear_scan(*inputs)
    got.square().sum().backward()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    assert rel_err(got.double(), want) < 1e-4
