"""The GPU glue checked on CPU (`make test-kernels`): Braid's blocks on packed rows through every fast path.

Triton kernels (fla-core's chunk_gla / chunk_simple_gla / fused_recurrent_hgrn / causal_conv1d,
Braid's selective scan) run under Triton's CPU interpreter; the CUDA C++ kernels (causal-conv1d,
mamba-ssm's selective_scan_fn, flash-attn's varlen attention) run as stand-ins with their real
argument checks (tests/kernel_standins.py) behind the libraries' real Python wrappers; FlexAttention
runs eagerly (forward only: it has no CPU backward). Every block runs with model.kernels=cuda, so a
fallback to the reference path would raise; outputs, input and parameter gradients and the final
states a cache keeps are compared with each document run alone on the reference path.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import small_preset
from model import HybridLM, KernelUnavailable
from model import kernels as kernel_dispatch
from model.kernels import REFERENCE, bypasses, kernel_importable
from model.layers import build_mixer
from model.layers.common import LinearSpec
from model.sequence import sequence_info

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1: make test-kernels"),
    pytest.mark.skipif(INTERPRETER and not all(map(kernel_importable, ("fla", "triton"))),
                       reason="needs the cuda extra: make test-kernels installs it"),
]

# two rows of 24 tokens: documents of 7, 1 and 16 tokens, and one document (a row start resets too)
LENGTHS = [[7, 1, 16], [24]]
D_MODEL = 32


@pytest.fixture(scope="module", autouse=True)
def _kernels_on_cpu():
    import kernel_standins
    import triton_interpreter
    triton_interpreter.apply_workarounds()
    kernel_standins.install()
    yield


@pytest.fixture
def runtimes(monkeypatch):
    """Which non-Triton runtimes take CPU tensors in this test (the stand-ins: "cuda"; FlexAttention: "torch")."""
    def use(*names: str) -> None:
        monkeypatch.setattr(kernel_dispatch, "CPU_RUNTIMES", set(names))
    use()
    return use


def doc_ids() -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in LENGTHS])


def block_config(kind: str, **changes):
    cfg = small_preset("tiny", d_model=D_MODEL, attn=dict(n_heads=2, n_kv_heads=1, window=6),
                       gla=dict(n_heads=2, chunk_size=16), rglru=dict(n_heads=2),
                       mamba=dict(d_state=8, head_dim=16, n_groups=2, chunk_size=16))
    return cfg.replace(**changes)


def run_block(block, x: torch.Tensor, seq, grad: torch.Tensor, cache=None):
    x = x.detach().clone().requires_grad_()
    block.zero_grad()
    y = block(x, seq, cache)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


def documents_alone(block, x: torch.Tensor, grad: torch.Tensor):
    """Each document of each row through the reference block alone: outputs and input gradients
    put back in place, parameter gradients summed (a packed row's loss is the documents' sum)."""
    out, x_grad, param_grads = torch.zeros_like(x), torch.zeros_like(x), {}
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            piece = slice(start, start + n)
            y, gx, gp = run_block(block, x[b:b + 1, piece], sequence_info((1, n), x.device), grad[b:b + 1, piece])
            out[b, piece], x_grad[b, piece] = y[0], gx[0]
            for name, g in gp.items():
                param_grads[name] = param_grads.get(name, 0) + g
            start += n
    return out, x_grad, param_grads


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def compare_with_documents_alone(kind: str, cfg, tol: float = 1e-4, half: bool = False) -> dict[str, str]:
    torch.manual_seed(0)
    fast = build_mixer(kind, cfg.replace(kernels="cuda"), LinearSpec())
    reference = build_mixer(kind, cfg.replace(kernels="reference"), LinearSpec())
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(len(LENGTHS), sum(LENGTHS[0]), D_MODEL)
    grad = torch.randn_like(x)
    seq = sequence_info(tuple(x.shape[:2]), x.device, doc_ids())
    y, x_grad, param_grads = run_block(fast, x, seq, grad)
    y_alone, x_grad_alone, param_grads_alone = documents_alone(reference, x, grad)
    assert_close(y, y_alone, tol, f"{kind} output")
    assert_close(x_grad, x_grad_alone, tol, f"{kind} input gradient")
    assert set(param_grads) == set(param_grads_alone)
    for name, g in param_grads.items():
        assert_close(g, param_grads_alone[name], tol * (10 if half else 1), f"{kind} gradient of {name}")
    assert REFERENCE not in fast.dispatch.values(), fast.dispatch
    return dict(fast.dispatch)


# ---- Triton kernels (interpreter) -----------------------------------------------------------------

@pytest.mark.parametrize("kind, changes, expected", [
    ("mamba", {}, {"conv": "fla.causal_conv1d", "scan": "braid.selective_scan_triton"}),
    ("mamba", {"mamba": {"version": 2}}, {"conv": "fla.causal_conv1d", "scan": "fla.chunk_simple_gla"}),
    ("gla", {}, {"scan": "fla.chunk_gla"}),
    ("rglru", {}, {"conv": "fla.causal_conv1d", "scan": "fla.fused_recurrent_hgrn"}),
])
def test_packed_rows_on_triton_kernels_equal_documents_alone(kind, changes, expected, runtimes):
    assert compare_with_documents_alone(kind, block_config(kind, **changes)) == expected


@pytest.mark.parametrize("kind, changes", [("mamba", {}), ("mamba", {"mamba": {"version": 2}}), ("gla", {}),
                                           ("rglru", {})])
def test_prefill_on_kernels_leaves_the_reference_cache(kind, changes, runtimes):
    """A prefill (empty cache) runs on the kernels and leaves the state and conv tail of each row's
    last document, as the reference path does; decoding then continues it on the reference step."""
    cfg = block_config(kind, **changes)
    torch.manual_seed(0)
    fast = build_mixer(kind, cfg.replace(kernels="auto"), LinearSpec()).eval()
    reference = build_mixer(kind, cfg.replace(kernels="reference"), LinearSpec()).eval()
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(len(LENGTHS), 24, D_MODEL)
    seq = sequence_info((len(LENGTHS), 24), x.device, doc_ids())
    caches = fast.empty_cache(), reference.empty_cache()
    with torch.no_grad():
        assert_close(fast(x, seq, caches[0]), reference(x, seq, caches[1]), 1e-4, "prefill output")
        assert_close(caches[0].state, caches[1].state, 1e-4, "final state")
        if caches[1].conv is not None:
            assert_close(caches[0].conv, caches[1].conv, 1e-6, "conv tail")
        assert REFERENCE not in fast.dispatch.values()
        step = torch.randn(len(LENGTHS), 1, D_MODEL)
        after = sequence_info((len(LENGTHS), 1), x.device, offset=seq.positions[:, -1] + 1)
        assert_close(fast(step, after, caches[0]), reference(step, after, caches[1]), 1e-4, "decode step")
    assert fast.dispatch["scan"] == REFERENCE and "cache continuation" in fast.dispatch.reasons["scan"]


def test_triton_selective_scan_matches_the_reference_in_float64_shapes():
    """Braid's own kernel on odd sizes (channels and states not powers of two, several chunks)."""
    from model.ops import triton_selective_scan as tss
    from model.ops.selective_scan import selective_scan_naive
    torch.manual_seed(0)
    B, L, D, N = 2, 150, 40, 5                        # 3 chunks of 64, 2 channel blocks
    x, B_, C = torch.randn(B, L, D), torch.randn(B, L, N), torch.randn(B, L, N)
    dt, A = torch.rand(B, L, D) * 0.5, -torch.rand(D, N) - 0.5
    reset = torch.rand(B, L) < 0.05
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B_, C)]
    y, h = tss.selective_scan_triton(*inputs, reset)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    ((y * gy).sum() + (h * gh).sum()).backward()
    reference = [t.double().requires_grad_() for t in (x, dt, A, B_, C)]
    y_ref, h_ref = selective_scan_naive(*reference, reset=reset)
    ((y_ref * gy.double()).sum() + (h_ref * gh.double()).sum()).backward()
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(h, h_ref, 1e-5, "final state")
    for name, a, b in zip(("x", "dt", "A", "B", "C"), inputs, reference):
        assert_close(a.grad, b.grad, 1e-5, f"grad {name}")


