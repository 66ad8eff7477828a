"""Model FLOPs per token and MFU for Braid's hybrid models.

Counting rules
--------------
* 2 FLOPs per multiply-add. Biases, norms, activations (silu, gelu, softmax, softplus,
  exp of a gate) and residual adds are not counted, except the handful of elementwise
  FLOPs per state element / channel that a recurrent scan does (listed below).
* Per sublayer, forward, per token, split into
    "matmul": every projection weight (2 * in * out per nn.Linear weight; the RG-LRU's
              block-diagonal gate weights are matmuls too and counted here);
    "mixer":  the sequence-mixing work: attention scores and values, the scans / chunked
              linear attention, the depthwise causal convs.
* Model = sum over sublayers + LM head (2 * d_model * vocab). Embedding lookups are free.
* training=True multiplies the forward by 3 (backward = 2 x forward), the standard MFU
  convention (PaLM appendix B, Megatron): activation recomputation is NOT counted, so
  MFU does not reward recomputing.
* MFU = tokens_per_s * model_flops_per_token(training=True) / peak_flops.

Per-token forward FLOPs, per sublayer (d = d_model, T = seq_len)
----------------------------------------------------------------
===========  ===============================================  ==========================================
kind         matmul                                            mixer
===========  ===============================================  ==========================================
mlp  `-`     2 * 3 * d * mlp_hidden (relu2, ungated: 2 * 2 *)   0
attention    2 * d * hd * (2 * n_heads + 2 * n_kv_heads)       4 * n_heads * hd * keys(T)
  `*`        (q, k, v, o)                                      keys = (T + 1) / 2  (causal, diagonal incl.)
swa `S`      same as attention                                 4 * n_heads * hd * keys, keys = mean over
                                                               t < T of min(t + 1, W) (exact)
mamba v1     2 * (d * 2E + E * (R + 2N) + R * E + E * d)       E * (2K + 7N + 4)
  `M`        (in_proj, x_proj, dt_proj, out_proj)              conv 2K; scan 7 per state element:
                                                               dt*A, exp, dA*h, B*(dt x), +, C.h (2);
                                                               per channel: dt*x, D*x + y (2), * silu(z)
mamba v2     2 * (d * (2E + 2GN + H) + E * d)                  2 * conv_dim * K + 4 * E
  `M`        (in_proj, out_proj)                               + H * ssd(c, N, P)  (chunked SSD, below)
gla `G`      2 * (d * (2Dk + 2Dv) + d * r + r * Dk + Dv * d)   H * gla(c, Dk/H, Dv/H) + Dv (output gate)
             (q, k, v, g, gk_down, gk_up, o)
rglru `R`    2 * 3 * d * w + 2 * 2 * w * (w / n_heads)         2 * w * K + 9 * w
             (linear_x, linear_y, linear_out, 2 gates)         (conv; scan: c*r*softplus 2, sqrt(1-a^2)
                                                               2, x*i*mult 2, a*h + drive 2, * y 1)
===========  ===============================================  ==========================================

E = d_inner, N = d_state, K = d_conv, R = dt_rank, G = n_groups, H = heads, P = head_dim,
conv_dim = E + 2GN, hd = attention head_dim, r = gla.gate_low_rank_dim, w = RG-LRU width.

Chunked linear attention (model/ops/linear_attention.py), per head and real token, with
effective chunk c = min(chunk_size, ceil(T / 8) * 8) and the padding of the last chunk
counted (factor ceil(T / c) * c / T); key dim Kd, value dim Vd:
    inter-chunk: chunk state update k^T v (2 Kd Vd), read-out q S_in (2 Kd Vd), state
                 recurrence (2 Kd Vd / c);
    ssd (scalar decay, Mamba-2): full c x c blocks as the code computes them (masked after
                 the matmul): q k^T 2 c Kd, (* decay) c, @ v 2 c Vd;
    gla (per-key decay): sub-chunks of s = gcd(c, 8); diagonal s x s blocks with the decay
                 tensor: 3 s Kd + 2 s Vd; blocks below the diagonal: (c/s - 1) s (Kd + Vd).
The CUDA kernels (mamba_ssm, fla) do the same dominant matmuls; the count is of the
model's algorithm, not of one kernel's bookkeeping.

Attention convention: causal half, as in the PaLM / Megatron MFU accounting; we use the
exact causal average (T + 1) / 2 keys per query, so for a pure Transformer
    training FLOPs/token = 6 * N_matmul + 6 * n_attn_layers * (T + 1) * n_heads * hd
where N_matmul counts every linear weight including the LM head (tied or not).
"""
from __future__ import annotations

