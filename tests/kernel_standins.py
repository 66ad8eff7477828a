"""Stand-ins for the CUDA C++ extensions of causal-conv1d, mamba-ssm and flash-attn, on CPU.

Each replaces the compiled module its library imports (`causal_conv1d_cuda`, `selective_scan_cuda`,
`flash_attn_2_cuda`) with functions of the same signatures that make the same argument checks as the
C++ sources (dtypes, shapes, strides, layouts; all but `is_cuda`) and then compute the result with a
plain PyTorch reference (autograd for the backward). The libraries' own Python wrappers stay real, so
a test that runs Braid's calls through them proves those calls would be accepted by the kernels.

    install()   # before the libraries are imported; adds "cuda" to model.kernels.CPU_RUNTIMES
"""
from __future__ import annotations

import math
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops.conv import causal_conv1d
from model.ops.selective_scan import selective_scan_naive

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def with_autograd(fn):
    """fn() in a fresh thread: an extension's backward is called below autograd's dispatch key and
    with grad mode off (both thread-local), and the stand-ins differentiate their reference."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


class KernelCheckFailed(RuntimeError):
    """A TORCH_CHECK of the real kernel failed: the real kernel would have refused this call."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise KernelCheckFailed(message)


def check_shape(t: Tensor, *shape: int, name: str) -> None:
    check(tuple(t.shape) == tuple(shape), f"{name} must have shape {shape}, got {tuple(t.shape)}")


# ---- causal-conv1d: csrc/causal_conv1d.cpp -------------------------------------------------

def _conv_checks(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None) -> bool:
    check(x.dtype in FLOATS and weight.dtype in FLOATS, "causal_conv1d: x and weight must be float, half or bf16")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    check_shape(weight, dim, width, name="weight")
    check(x.stride(2) == 1 or x.stride(1) == 1, "causal_conv1d: x must be contiguous along channels or time")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        check(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
              "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8")
    check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        check(bias.dtype == weight.dtype and bias.stride(-1) == 1, "causal_conv1d: bias dtype/stride")
        check_shape(bias, dim, name="bias")
    if seq_idx is not None:
        check(channel_last, "seq_idx is only supported for channel last layout")
        check(seq_idx.dtype == torch.int32 and seq_idx.is_contiguous(), "seq_idx must be contiguous int32")
        check_shape(seq_idx, batch, seqlen, name="seq_idx")
    return channel_last


def _conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool) -> Tensor:
    reset = None
    if seq_idx is not None:
        reset = torch.zeros_like(seq_idx, dtype=torch.bool)
        reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    y, _ = causal_conv1d(x.transpose(1, 2).float(), weight.float(), None if bias is None else bias.float(), None, reset)
    y = F.silu(y) if silu else y
    return y.transpose(1, 2)


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation):
    _conv_checks(x, weight, bias, seq_idx)
    check(initial_states is None and final_states_out is None, "stand-in: conv states are not used by Braid")
    out.copy_(_conv_reference(x, weight, bias, seq_idx, silu_activation))


def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight, dbias,
                      dinitial_states, silu_activation):
    channel_last = _conv_checks(x, weight, bias, seq_idx)
    if channel_last and dout.stride(1) != 1:
        dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    if channel_last:
        check(dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0,
              "causal_conv1d with channel last layout requires strides (dout.stride(0) and dout.stride(2)) "
              f"to be multiples of 8, got {dout.stride()}")

    def grads():
        inputs = [t.detach().float().requires_grad_() for t in (x, weight)]
        b = bias.detach().float().requires_grad_() if bias is not None else None
        y = _conv_reference(inputs[0], inputs[1], b, seq_idx, silu_activation)
        return torch.autograd.grad(y, [*inputs] + ([b] if b is not None else []), dout.float())
    grads = with_autograd(grads)
    dx.copy_(grads[0])
    dweight.copy_(grads[1])
    if dbias is not None:
        dbias.copy_(grads[2])


# ---- mamba-ssm: csrc/selective_scan/selective_scan.cpp -------------------------------------