# ---- CUDA C++ kernels (stand-ins) and FlexAttention ----------------------------------------------

@pytest.mark.parametrize("kind", ["swa", "attention"])
def test_packed_rows_on_flash_attn_equal_documents_alone(kind, runtimes):
    runtimes("cuda")
    # flash-attn computes in bf16: the tolerance is bf16's
    assert compare_with_documents_alone(kind, block_config(kind, attn=dict(head_dim=16)), tol=2e-2, half=True) == \
        {"attention": "flash_attn.varlen"}


@pytest.mark.parametrize("kind", ["swa", "attention"])
def test_packed_rows_on_flex_attention_equal_documents_alone_forward(kind, runtimes):
    runtimes("torch")
    cfg = block_config(kind)
    torch.manual_seed(0)
    fast = build_mixer(kind, cfg.replace(kernels="cuda"), LinearSpec())
    reference = build_mixer(kind, cfg.replace(kernels="reference"), LinearSpec())
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(len(LENGTHS), 24, D_MODEL)
    with torch.no_grad():
        y = fast(x, sequence_info((len(LENGTHS), 24), x.device, doc_ids()))
        for b, row in enumerate(LENGTHS):
            start = 0
            for n in row:
                piece = x[b:b + 1, start:start + n]
                assert_close(y[b, start:start + n], reference(piece, sequence_info((1, n), x.device))[0], 1e-5,
                             "flex output")
                start += n
    assert fast.dispatch == {"attention": "torch.flex_attention"}


