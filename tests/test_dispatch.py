"""Kernel dispatch without the kernels: the record, `auto`'s one warning per block and reason,
`cuda`'s errors naming block and rule, Mamba-1's packed_resets, and fp32 math under bf16 autocast."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, small_preset
from model import ConfigError, HybridLM, KernelUnavailable, generate, get_preset
from model import kernels as dispatch
from model.kernels import REFERENCE, DispatchRecord, Kernel, bypasses, causal_conv1d_rule, select


def packed_ids(length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 256, (2, length)), (torch.arange(length) >= 9).long().expand(2, -1)


def test_auto_on_cpu_logs_one_line_and_records_the_reference_per_block(caplog):
    model = HybridLM(small_preset("tiny", kernels="auto"))
    ids, doc_ids = packed_ids()
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids, doc_ids=doc_ids)
        model(ids, doc_ids=doc_ids)
    assert not [w for w in caught if "model.kernels" in str(w.message)]        # a log line, no source line
    messages = [r.getMessage() for r in caplog.records if "model.kernels=auto" in r.getMessage()]
    assert messages == ["model.kernels=auto: tensors are on cpu, the kernels need CUDA; "
                        "every block runs its PyTorch reference path"]
    record = model.dispatch_record()
    assert set(record) == {"layers.0 (mamba)", "layers.2 (gla)", "layers.4 (swa)", "layers.6 (rglru)",
                           "layers.8 (attention)"}
    assert bypasses(record) == {block: list(ops) for block, ops in record.items()}
    assert "not importable" in model.layers[4].mixer.dispatch.reasons["attention"] or \
        "tensors are on cpu" in model.layers[4].mixer.dispatch.reasons["attention"]
    # generation (a prefill, then cache continuations, which no kernel takes) adds no line off the GPU
    cache = model.new_cache()
    model(ids[:1, :10], cache=cache)
    model(ids[:1, 10:11], cache=cache)
    assert [r.getMessage() for r in caplog.records if "model.kernels=auto" in r.getMessage()] == messages
    assert "cache continuation" in model.layers[2].mixer.dispatch.reasons["scan"]


def test_reference_mode_records_without_warning():
    model = HybridLM(small_preset("tiny", kernels="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(*packed_ids()[:1])
    assert all(path == REFERENCE for ops in model.dispatch_record().values() for path in ops.values())


def test_cuda_mode_raises_naming_the_block_and_the_reason():
    model = HybridLM(small_preset("tiny", kernels="cuda"))
    with pytest.raises(KernelUnavailable, match=r"model.kernels=cuda: layers\.0 \(mamba\) conv cannot run on a kernel"):
        model(*packed_ids())


def _candidates(rule: str | None):
    return [(Kernel("cpp", (), "cuda"), rule), (Kernel("triton", (), "triton"), None)]


def test_select_steps_down_past_a_broken_rule_and_records_why(monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_RUNTIMES", {"cuda", "triton"})
    record = DispatchRecord()
    rule = causal_conv1d_rule(772, 4)
    chosen = select("cuda", "layers.3 (mamba)", "conv", _candidates(rule), torch.device("cpu"), record)
    assert chosen.name == "triton" and record == {"conv": "triton"}
    assert record.reasons["conv"] == "cpp: causal_conv1d needs channels divisible by 8 in channel-last layout, got 772"
    assert select("cuda", "b", "conv", _candidates(None), torch.device("cpu"), record).name == "cpp"
    assert "conv" not in record.reasons


def test_select_under_cuda_names_every_rule_when_nothing_runs(monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_RUNTIMES", {"cuda"})
    with pytest.raises(KernelUnavailable, match=r"layers\.3 \(mamba\) conv .*cpp: causal_conv1d needs a width of 2 to 4, "
                                                r"got 5; triton: tensors are on cpu"):
        select("cuda", "layers.3 (mamba)", "conv", _candidates(causal_conv1d_rule(64, 5)), torch.device("cpu"),
               DispatchRecord())


def test_cache_continuation_is_named_under_auto_and_refused_under_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_RUNTIMES", {"cuda", "triton"})
    record = DispatchRecord()
    assert select("auto", "layers.1 (gla)", "scan", _candidates(None), torch.device("cpu"), record, continuing=True) is None
    assert record == {"scan": REFERENCE} and "cache continuation" in record.reasons["scan"]
    with pytest.raises(KernelUnavailable, match=r"layers\.1 \(gla\) scan .*cache continuation"):
        select("cuda", "layers.1 (gla)", "scan", _candidates(None), torch.device("cpu"), record, continuing=True)


def test_sequence_info_varlen_forms():
    from model.sequence import sequence_info
    doc_ids = torch.tensor([[0, 0, 0, 1, 2, 2], [5, 5, 5, 5, 5, 5]])
    seq = sequence_info((2, 6), torch.device("cpu"), doc_ids)
    assert seq.cu_seqlens.tolist() == [0, 3, 4, 6, 12] and seq.cu_seqlens.dtype == torch.int32
    assert seq.seq_idx.tolist() == [[0, 0, 0, 1, 2, 2], [0] * 6] and seq.seq_idx.dtype == torch.int32
    assert seq.max_seqlen == 6 and seq.last_documents.tolist() == [2, 3]
    assert seq.row_cu_seqlens.tolist() == [0, 6, 12]
    assert sequence_info((2, 6), torch.device("cpu")).cu_seqlens.tolist() == [0, 6, 12]
    assert seq.cu_seqlens is seq.cu_seqlens                          # derived once per forward


# ---- Mamba-1 packed_resets -----------------------------------------------------------------------

def test_samba_presets_let_mamba_states_flow_and_tiny_resets():
    assert get_preset("samba-421m").mamba.packed_resets == get_preset("samba-1.3b").mamba.packed_resets == "flow"
    assert get_preset("tiny").mamba.packed_resets == "exact"
    with pytest.raises(ConfigError, match="model.mamba.packed_resets='both': must be exact or flow"):
        small_preset("tiny", mamba=dict(packed_resets="both"))


def test_flow_passes_mamba_state_across_documents_in_training_only():
    cfg = small_preset("samba-421m")
    flow, exact = HybridLM(cfg).eval(), HybridLM(cfg.replace(mamba=dict(packed_resets="exact"))).eval()
    exact.load_state_dict(flow.state_dict())
    ids, doc_ids = packed_ids()
    with torch.no_grad():
        first = flow(ids[:, :9])
        packed_flow, packed_exact = flow(ids, doc_ids=doc_ids), exact(ids, doc_ids=doc_ids)
        second_alone = exact(ids[:, 9:])
    assert torch.allclose(packed_flow[:, :9], first, atol=1e-5)            # the first document is the same
    assert torch.allclose(packed_exact[:, 9:], second_alone, atol=1e-4)     # exact: the second as if alone
    assert (packed_flow[:, 9:] - second_alone).abs().max() > 1e-3          # flow: it saw the first


def test_flow_generation_keeps_left_padding_out():
    model = HybridLM(small_preset("samba-421m")).eval()
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [7]]
    batched = generate(model, prompts, 12)
    assert batched == [generate(model, [p], 12)[0] for p in prompts]


# ---- bf16 as training runs it ---------------------------------------------------------------------

def test_reference_recurrences_stay_fp32_under_bf16_autocast():
    from model.ops.attention import attention
    from model.ops.linear_attention import chunk_linear_attention
    from model.ops.selective_scan import selective_scan
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    g = -torch.rand(1, 2, 40, 8)
    x, dt, B, C = torch.randn(1, 40, 6), torch.rand(1, 40, 6), torch.randn(1, 40, 4), torch.randn(1, 40, 4)
    A = -torch.rand(6, 4)
    plain = (chunk_linear_attention(q, k, v, g, chunk_size=16)[0], selective_scan(x, dt, A, B, C)[0],
             attention(q, k, v, window=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (chunk_linear_attention(q, k, v, g, chunk_size=16)[0], selective_scan(x, dt, A, B, C)[0],
                 attention(q, k, v, window=8))
    for a, b in zip(plain, under):
        assert b.dtype == torch.float32 and torch.equal(a, b)


BF16_STEP = r"""
import json, os, sys, torch
sys.path.insert(0, "tests")
from pretrain.config import train_config
from pretrain.parallel import ParallelEngine, plan_layout
from pretrain.train import deepspeed_config, init_distributed
cfg = train_config({"run_dir": sys.argv[1], "data": {"train": ["unused"], "seq_len": 32, "micro_batch": 2},
                    "model": {"preset": "tiny", "vocab_size": 256, "d_model": 64, "mlp_hidden": 96,
                              "kernels": "reference", "attn": {"window": 8}, "gla": {"chunk_size": 8}},
                    "optim": {"lr": 1e-3}, "train": {"val_every": 0}})
