"""Every CUDA fast path against the PyTorch reference on packed rows, as training runs them (bf16
tolerance). Skips without a GPU; `tests/test_kernels.py` checks the same glue on CPU."""
import pytest
import torch

from conftest import small_preset
from model import HybridLM
from model.kernels import REFERENCE, bypasses
from model.layers import build_mixer
from model.layers.common import LinearSpec
from model.sequence import sequence_info

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BLOCKS = [("mamba", {}), ("mamba", {"mamba": {"version": 2}}), ("mamba", {"mamba": {"packed_resets": "flow"}}),
          ("gla", {}), ("rglru", {}), ("swa", {}), ("attention", {})]


def bf16_close(fast: torch.Tensor, ref: torch.Tensor, tol: float = 3e-2) -> None:
    err = ((fast.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < tol, err


def packed_doc_ids(batch: int, length: int) -> torch.Tensor:
    """Rows of several documents (one of a single token), as the loader packs them."""
    cuts = torch.tensor([0, length // 3, length // 3 + 1, length // 2])
    return (torch.arange(length)[None, :] >= cuts[:, None]).sum(0).expand(batch, -1).cuda()


@pytest.mark.parametrize("kind, changes", BLOCKS)
@pytest.mark.parametrize("length", [256, 1000])
def test_fast_path_matches_reference_on_packed_rows(kind, changes, length):
    cfg = small_preset("tiny", d_model=256, attn=dict(n_heads=4, n_kv_heads=2, window=128),
                       mamba=dict(head_dim=64, d_state=16, n_groups=2, chunk_size=64),
                       gla=dict(n_heads=4, chunk_size=64)).replace(**changes)
    fast = build_mixer(kind, cfg.replace(kernels="cuda"), LinearSpec()).cuda()
    ref = build_mixer(kind, cfg.replace(kernels="reference"), LinearSpec()).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, length, 256, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    seq = sequence_info((2, length), x.device, packed_doc_ids(2, length))
    with torch.autocast("cuda", dtype=torch.bfloat16):      # as training runs (pretrain/train.py)
        y, y_ref = fast(x, seq), ref(x_ref, seq)
    assert REFERENCE not in fast.dispatch.values(), fast.dispatch
    bf16_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    bf16_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        if p.grad is not None:
            bf16_close(p.grad, p_ref.grad, tol=5e-2)


def test_whole_model_packed_step_on_kernels_and_decoding():
    cfg = small_preset("tiny", d_model=256, attn=dict(n_heads=4, window=64))
    fast = HybridLM(cfg.replace(kernels="cuda")).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast(ids, doc_ids=packed_doc_ids(2, 300)).float().logsumexp(-1).mean().backward()
    assert bypasses(fast.dispatch_record()) == {}
    auto = HybridLM(cfg.replace(kernels="auto")).cuda().bfloat16().eval()
    ref = HybridLM(cfg.replace(kernels="reference")).cuda().bfloat16().eval()
    ref.load_state_dict(auto.state_dict())
    with torch.no_grad():
        bf16_close(auto(ids), ref(ids))
        cache = auto.new_cache()
        steps = [auto(ids[:, :200], cache=cache)] + [auto(ids[:, t:t + 1], cache=cache) for t in range(200, 300)]
        bf16_close(torch.cat(steps, 1), ref(ids))
