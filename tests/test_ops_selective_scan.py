"""The fused chunked selective scan equals the sequential definition, values and gradients, in float64."""
import pytest
import torch

from model.ops.selective_scan import selective_scan, selective_scan_naive


def inputs(batch, length, channels, n_state, with_h0, with_reset, dtype=torch.float64):
    x = torch.randn(batch, length, channels, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, channels, dtype=dtype))
    A = -torch.rand(channels, n_state, dtype=dtype) * 4
    B = torch.randn(batch, length, n_state, dtype=dtype)
    C = torch.randn(batch, length, n_state, dtype=dtype)
    h0 = torch.randn(batch, channels, n_state, dtype=dtype) if with_h0 else None
    reset = (torch.rand(batch, length) < 0.1) if with_reset else None
    return [x, dt, A, B, C, h0], reset


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("length, chunk", [(1, 8), (7, 8), (64, 16), (100, 8), (257, 32), (50, None)])
@pytest.mark.parametrize("with_h0, with_reset", [(False, False), (True, False), (True, True)])
def test_chunked_equals_sequential_with_gradients(length, chunk, with_h0, with_reset):
    tensors, reset = inputs(2, length, 5, 4, with_h0, with_reset)
    fused_in = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    naive_in = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    y, h = selective_scan(*fused_in, reset=reset, chunk_size=chunk)
    y_ref, h_ref = selective_scan_naive(*naive_in, reset=reset)
    assert rel(y, y_ref) < 1e-10 and rel(h, h_ref) < 1e-10
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    ((y * gy).sum() + (h * gh).sum()).backward()
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    for name, a, b in zip("x dt A B C h0".split(), fused_in, naive_in):
        if a is not None:
            assert rel(a.grad, b.grad) < 1e-8, name


def test_gradcheck():
    tensors, reset = inputs(1, 11, 3, 2, True, True)
    tensors = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *t: selective_scan(*t, reset=reset, chunk_size=4), tensors)


def test_reset_restarts_the_state():
    (x, dt, A, B, C, _), _ = inputs(1, 30, 4, 3, False, False)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 12] = True
    y, _ = selective_scan(x, dt, A, B, C, reset=reset, chunk_size=8)
    y_alone, _ = selective_scan(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], chunk_size=8)
    assert rel(y[:, 12:], y_alone) < 1e-12
