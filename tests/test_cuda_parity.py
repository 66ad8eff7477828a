"""Every CUDA fast path against the PyTorch reference on random inputs (bf16 tolerance). Skips without a GPU."""
import pytest
import torch

from conftest import small_preset
from model import HybridLM
from model.kernels import KERNEL_LIBRARIES, kernel_importable
from model.layers import build_mixer
from model.layers.common import LinearSpec
from model.sequence import sequence_info

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# sublayer kind (and Mamba version) -> the libraries its fast path needs
FAST_PATHS = {
    ("mamba", 1): ("mamba_ssm", "causal_conv1d"),
    ("mamba", 2): ("mamba_ssm", "causal_conv1d"),
    ("gla", 1): ("fla",),
    ("swa", 1): ("flash_attn",),
    ("attention", 1): ("flash_attn",),
}


def bf16_close(fast: torch.Tensor, ref: torch.Tensor, tol: float = 3e-2) -> None:
    err = ((fast.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("kind, version", list(FAST_PATHS))
@pytest.mark.parametrize("length", [256, 1000])
def test_fast_path_matches_reference(kind, version, length):
    missing = [lib for lib in FAST_PATHS[kind, version] if not kernel_importable(lib)]
    if missing:
        pytest.skip(f"not installed: {', '.join(KERNEL_LIBRARIES[m][1] for m in missing)}")
    cfg = small_preset("tiny", d_model=256, attn=dict(n_heads=4, n_kv_heads=2, window=128),
                       mamba=dict(version=version, head_dim=64, d_state=16, n_groups=2, chunk_size=64),
                       gla=dict(n_heads=4, chunk_size=64))
    fast = build_mixer(kind, cfg.replace(kernels="cuda"), LinearSpec()).cuda().bfloat16()
    ref = build_mixer(kind, cfg.replace(kernels="reference"), LinearSpec()).cuda().bfloat16()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, length, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    seq = sequence_info((2, length), x.device)
    y, y_ref = fast(x, seq), ref(x_ref, seq)
    bf16_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    bf16_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        if p.grad is not None:
            bf16_close(p.grad, p_ref.grad, tol=5e-2)


def test_whole_model_kernels_auto_matches_reference_and_decodes():
    cfg = small_preset("tiny", d_model=256, attn=dict(n_heads=4, window=64))
    fast = HybridLM(cfg.replace(kernels="auto")).cuda().bfloat16().eval()
    ref = HybridLM(cfg.replace(kernels="reference")).cuda().bfloat16().eval()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        bf16_close(fast(ids), ref(ids))
        cache = fast.new_cache()
        steps = [fast(ids[:, :200], cache=cache)] + [fast(ids[:, t:t + 1], cache=cache) for t in range(200, 300)]
        bf16_close(torch.cat(steps, 1), ref(ids))