ds_config = deepspeed_config(cfg, bf16=True)
engine = ParallelEngine(cfg, plan_layout(cfg, 1), init_distributed()[0], ds_config)
linear_dtypes = set()
for m in engine.module.modules():
    if isinstance(m, torch.nn.Linear):
        m.register_forward_hook(lambda mod, i, o: linear_dtypes.add(str(o.dtype)))
special = {n: p for n, p in engine.module.named_parameters()
           if n.endswith(("A_log", ".D", "dt_proj.bias", "recurrent_param"))}
before = {n: p.detach().clone() for n, p in special.items()}
ids = torch.randint(0, 256, (2, 33))
batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": (torch.arange(32) >= 20).long().expand(2, -1)}
loss = engine.train_step(iter([batch]))
# an update an fp32 value keeps but bf16 would round away: smaller than bf16's spacing at the value
kept = {n: bool(((p - before[n]).abs() > 0).any() and ((p - before[n]).abs() < (before[n].abs() * 2 ** -8)).any())
        for n, p in special.items()}
print(json.dumps({"config": {k: v for k, v in ds_config.items() if k in ("bf16", "torch_autocast")},
                  "linear_dtypes": sorted(linear_dtypes), "special": sorted(special), "kept": kept,
                  "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
                  "loss": float(loss)}))
"""


def test_bf16_training_keeps_parameters_fp32_and_runs_linears_in_bf16(tmp_path):
    """DeepSpeed with torch autocast (bf16): parameters stay fp32, so A_log, D, the dt bias and Lambda
    take updates bf16 would round away, while every linear layer computes in bf16."""
    run = subprocess.run([sys.executable, "-c", BF16_STEP, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                                      "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["config"] == {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}    # not DeepSpeed's bf16 mode
    assert result["linear_dtypes"] == ["torch.bfloat16"] and result["param_dtypes"] == ["torch.float32"]
    assert {n.rsplit(".", 1)[-1] for n in result["special"]} == {"A_log", "D", "bias", "recurrent_param"}
    assert all(result["kept"].values()), result["kept"]
    assert 0 < result["loss"] < 10
