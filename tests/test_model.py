"""Whole-model behaviour: decode equals the parallel forward, packed documents, generation, dispatch."""
import warnings

import pytest
import torch

from conftest import SMALL_PRESETS, small_preset
from model import HybridLM, KernelUnavailable, generate
from model.kernels import _warn_once
from model.layers import LinearSpec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(SMALL_PRESETS))
def test_prefill_then_decode_equals_parallel_forward(name):
    model = HybridLM(small_preset(name)).eval()
    ids = torch.randint(0, 256, (2, 40))           # 5x the window: the ring buffer wraps
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :13], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(13, 40)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-4


@pytest.mark.parametrize("name", ["tiny", "mamba2-hybrid", "nemotron-h"])
def test_chunked_continuation_equals_parallel_forward(name):
    # the form long-context perplexity uses: chunks that carry every layer's state
    model = HybridLM(small_preset(name)).eval()
    ids = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        chunks = [model(ids[:, a:a + 11], cache=cache) for a in range(0, 45, 11)]
    assert rel_err(torch.cat(chunks, 1), full) < 1e-4


@pytest.mark.parametrize("name", ["tiny", "mamba2-hybrid", "griffin", "nemotron-h"])
def test_packed_documents_equal_documents_alone(name):
    model = HybridLM(small_preset(name)).eval()
    lengths = [13, 1, 22, 9]
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)[0].split(lengths)
        for doc, out in zip(docs, packed):
            alone = model(doc[None])[0]
            assert rel_err(out, alone) < 1e-5


def test_packed_documents_gradients_do_not_cross():
    model = HybridLM(small_preset("tiny"))
    row = torch.randint(0, 256, (1, 30))
    doc_ids = torch.cat([torch.zeros(12), torch.ones(18)]).long()[None]
    emb = model.embed(row).detach().requires_grad_()
    from model.sequence import sequence_info
    seq = sequence_info((1, 30), row.device, doc_ids)
    x = emb
    for layer in model.layers:
        x = layer(x, seq)
    x[0, 12:].sum().backward()     # the second document's outputs ...
    assert emb.grad[0, :12].abs().max() == 0   # ... owe nothing to the first document


def test_left_padded_batch_generates_like_single_prompts():
    model = HybridLM(small_preset("tiny")).eval()
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [7]]
    batched = generate(model, prompts, 20)
    for prompt, out in zip(prompts, batched):
        assert generate(model, [prompt], 20)[0] == out
        # and greedy decode equals argmax of the parallel forward over prompt + output
        logits = model(torch.tensor([prompt + out]))[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_generation_stop_tokens_and_sampling():
    model = HybridLM(small_preset("tiny")).eval()
    greedy = generate(model, [[1, 2, 3]], 12)[0]
    stop = greedy[4]
    first = greedy.index(stop)
    assert generate(model, [[1, 2, 3]], 12, stop_tokens=[stop])[0] == greedy[:first + 1]
    assert generate(model, [[1, 2, 3]], 12, temperature=1.0, top_k=1)[0] == greedy
    sample = lambda seed: generate(model, [[1, 2, 3]] * 2, 16, temperature=1.0, top_p=0.9,
                                   generator=torch.Generator().manual_seed(seed))
    assert sample(1) == sample(1) and sample(1) != sample(2)
    with pytest.raises(ValueError, match=r"prompts\[1\].*outside"):
        generate(model, [[1], [999]], 4)


@pytest.mark.parametrize("pattern, grows", [("M-G-S-R-", False), ("M-S-*-", True)])
def test_cache_memory_is_constant_without_full_attention(pattern, grows):
    model = HybridLM(small_preset("tiny", pattern=pattern)).eval()
    cache = model.new_cache()
    sizes = {}
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 16)), cache=cache)
        for t in range(16, 300):
            model(torch.randint(0, 256, (1, 1)), cache=cache)
            if t in (40, 299):
                sizes[t] = cache.nbytes()
    assert sizes[299] > sizes[40] if grows else sizes[299] == sizes[40]