def _scan_checks(u, delta, A, B, C, D, z, delta_bias) -> None:
    check(u.dtype in FLOATS and A.dtype == torch.float32, "selective_scan: u float/half/bf16, A float32")
    check(delta.dtype == u.dtype, "selective_scan: delta must have u's dtype")
    check(B.dim() >= 3 and B.dtype == u.dtype and C.dim() >= 3 and C.dtype == u.dtype,
          "selective_scan: variable B and C must have u's dtype")
    check(u.stride(-1) == 1 and delta.stride(-1) == 1, "selective_scan: u and delta must be contiguous in time")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    check(dstate <= 256, "selective_scan only supports state dimension <= 256")
    check_shape(delta, batch, dim, seqlen, name="delta")
    check_shape(A, dim, dstate, name="A")
    for name, t in (("B", B), ("C", C)):
        check_shape(t, batch, t.shape[1], dstate, seqlen, name=name)
        check(t.stride(-1) == 1, f"selective_scan: {name} must be contiguous in time")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check(t.dtype == torch.float32 and t.stride(-1) == 1, f"selective_scan: {name} must be float32")
            check_shape(t, dim, name=name)
    if z is not None:
        check(z.dtype == u.dtype and z.stride(-1) == 1, "selective_scan: z dtype/stride")
        check_shape(z, batch, dim, seqlen, name="z")


def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = delta.float() + (delta_bias.view(-1, 1) if delta_bias is not None else 0)
    delta = F.softplus(delta) if delta_softplus else delta
    y, last = selective_scan_naive(u.float().transpose(1, 2), delta.transpose(1, 2), A,
                                   B[:, 0].float().transpose(1, 2), C[:, 0].float().transpose(1, 2))
    y = y.transpose(1, 2)
    if D is not None:
        y = y + D.view(-1, 1) * u.float()
    out_z = y * F.silu(z.float()) if z is not None else None
    return y, last, out_z


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *rest):
    _scan_checks(u, delta, A, B, C, D, z, delta_bias)
    y, last, out_z = _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    n_chunks = math.ceil(u.shape[2] / 2048)
    x = torch.zeros(u.shape[0], u.shape[1], n_chunks, 2 * A.shape[1], dtype=A.dtype)
    x[:, :, -1, 1::2] = last                   # the wrapper reads the last state from here
    result = [y.to(u.dtype), x]
    if z is not None:
        result.append(out_z.to(u.dtype))
    return result


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    _scan_checks(u, delta, A, B, C, D, z, delta_bias)
    check(dout.dtype == u.dtype and dout.stride(-1) == 1, "selective_scan: dout dtype/stride")
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    values = [t.detach().float().requires_grad_() if t is not None else None
              for t in (u, delta, A, B, C, D, z, delta_bias)]
    wrt = [v for v in values if v is not None]

    def differentiate():
        y, _, out_z = _scan_reference(*values, delta_softplus)
        return torch.autograd.grad(out_z if z is not None else y, wrt, dout.float(), allow_unused=True)
    grads = dict(zip([n for n, v in zip(names, values) if v is not None], with_autograd(differentiate)))
    same = lambda name, like: (grads[name] if grads[name] is not None else torch.zeros_like(values[names.index(name)])).to(like.dtype)
    result = [same("u", u), same("delta", delta), same("A", A), same("B", B), same("C", C),
              same("D", D) if D is not None else None, same("delta_bias", delta_bias) if delta_bias is not None else None]
    if z is not None:
        result.append(same("z", z))
    return result


# ---- flash-attn: csrc/flash_attn/flash_api.cpp (mha_varlen_fwd / mha_varlen_bwd) -----------