import math
import re

from model.config import ModelConfig

# Scan bookkeeping (see the module docstring).
MAMBA1_SCAN_FLOPS_PER_STATE = 7
MAMBA1_FLOPS_PER_CHANNEL = 4       # dt * x, D * x + y, * silu(z)
MAMBA2_FLOPS_PER_CHANNEL = 4       # dt * x, D * x + y, * silu(z)
RGLRU_FLOPS_PER_CHANNEL = 9
SUB_CHUNK = 8                      # model.ops.linear_attention.SUB_CHUNK

# Dense (no sparsity) BF16 tensor-core peak per device, FLOP/s.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    # NVIDIA H100 datasheet (Tensor Core GPU, SXM5): BF16 1,979 TFLOPS with sparsity -> 989.4 dense
    "H100 SXM": 989e12,
    # NVIDIA H100 datasheet, PCIe form factor: BF16 1,513 TFLOPS with sparsity -> 756 dense
    "H100 PCIe": 756e12,
    # NVIDIA H100 datasheet, H100 NVL: BF16 1,671 TFLOPS with sparsity -> 835 dense
    "H100 NVL": 835e12,
    # NVIDIA H200 datasheet (SXM): BF16 1,979 TFLOPS with sparsity -> 989 dense (same die as H100 SXM)
    "H200": 989e12,
    # NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike
    "A100": 312e12,
}


