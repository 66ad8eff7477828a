"""Causal depthwise conv: equals torch's conv1d, restarts at documents, and streams exactly."""
import torch

from model.ops.conv import causal_conv1d, causal_conv1d_step


def torch_reference(x, weight, bias):
    # (B, L, C) -> nn.functional.conv1d with K-1 left padding, as transformers' Mamba does
    C, K = weight.shape
    out = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=K - 1, groups=C)
    return out[..., : x.shape[1]].transpose(1, 2)


def test_matches_torch_conv1d():
    x, w, b = torch.randn(2, 19, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y, _ = causal_conv1d(x, w, b)
    assert torch.allclose(y, torch_reference(x, w, b), atol=1e-12)


def test_reset_equals_separate_documents_and_tail_hides_earlier_ones():
    x, w, b = torch.randn(1, 20, 3), torch.randn(3, 4), torch.randn(3)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 18] = True                      # a 2-token last document, shorter than the tail
    y, tail = causal_conv1d(x, w, b, reset=reset)
    assert torch.allclose(y[:, :18], causal_conv1d(x[:, :18], w, b)[0], atol=1e-6)
    alone, alone_tail = causal_conv1d(x[:, 18:], w, b)
    assert torch.allclose(y[:, 18:], alone, atol=1e-6)
    assert torch.equal(tail, alone_tail) and tail[0, 0].abs().max() == 0


def test_chunks_and_steps_continue_the_full_pass():
    x, w, b = torch.randn(2, 15, 5), torch.randn(5, 4), torch.randn(5)
    full, final = causal_conv1d(x, w, b)
    first, state = causal_conv1d(x[:, :2], w, b)           # shorter than the kernel: zero-padded state
    second, state = causal_conv1d(x[:, 2:9], w, b, initial_state=state)
    steps = []
    for t in range(9, 15):
        y, state = causal_conv1d_step(x[:, t], w, b, state)
        steps.append(y[:, None])
    assert torch.allclose(torch.cat([first, second] + steps, 1), full, atol=1e-6)
    assert torch.allclose(state, final, atol=1e-6)
