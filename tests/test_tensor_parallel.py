"""Tensor parallelism: the divisibility check, shard/merge of state dicts, and TP=2 on two gloo
ranks against the unsharded model (logits, loss, every gradient, three optimizer steps,
generation and its cache), including deliberately wrong shardings that the check must catch.

The multi-rank tests run this file as a script, once per rank (`_rank_main`); each rank writes
its numbers with torch.save and the test compares them in the pytest process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_PRESETS, launch_ranks, small_preset, wait_ranks
from model import ConfigError, HybridLM, ModelConfig, get_preset
from model.layers import LinearSpec
from model.sharding import (REPLICATED, check_tensor_parallel, merge_tp_shards, rank_local_spec,
                            shard_state_dict, tensor_parallel_rule)

TP = 2
# 3 heads and MQA (one KV head) do not split over 2 ranks; the same block kinds with 2 heads / 2 KV heads do
TP_CHANGES = {"samba-1.3b": {"attn": {"n_heads": 2}}, "griffin": {"attn": {"n_kv_heads": 2}},
              "tiny-untied": {"tie_embeddings": False}}
TP_CASES = [*SMALL_PRESETS, "tiny-untied"]
# the largest relative error the TP model may show against the unsharded one, per quantity;
# gradients per tensor: see test_tp2_equals_single_process
TOLERANCE = {"logits": 1e-5, "mixers": 1e-5, "loss": 1e-5, "grad_norm": 1e-5, "grads": 1e-4,
             "replicated_grads_across_ranks": 0.0}


def tp_preset(name: str) -> ModelConfig:
    """A small preset that splits over TP=2 ranks; `tiny-untied`: tiny with its own head weight."""
    return small_preset(name.removesuffix("-untied"), kernels="reference", **TP_CHANGES.get(name, {}))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the L2 norm (a flat tensor of zeros compares by absolute error)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---- without process groups ----------------------------------------------------------------

@pytest.mark.parametrize("preset, changes, tp, message", [
    ("griffin", {}, 2, r"^model\.attn\.n_kv_heads=1 is not divisible by tensor-parallel size parallel\.tp=2$"),
    ("samba-1.3b", {}, 2, r"^model\.attn\.n_heads=3 is not"),
    ("tiny", {"vocab_size": 250}, 4, r"^model\.vocab_size=250 is not divisible .* parallel\.tp=4$"),
    ("tiny", {"mlp_hidden": 385}, 2, r"^model\.mlp_hidden=385 is not"),
    ("tiny", {"gla": {"n_heads": 1}}, 2, r"^model\.gla\.n_heads=1 is not"),
    ("tiny", {"rglru": {"n_heads": 1}}, 2, r"^model\.rglru\.n_heads=1 is not"),
    ("tiny", {"pattern": "M", "d_model": 65, "mamba": {"expand": 1}}, 2, r"\(Mamba d_inner\)=65 is not"),
    ("mamba2-hybrid", {"mamba": {"n_groups": 1}}, 2, r"^model\.mamba\.n_groups=1 is not"),
    ("mamba2-hybrid", {"d_model": 48, "attn": {"n_kv_heads": 4}}, 4,
     r"\(Mamba-2 heads\)=6 is not divisible .* parallel\.tp=4$"),
    ("tiny", {}, 0, r"^parallel\.tp=0: must be a positive integer$"),
])
def test_divisibility_check_names_field_and_numbers(preset, changes, tp, message):
    cfg = small_preset(preset, **changes)
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(cfg, tp)
    if tp > 0 and "vocab" not in message:
        with pytest.raises(ConfigError, match=message):     # a block building its share says the same
            HybridLM(cfg, LinearSpec(tp_size=tp))


@pytest.mark.parametrize("name", TP_CASES)
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_then_merge_is_bitwise_and_shards_have_rank_shapes(name, tp):
    cfg = tp_preset(name)
    if tp == 4:
        cfg = cfg.replace(attn={"n_heads": 4, "n_kv_heads": 4}, mamba={"n_groups": 4}, gla={"n_heads": 4})
    full = HybridLM(cfg).state_dict()
    shards = [shard_state_dict(full, cfg, rank, tp) for rank in range(tp)]
    merged = merge_tp_shards(shards, cfg)
    assert list(merged) == list(full)
    assert all(torch.equal(merged[n], full[n]) for n in full)
    with torch.device("meta"):
        rank_shapes = {n: t.shape for n, t in HybridLM(cfg, rank_local_spec(tp)).state_dict().items()}
    assert {n: t.shape for n, t in shards[1].items()} == rank_shapes


def test_fused_projections_split_each_part():
    cfg = tp_preset("samba-421m")             # Mamba-1: in_proj = [x; z], d_inner 128
    weight = HybridLM(cfg).state_dict()["layers.0.mixer.in_proj.weight"]
    shard = shard_state_dict({"layers.0.mixer.in_proj.weight": weight}, cfg, 1, 2)["layers.0.mixer.in_proj.weight"]
    assert torch.equal(shard, torch.cat([weight[64:128], weight[192:256]]))
    cfg = tp_preset("mamba2-hybrid")          # Mamba-2: [z 128; x 128; B 32; C 32; dt 8], 2 groups of 16 states
    weight = HybridLM(cfg).state_dict()["layers.0.mixer.in_proj.weight"]
    shard = shard_state_dict({"layers.0.mixer.in_proj.weight": weight}, cfg, 0, 2)["layers.0.mixer.in_proj.weight"]
    rows = [*range(0, 64), *range(128, 192), *range(256, 272), *range(288, 304), *range(320, 324)]
    assert torch.equal(shard, weight[rows])


def test_shard_and_merge_errors_name_the_tensor():
    cfg = tp_preset("tiny")
    with pytest.raises(KeyError, match="layers.0.mixer.bogus: no tensor-parallel rule"):
        shard_state_dict({"layers.0.mixer.bogus": torch.zeros(2)}, cfg, 0, 2)
    with pytest.raises(ValueError, match=r"tp_rank=2: must be in \[0, 2\)"):
        shard_state_dict({}, cfg, 2, 2)
    shards = [shard_state_dict(HybridLM(cfg).state_dict(), cfg, rank, 2) for rank in range(2)]
    shards[1]["layers.0.mixer.out_proj.weight"] = shards[1]["layers.0.mixer.out_proj.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"layers.0.mixer.out_proj.weight: shards have different shapes"):
        merge_tp_shards(shards, cfg)
    del shards[1]["layers.0.norm.weight"]
    with pytest.raises(ValueError, match=r"tp rank 1: tensor names differ .*layers.0.norm.weight"):
        merge_tp_shards(shards, cfg)


def test_replicated_parameters_are_the_full_width_ones():
    # what stays whole on every rank: norms over d_model, a row layer's bias, GLA's rank-16 gate and shared norm
    cfg = tp_preset("tiny")
    replicated = {n for n in HybridLM(cfg).state_dict() if tensor_parallel_rule(n, cfg) is REPLICATED}
    mixer = {n.split(".mixer.")[1] for n in replicated if ".mixer." in n}
    assert mixer == {"gk_down.weight", "g_norm.weight", "linear_out.bias"}
    assert replicated - {n for n in replicated if ".mixer." in n} == \
        {"norm.weight"} | {f"layers.{i}.norm.weight" for i in range(cfg.n_sublayers)}


def rank_parameters(cfg, tp: int) -> int:
    with torch.device("meta"):
        return HybridLM(cfg, rank_local_spec(tp)).num_parameters()


@pytest.mark.parametrize("name, tp", [("samba-421m", 2), ("samba-421m", 4), ("samba-1.3b", 2),
                                      ("mamba2-hybrid", 2), ("mamba2-hybrid", 4), ("tiny", 2)])
def test_rank_holds_about_1_over_tp_of_the_parameters(name, tp):
    cfg = get_preset(name)                   # the full-size presets, on the meta device
    share = rank_parameters(cfg, tp) / rank_parameters(cfg, 1)
    assert 1 / tp <= share < 1.005 / tp      # replicated: the norms (and tiny's GLA gate)


# ---- TP=2 on two gloo ranks ------------------------------------------------------------------

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
DOC_IDS = torch.tensor([[0] * 11 + [1] * 21, [0] * 20 + [1] * 5 + [2] * 7])   # packed rows of 32 tokens


def _variant_spec(cfg, variant: str | None) -> LinearSpec | None:
    """Deliberately wrong shardings (None: the real one)."""
    if variant is None:
        return None
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    from model.parallel import tensor_parallel_spec
    spec = tensor_parallel_spec(cfg, initialize=False)
    wrong = {
        "x_proj_not_reduced": dict(all_reduce=lambda x: x),     # dt, B, C from this rank's channels only
        "x_proj_grad_not_reduced": dict(all_reduce=reduce_from_tensor_model_parallel_region),
        "gla_norm_grad_not_reduced": dict(all_reduce_grad=lambda x: x),
    }
    return dataclasses.replace(spec, **wrong[variant])


@contextlib.contextmanager
def mixer_outputs(model: HybridLM) -> Iterator[list[torch.Tensor]]:
    """Each sublayer's mixer output (whole on every rank: row layers sum their halves)."""
    outputs = []
    hooks = [layer.mixer.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
             for layer in model.layers]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def _run_case(preset: str, variant: str | None) -> dict:
    """Everything one rank measures for one model: the unsharded model beside its TP=2 shard."""
    from model import generate
    from model.parallel import build_tensor_parallel_model, gathered_logits, grad_norm, vocab_parallel_loss

    cfg = tp_preset(preset)
    torch.manual_seed(0)
    full = HybridLM(cfg)
    rng_after_full = torch.get_rng_state()
    torch.manual_seed(0)                     # the same seed gives the TP model the shards of `full` ...
    model = build_tensor_parallel_model(cfg, spec=_variant_spec(cfg, variant))
    out = {"params": model.num_parameters(), "params_full": full.num_parameters(),
           "rng_as_single_process": torch.equal(torch.get_rng_state(), rng_after_full)}   # ... and the same RNG

    with torch.no_grad():
        out["tokens_full"] = generate(full.eval(), PROMPTS, 12)
        with gathered_logits(model.eval()):
            out["tokens_tp"] = generate(model, PROMPTS, 12)
        ids = torch.tensor([PROMPTS[1]])
        caches = full.new_cache(), model.new_cache()
        full(ids, cache=caches[0])
        model(ids, cache=caches[1])
        out["cache"] = [[{f: getattr(entry, f) for f in ("k", "v", "conv", "state")
                          if getattr(entry, f, None) is not None} for entry in cache.layers] for cache in caches]
        with gathered_logits(model):
            out["logits_unpacked"] = model(ids), full(ids)
    full.train(), model.train()

    generator = torch.Generator().manual_seed(1)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (full, model)]
    for key in ("loss", "loss_full", "grad_norm", "grad_norm_full"):
        out[key] = []
    for step in range(3):
        batch = torch.randint(0, cfg.vocab_size, (2, 33), generator=generator)
        inputs, labels = batch[:, :-1], batch[:, 1:].masked_fill(DOC_IDS.roll(-1, 1) != DOC_IDS, -100)
        with mixer_outputs(full) as outputs_full, mixer_outputs(model) as outputs:
            logits_full = full(inputs, doc_ids=DOC_IDS)
            logits = model(inputs, doc_ids=DOC_IDS)
        loss_full = F.cross_entropy(logits_full.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss_full.backward()
        if step == 0:
            out["mixers"] = list(zip(outputs, outputs_full))
            with torch.no_grad(), gathered_logits(model):
                out["logits_packed"] = model(inputs, doc_ids=DOC_IDS), logits_full.detach()
        loss = vocab_parallel_loss(logits, labels)
        loss.backward()
        out["loss"].append(loss.item())
        out["loss_full"].append(loss_full.item())
        out["grad_norm"].append(grad_norm(model).item())
        out["grad_norm_full"].append(grad_norm(full).item())
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.state_dict(keep_vars=True).items()}
            out["grads_full"] = {n: p.grad.clone() for n, p in full.state_dict(keep_vars=True).items()}
            if variant is None:
                out["grad_norm_deepspeed"] = _deepspeed_grad_norm(model)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return out