def _attn_checks(q, k, v, cu_seqlens_q, cu_seqlens_k) -> None:
    check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
    check(cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32, "cu_seqlens must have dtype int32")
    check(cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous(), "cu_seqlens must be contiguous")
    for t in (q, k, v):
        check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    total_q, heads, head_size = q.shape
    batch = cu_seqlens_q.numel() - 1
    check(batch > 0, "batch size must be positive")
    check(head_size <= 256 and v.shape[-1] <= 256, "FlashAttention forward only supports head dimension at most 256")
    check(head_size % 8 == 0, "head dimension must be a multiple of 8 (the Python wrapper pads it)")
    check(heads % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query")
    check_shape(k, k.shape[0], k.shape[1], head_size, name="k")
    check_shape(v, k.shape[0], k.shape[1], v.shape[-1], name="v")
    check_shape(cu_seqlens_q, batch + 1, name="cu_seqlens_q")
    check_shape(cu_seqlens_k, batch + 1, name="cu_seqlens_k")
    check(int(cu_seqlens_q[-1]) == total_q and int(cu_seqlens_k[-1]) == k.shape[0], "cu_seqlens must end at the totals")


def _attn_reference(q, k, v, cu_q, cu_k, scale, causal, window_left, window_right):
    seq_q = torch.repeat_interleave(torch.arange(cu_q.numel() - 1), (cu_q[1:] - cu_q[:-1]).long())
    seq_k = torch.repeat_interleave(torch.arange(cu_k.numel() - 1), (cu_k[1:] - cu_k[:-1]).long())
    # position within the sequence, the query aligned to the end of its keys (bottom-right)
    pos_q = torch.arange(q.shape[0]) - cu_q.long()[seq_q] + (cu_k[1:] - cu_k[:-1] - (cu_q[1:] - cu_q[:-1])).long()[seq_q]
    pos_k = torch.arange(k.shape[0]) - cu_k.long()[seq_k]
    offset = pos_k[None, :] - pos_q[:, None]
    visible = seq_q[:, None] == seq_k[None, :]
    if causal:
        window_right = 0
    if window_right >= 0:
        visible &= offset <= window_right
    if window_left >= 0:
        visible &= offset >= -window_left
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out, torch.logsumexp(scores.masked_fill(~visible, -math.inf), dim=-1)


def varlen_fwd(q, k, v, out_, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
               max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
               window_size_right, softcap, return_softmax, gen):
    _attn_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check(block_table is None and alibi_slopes is None and p_dropout == 0.0, "stand-in: no paging, alibi, dropout")
    out, lse = _attn_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, is_causal,
                               window_size_left, window_size_right)
    return [out.to(q.dtype), lse, torch.empty(0, dtype=q.dtype), torch.empty(2, dtype=torch.int64)]


def varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
               max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
               window_size_right, softcap, deterministic, gen, rng_state):
    _attn_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check(dout.dtype == q.dtype and dout.stride(-1) == 1, "dout must have q's dtype and a contiguous last dimension")
    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]

    def differentiate():
        ref, _ = _attn_reference(*inputs, cu_seqlens_q, cu_seqlens_k, softmax_scale, is_causal,
                                 window_size_left, window_size_right)
        return torch.autograd.grad(ref, inputs, dout.float())
    grads = with_autograd(differentiate)
    for target, grad in zip((dq, dk, dv), grads):
        target.copy_(grad)
    return [dq, dk, dv, torch.zeros_like(softmax_lse)]


# ---- installation -----------------------------------------------------------------------------

def install() -> None:
    """Put the stand-ins where the libraries import their extensions, import the libraries, let
    flash-attn's CUDA-only custom ops run on CPU, and let model.kernels send "cuda" kernels CPU tensors."""
    from model import kernels

    modules = {
        "causal_conv1d_cuda": dict(causal_conv1d_fwd=causal_conv1d_fwd, causal_conv1d_bwd=causal_conv1d_bwd),
        "selective_scan_cuda": dict(fwd=selective_scan_fwd, bwd=selective_scan_bwd),
        "flash_attn_2_cuda": dict(varlen_fwd=varlen_fwd, varlen_bwd=varlen_bwd),
    }
    for name, functions in modules.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(functions)
            sys.modules[name] = module
    import causal_conv1d  # noqa: F401
    import flash_attn.flash_attn_interface as flash_interface
    import mamba_ssm.ops.selective_scan_interface  # noqa: F401

    for op in (flash_interface._flash_attn_varlen_forward, flash_interface._flash_attn_varlen_backward):
        if not getattr(op, "_braid_cpu", False):
            op.register_kernel("cpu")(op._init_fn)
            op._braid_cpu = True
    kernels.kernel_importable.cache_clear()
    kernels.CPU_RUNTIMES.add("cuda")