@pytest.mark.parametrize("rope", [True, False])
def test_attention_without_rope_sees_a_set_of_earlier_tokens(rope):
    """model.attn.rope=false (Nemotron-H): no positions, so the last query's output does not depend on the
    order of the tokens before it; with RoPE it does. Checked against dense softmax attention in float64."""
    from model.layers import Attention
    from model.sequence import sequence_info
    cfg = small_preset("tiny", attn=dict(rope=rope))
    layer = Attention(cfg, LinearSpec(), window=None).double()
    x = torch.randn(1, 12, cfg.d_model, dtype=torch.float64)
    shuffled = torch.cat([x[:, torch.randperm(11)], x[:, 11:]], dim=1)
    run = lambda t: layer(t, sequence_info((1, 12), t.device))[0, -1]
    assert torch.allclose(run(x), run(shuffled), atol=1e-12) != rope
    if not rope:                               # the definition: softmax(q k^T / sqrt(d)) v over all 12 tokens
        q = layer.q_proj(x[0, -1]).view(cfg.attn.n_heads, -1)
        k = layer.k_proj(x[0]).view(12, cfg.n_kv_heads, -1).repeat_interleave(cfg.attn.n_heads // cfg.n_kv_heads, 1)
        v = layer.v_proj(x[0]).view(12, cfg.n_kv_heads, -1).repeat_interleave(cfg.attn.n_heads // cfg.n_kv_heads, 1)
        weights = torch.softmax(torch.einsum("hd,thd->ht", q, k) / cfg.head_dim ** 0.5, dim=-1)
        assert torch.allclose(run(x), layer.o_proj(torch.einsum("ht,thd->hd", weights, v).flatten()), atol=1e-12)


def test_relu2_mlp_is_ungated_squared_relu():
    from model.layers import MLP
    mlp = MLP(small_preset("tiny", mlp_activation="relu2"), LinearSpec()).double()
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(3, 5, mlp.up_proj.in_features, dtype=torch.float64)
    h = x @ mlp.up_proj.weight.T
    assert torch.allclose(mlp(x), (h.clamp(min=0) ** 2) @ mlp.down_proj.weight.T, atol=1e-12)


def test_training_step_lowers_loss():
    model = HybridLM(small_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("name", list(SMALL_PRESETS))
def test_activation_checkpointing_same_gradients_less_saved(name):
    """Recomputing sublayers in backward changes what autograd keeps, not what it computes."""
    model = HybridLM(small_preset(name))
    ids = torch.randint(0, 256, (2, 33))
    doc_ids = (torch.arange(32) >= 20).long().expand(2, -1)

    def run(kinds):
        model.checkpointed_kinds = kinds
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            logits = model(ids[:, :-1], doc_ids=doc_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss, grads, saved = run(set())
    kinds = set(model.cfg.layer_types)
    loss_ckpt, grads_ckpt, saved_ckpt = run(kinds)
    assert loss_ckpt == loss
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-7, msg=n)
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)
    _, _, saved_some = run({next(iter(kinds))})           # only one kind: in between
    assert saved_ckpt < saved_some < saved


def test_bad_inputs_name_the_tensor():
    model = HybridLM(small_preset("tiny"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), doc_ids=torch.zeros(2, 4, dtype=torch.long))


def test_kernel_modes_on_cpu():
    ids = torch.randint(0, 256, (1, 10))
    reference = HybridLM(small_preset("tiny", kernels="reference"))
    auto = HybridLM(small_preset("tiny", kernels="auto"))
    auto.load_state_dict(reference.state_dict())
    _warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = reference(ids)
        assert not caught
        out = auto(ids)
        auto(ids)
    fallbacks = [w for w in caught if "model.kernels=auto" in str(w.message)]
    assert len(fallbacks) == len({str(w.message) for w in fallbacks}) >= 1     # once per kernel family
    assert torch.equal(out, expected)
    strict = HybridLM(small_preset("tiny", kernels="cuda"))
    with pytest.raises(KernelUnavailable, match="model.kernels=cuda"):
        strict(ids)