@pytest.mark.parametrize("version", [1, 2])
def test_packed_rows_on_causal_conv1d_equal_documents_alone(version, runtimes):
    """causal-conv1d's channel-last call with seq_idx (Mamba-1 exact; Mamba-2's in_proj slice)."""
    runtimes("cuda")
    cfg = block_config("mamba", mamba=dict(version=version))
    assert compare_with_documents_alone("mamba", cfg)["conv"] == "causal_conv1d"


def test_flow_runs_selective_scan_fn_and_lets_states_cross_documents(runtimes):
    """packed_resets=flow: a training row is one sequence for Mamba-1, on mamba-ssm's selective_scan_fn;
    it equals the reference path in flow mode, and differs from the documents alone."""
    runtimes("cuda")
    cfg = block_config("mamba", mamba=dict(packed_resets="flow"))
    torch.manual_seed(0)
    fast = build_mixer("mamba", cfg.replace(kernels="cuda"), LinearSpec())
    reference = build_mixer("mamba", cfg.replace(kernels="reference"), LinearSpec())
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(len(LENGTHS), 24, D_MODEL)
    grad = torch.randn_like(x)
    seq = sequence_info(tuple(x.shape[:2]), x.device, doc_ids())
    got, want = run_block(fast, x, seq, grad), run_block(reference, x, seq, grad)
    assert fast.dispatch == {"conv": "causal_conv1d", "scan": "mamba_ssm.selective_scan_fn"}
    for a, b, what in zip(got[:2], want[:2], ("output", "input gradient")):
        assert_close(a, b, 1e-4, what)
    for name, g in got[2].items():
        assert_close(g, want[2][name], 1e-4, f"gradient of {name}")
    alone = documents_alone(reference, x, grad)[0]
    assert (got[0][0, 7:] - alone[0, 7:]).abs().max() > 1e-3          # the state ran on into documents 2 and 3


# ---- whole models: a packed training step of every preset --------------------------------------