def _deepspeed_grad_norm(model) -> float:
    """The norm DeepSpeed clips by, with the TP group as its model-parallel group."""
    from pretrain.deepspeed_setup import prepare_deepspeed
    prepare_deepspeed()
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    from model.parallel import DeepSpeedMPU
    deepspeed.init_distributed(dist_backend="gloo")     # wraps the process group already there
    return float(clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=DeepSpeedMPU))


def _rank_main(args: dict) -> None:
    import torch.distributed as dist

    from model.parallel import init_model_parallel
    dist.init_process_group("gloo")
    init_model_parallel(TP)
    results = [_run_case(preset, variant) for preset, variant in args["cases"]]
    torch.save(results, f"{args['out']}.{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_tp2(tmp_path: Path, cases: list[tuple[str, str | None]]) -> list[list[dict]]:
    """Per case, the results of ranks 0 and 1."""
    out = tmp_path / "tp"
    wait_ranks(launch_ranks(__file__, TP, json.dumps({"cases": cases, "out": str(out)})), timeout=300)
    per_rank = [torch.load(f"{out}.{rank}.pt", weights_only=False) for rank in range(TP)]
    return [list(ranks) for ranks in zip(*per_rank)]


def failures(errors: dict[str, tuple[float, str]]) -> set[str]:
    """The quantities over their tolerance: empty when the TP model computes the same function."""
    return {key for key, (error, _) in errors.items() if error > TOLERANCE[key]}


def equivalence_errors(ranks: list[dict], cfg) -> dict[str, tuple[float, str]]:
    """The TP model against the unsharded one: the worst relative error of each quantity, and where."""
    worst = lambda errors: max(errors.items(), key=lambda item: item[1])[::-1]
    logits = {f"rank {r} {key}": rel_err(*ranks[r][key])
              for r in range(TP) for key in ("logits_packed", "logits_unpacked")}
    mixers = {f"rank {r} layer {i} ({cfg.layer_types[i]})": rel_err(*pair)
              for r in range(TP) for i, pair in enumerate(ranks[r]["mixers"])}
    losses = {f"step {s}": abs(ranks[0]["loss"][s] / ranks[0]["loss_full"][s] - 1) for s in range(3)}
    norms = {f"step {s}": abs(ranks[0]["grad_norm"][s] / ranks[0]["grad_norm_full"][s] - 1) for s in range(3)}
    merged = merge_tp_shards([r["grads"] for r in ranks], cfg)
    grads = {n: rel_err(merged[n], g) for n, g in ranks[0]["grads_full"].items()}
    # a replicated parameter must get the same gradient on every rank, or the copies drift apart
    spread = {n: rel_err(ranks[1]["grads"][n], g) for n, g in ranks[0]["grads"].items()
              if tensor_parallel_rule(n, cfg) is REPLICATED}
    return {"logits": worst(logits), "mixers": worst(mixers), "loss": worst(losses), "grad_norm": worst(norms),
            "grads": worst(grads), "replicated_grads_across_ranks": worst(spread)}


@pytest.mark.parametrize("name", TP_CASES)
def test_tp2_equals_single_process(tmp_path, name):
    """Logits (packed and not), losses and gradient norms of 3 AdamW steps within 1e-5 relative in
    fp32. Gradients per tensor within 1e-4: summing the row-parallel halves changes the rounding
    of the residual stream by ~1e-7, which cancellation-heavy gradients (Mamba-2's A_log and
    dt_bias) turn into up to ~8e-6; a wrong sharding is off by more than 1e-2."""
    cfg = tp_preset(name)
    (ranks,) = run_tp2(tmp_path, [(name, None)])
    errors = equivalence_errors(ranks, cfg)
    print(name, errors)
    assert not failures(errors), errors
    assert ranks[0]["rng_as_single_process"] and ranks[1]["rng_as_single_process"]
    for r in range(TP):
        assert abs(ranks[r]["grad_norm_deepspeed"] / ranks[r]["grad_norm_full"][0] - 1) < 1e-5

    # per-rank parameters: what rank_local_spec counts, about half
    assert ranks[0]["params"] == ranks[1]["params"] == rank_parameters(cfg, TP)
    assert 0.5 <= ranks[0]["params"] / ranks[0]["params_full"] < 0.56

    # generation: the same greedy tokens; each rank's cache holds its heads / channels
    for r in range(TP):
        assert ranks[r]["tokens_tp"] == ranks[r]["tokens_full"]
        full_cache, tp_cache = ranks[r]["cache"]
        assert len(tp_cache) == len(full_cache)
        for i, (mine, whole) in enumerate(zip(tp_cache, full_cache)):
            assert mine.keys() == whole.keys(), i
            for field, tensor in mine.items():
                dim = -1 if field == "conv" else 1          # conv tails: channels last; k, v, state: heads / channels
                expected = list(whole[field].shape)
                expected[dim] //= TP
                assert list(tensor.shape) == expected, (i, field)
                if field != "conv":                         # Mamba-2's conv tail holds [x; B; C] pieces
                    width = tensor.shape[dim]
                    assert rel_err(tensor, whole[field].narrow(dim, r * width, width)) < 1e-5, (i, field)


@pytest.mark.parametrize("variant, caught_by", [
    ("x_proj_not_reduced", {"mixers", "grads"}),      # Mamba-1's dt, B, C from a local slice of d_inner
    ("x_proj_grad_not_reduced", {"grads"}),           # the reduce without its backward: right loss, wrong gradients
    ("gla_norm_grad_not_reduced", {"grads", "replicated_grads_across_ranks"}),  # GLA's shared norm weight
])                                                    # gets only this rank's heads' gradient
def test_wrong_sharding_is_caught(tmp_path, variant, caught_by):
    cfg = tp_preset("tiny")
    (ranks,) = run_tp2(tmp_path, [("tiny", variant)])
    errors = equivalence_errors(ranks, cfg)
    print(variant, errors)
    failed = failures(errors)
    assert caught_by <= failed, errors
    assert all(errors[key][0] > 10 * TOLERANCE[key] for key in caught_by), errors
    if "mixers" not in caught_by:              # the forward is right; only the gradient check sees it
        assert not failed & {"logits", "mixers"}, errors


if __name__ == "__main__":     # a rank of the multi-process tests above
    _rank_main(json.loads(sys.argv[1]))