def device_peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak for a `torch.cuda.get_device_name()` string; None when unknown (e.g. CPU).

    >>> device_peak_flops("NVIDIA H100 80GB HBM3") / 1e12
    989.0
    >>> device_peak_flops("cpu") is None
    True
    """
    name = device_name.upper()
    if re.search(r"\bH100\b", name):
        if "PCIE" in name:
            return DEVICE_PEAK_FLOPS["H100 PCIe"]
        if "NVL" in name:
            return DEVICE_PEAK_FLOPS["H100 NVL"]
        return DEVICE_PEAK_FLOPS["H100 SXM"]          # "NVIDIA H100 80GB HBM3" is the SXM part
    if re.search(r"\bH200\b", name):
        return DEVICE_PEAK_FLOPS["H200"]
    if re.search(r"\bA100\b", name):
        return DEVICE_PEAK_FLOPS["A100"]
    return None


# ---- helpers --------------------------------------------------------------

def _linear(n_in: int, n_out: int) -> float:
    return 2.0 * n_in * n_out


def causal_keys(seq_len: int, window: int | None = None) -> float:
    """Average number of keys a query attends to: mean over t < seq_len of min(t + 1, window)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    w = seq_len if window is None else min(window, seq_len)
    # tokens t < w see t + 1 keys; the remaining seq_len - w tokens see w keys each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _chunking(seq_len: int, chunk_size: int) -> tuple[int, float]:
    """(effective chunk, padding factor) as chunk_linear_attention pads and chunks."""
    size = min(chunk_size, -(-seq_len // SUB_CHUNK) * SUB_CHUNK)
    n_chunks = -(-seq_len // size)
    return size, n_chunks * size / seq_len


def _inter_chunk(c: int, dk: int, dv: int) -> float:
    return 2 * dk * dv + 2 * dk * dv + 2 * dk * dv / c


def ssd_flops_per_head(seq_len: int, chunk_size: int, dk: int, dv: int) -> float:
    """Scalar-decay chunked linear attention (Mamba-2), per head and real token."""
    c, pad = _chunking(seq_len, chunk_size)
    intra = 2 * c * dk + c + 2 * c * dv
    return pad * (_inter_chunk(c, dk, dv) + intra)


def gla_flops_per_head(seq_len: int, chunk_size: int, dk: int, dv: int) -> float:
    """Per-key-decay chunked linear attention (GLA), per head and real token."""
    c, pad = _chunking(seq_len, chunk_size)
    s = math.gcd(c, SUB_CHUNK)
    diagonal = 3 * s * dk + 2 * s * dv
    below = (c // s - 1) * s * (dk + dv)
    return pad * (_inter_chunk(c, dk, dv) + diagonal + below)


# ---- public API -------------------------------------------------------------

def sublayer_flops(cfg: ModelConfig, kind: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one sublayer of `kind`, as {"matmul": ..., "mixer": ...}."""
    d = cfg.d_model
    if kind == "mlp":
        projections = 3 if cfg.mlp_activation == "swiglu" else 2       # relu2 has no gate_proj
        return {"matmul": projections * _linear(d, cfg.mlp_hidden), "mixer": 0.0}
    if kind in ("attention", "swa"):
        hd, nh, nkv = cfg.head_dim, cfg.attn.n_heads, cfg.n_kv_heads
        matmul = _linear(d, nh * hd) + 2 * _linear(d, nkv * hd) + _linear(nh * hd, d)
        keys = causal_keys(seq_len, cfg.attn.window if kind == "swa" else None)
        return {"matmul": matmul, "mixer": 2 * 2 * nh * hd * keys}
    if kind == "mamba" and cfg.mamba.version == 1:
        m, e, r = cfg.mamba, cfg.d_inner, cfg.dt_rank
        matmul = _linear(d, 2 * e) + _linear(e, r + 2 * m.d_state) + _linear(r, e) + _linear(e, d)
        mixer = e * (2 * m.d_conv + MAMBA1_SCAN_FLOPS_PER_STATE * m.d_state + MAMBA1_FLOPS_PER_CHANNEL)
        return {"matmul": matmul, "mixer": float(mixer)}
    if kind == "mamba":
        m, e, h = cfg.mamba, cfg.d_inner, cfg.mamba2_heads
        matmul = _linear(d, 2 * e + 2 * m.n_groups * m.d_state + h) + _linear(e, d)
        conv_dim = e + 2 * m.n_groups * m.d_state
        mixer = (2 * conv_dim * m.d_conv + MAMBA2_FLOPS_PER_CHANNEL * e
                 + h * ssd_flops_per_head(seq_len, m.chunk_size, m.d_state, m.head_dim))
        return {"matmul": matmul, "mixer": float(mixer)}
    if kind == "gla":
        g = cfg.gla
        dk, dv = int(d * g.expand_k), int(d * g.expand_v)
        matmul = (2 * _linear(d, dk) + 2 * _linear(d, dv) + _linear(d, g.gate_low_rank_dim)
                  + _linear(g.gate_low_rank_dim, dk) + _linear(dv, d))
        mixer = g.n_heads * gla_flops_per_head(seq_len, g.chunk_size, dk // g.n_heads, dv // g.n_heads) + dv
        return {"matmul": matmul, "mixer": float(mixer)}
    if kind == "rglru":
        w, r = cfg.rglru_width, cfg.rglru
        matmul = 2 * _linear(d, w) + _linear(w, d) + 2 * 2 * w * (w // r.n_heads)
        return {"matmul": matmul, "mixer": float(2 * w * r.d_conv + RGLRU_FLOPS_PER_CHANNEL * w)}
    raise ValueError(f"unknown sublayer kind {kind!r}")


def model_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs per token of the whole model at `seq_len`; x3 for a training step (fwd + bwd)."""
    forward = _linear(cfg.d_model, cfg.vocab_size)                  # LM head
    for kind in cfg.layer_types:
        parts = sublayer_flops(cfg, kind, seq_len)
        forward += parts["matmul"] + parts["mixer"]
    return 3.0 * forward if training else forward


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s * training FLOPs/token / peak FLOP/s (of the same devices)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops}: must be positive")
    return tokens_per_s * model_flops_per_token(cfg, seq_len, training=True) / peak_flops