@pytest.mark.parametrize("name", ["tiny", "samba-421m", "samba-1.3b", "griffin", "mamba2-hybrid"])
def test_packed_training_step_of_every_preset_runs_every_sublayer_on_a_kernel(name, runtimes):
    runtimes("cuda")                       # stand-ins for the C++ kernels, Triton under the interpreter
    cfg = small_preset(name, d_model=32, mlp_hidden=48,
                       attn=dict(n_heads=2, n_kv_heads=1, head_dim=16, window=6),
                       mamba=dict(d_state=8, head_dim=16, n_groups=2, chunk_size=16),
                       gla=dict(n_heads=2, chunk_size=16), rglru=dict(n_heads=2))
    torch.manual_seed(0)
    fast, reference = HybridLM(cfg.replace(kernels="cuda")), HybridLM(cfg.replace(kernels="reference"))
    reference.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    losses = []
    for model in (fast, reference):
        logits = model(ids[:, :-1], doc_ids=doc_ids())
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    record = fast.dispatch_record()
    assert bypasses(record) == {}, record
    assert len(record) == sum(kind != "mlp" for kind in cfg.layer_types)
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[1]          # attention in bf16 on flash-attn
    for (n, p), q in zip(fast.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, 5e-2, f"gradient of {n}")


def test_deepspeed_training_step_on_loader_batches_runs_every_sublayer_on_a_kernel(shards, tmp_path, runtimes):
    """The real step: ParallelEngine.train_step (DeepSpeed, ZeRO-1) on the training loader's packed
    batches (two documents per row), model.kernels=cuda, every sublayer kind of the tiny preset."""
    runtimes("cuda")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from data_pipeline.streaming import LoaderConfig, StreamSource, build_train_loader
    from pretrain.config import train_config
    from pretrain.parallel import Layout, ParallelEngine
    from pretrain.train import deepspeed_config, init_distributed
    cfg = train_config({"run_dir": str(tmp_path / "run"), "data": {"train": [shards], "seq_len": 32, "micro_batch": 2},
                        "model": {"preset": "tiny", "vocab_size": 256, "d_model": 32, "mlp_hidden": 48, "kernels": "cuda",
                                  "attn": {"window": 8, "head_dim": 16, "n_heads": 2, "n_kv_heads": 1},
                                  "gla": {"chunk_size": 16, "n_heads": 2}, "rglru": {"n_heads": 2},
                                  "mamba": {"d_state": 8}},
                        "train": {"val_every": 0}})
    init_distributed()
    engine = ParallelEngine(cfg, Layout(tp=1, pp=1, dp=1), 0, deepspeed_config(cfg))
    loader = build_train_loader(LoaderConfig(streams=[StreamSource(path=shards)], seq_len=32, batch_size=2, seed=0),
                                dp_rank=0, dp_world_size=1)
    batches = loader.batches()
    losses = [float(engine.train_step(batches)) for _ in range(2)]
    record = kernel_dispatch.dispatch_record(engine.module)
    assert bypasses(record) == {} and len(record) == 5, record
    assert record["layers.0 (mamba)"] == {"conv": "causal_conv1d", "scan": "braid.selective_scan_triton"}
    assert all(0 < loss < 10 for loss in losses)


def test_kernels_cuda_on_an_unsupported_shape_names_block_and_rule(runtimes):
    """causal-conv1d's channel-last rule (channels divisible by 8), with fla's conv not there to take over."""
    runtimes("cuda")
    cfg = block_config("mamba", d_model=36, mamba=dict(version=2, head_dim=18, n_groups=1, d_state=5))
    model = HybridLM(cfg.replace(pattern="M-", kernels="cuda"))
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    importable = kernel_dispatch.kernel_importable
    try:
        kernel_dispatch.kernel_importable = lambda lib: lib != "fla" and importable(lib)
        with pytest.raises(KernelUnavailable, match=r"layers\.0 \(mamba\) conv .*causal_conv1d needs channels "
                                                   r"divisible by 8 .*got 82"):
            model(ids, doc_ids=doc_ids())
    finally:
        kernel_dispatch.kernel_importable = importable
