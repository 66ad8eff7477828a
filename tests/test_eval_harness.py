"""evals/harness.py: the lm-eval adapter scores what the model computes, and the suite runs end to end offline."""
import argparse
import json
import os
import string

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance   # lm-eval is a core dependency: missing, these tests fail

from evals import harness
from evals.harness import BraidLM
from model.generation import generate


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@torch.no_grad()
def _model_logprob(model, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
    """Sum of log p(targets) at the last len(targets) positions of one forward over `inputs`; greedy or not."""
    logprobs = F.log_softmax(model(torch.tensor([inputs]))[0].double(), dim=-1)[-len(targets):]
    picked = logprobs[torch.arange(len(targets)), torch.tensor(targets)]
    return float(picked.sum()), bool((logprobs.argmax(-1) == torch.tensor(targets)).all())


def _split(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split: trailing context spaces move to the continuation; the continuation
    is what encoding the whole adds after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = lm.encode(context)
    return ctx, lm.encode(context + continuation)[len(ctx):]


def test_loglikelihood_equals_model(eval_model):
    adapter = BraidLM(eval_model=eval_model, batch_size=3)
    long_context = " ".join(["the quick brown fox jumps over a lazy dog"] * 12)   # > max_length tokens
    pairs = [("the sky is", " blue"), ("what is the answer ", "42 here"), ("a", " lazy dog while grass is green"),
             ("pass key number", " 7"), (long_context, " again"), ("", "the quick brown fox")]
    got = adapter.loglikelihood(_requests("loglikelihood", pairs))
    assert len(eval_model.encode(long_context)) > adapter.max_length == 64
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx, cont = _split(eval_model, context, continuation)
        else:       # empty context: conditioned on the eot token
            ctx, cont = [eval_model.eos_id], eval_model.encode(continuation)
        inputs = (ctx + cont)[-(adapter.max_length + 1):][:-1]       # lm-eval's left truncation
        want, want_greedy = _model_logprob(eval_model.model, inputs, cont)
        assert abs(logprob - want) < 1e-5, (context, continuation, logprob, want)
        assert greedy == want_greedy


def test_is_greedy(eval_model):
    adapter = BraidLM(eval_model=eval_model, batch_size=4)
    context = eval_model.encode("the quick brown fox jumps")
    greedy = generate(eval_model.model, [context], 4)[0]
    wrong = greedy[:-1] + [(greedy[-1] + 1) % eval_model.cfg.vocab_size]
    results = adapter._loglikelihood_tokens([(("a", "b"), context, greedy), (("a", "c"), context, wrong),
                                             (("a", "d"), context[:2], greedy[:1])])
    assert [g for _, g in results[:2]] == [True, False]
    assert results[2][1] == (_model_logprob(eval_model.model, context[:2], greedy[:1])[1])
    assert results[0][0] > results[1][0]


def _full_nll(model, eos: int, tokens: list[int]) -> float:
    return _model_logprob(model, [eos] + tokens[:-1], tokens)[0]


def test_loglikelihood_rolling_short_text_is_full_sequence(eval_model):
    text = "the quick brown fox jumps over a lazy dog while grass is green"
    tokens = eval_model.encode(text)
    assert len(tokens) < 64
    for rolling_cache in (False, True):
        adapter = BraidLM(eval_model=eval_model, rolling_cache=rolling_cache)
        (got,) = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
        assert abs(got - _full_nll(eval_model.model, 0, tokens)) < 1e-4


def test_loglikelihood_rolling_long_text(eval_model):
    text = " ".join(f"pass key number {i} is the value of variable word {i * 7}" for i in range(14))
    tokens = eval_model.encode(text)
    n, width, model = len(tokens), 64, eval_model.model
    assert n > 2 * width + 10
    # lm-eval's windows, written out: chunks of `width` predicted tokens, each scored by an independent
    # forward over the `width` tokens before the chunk's end (the first one starts with eot).
    want = 0.0
    for start in range(0, n, width):
        end = min(start + width, n)
        inputs = [0] + tokens[:end - 1] if start == 0 else tokens[end - width - 1:end - 1]
        want += _model_logprob(model, inputs, tokens[start:end])[0]
    windowed = BraidLM(eval_model=eval_model).loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))[0]
    assert abs(windowed - want) < 1e-4
    # carrying the hybrid cache across windows = one forward over the whole text
    cached = BraidLM(eval_model=eval_model, rolling_cache=True).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(text,)]))[0]
    full = _full_nll(model, 0, tokens)
    assert abs(cached - full) < 1e-3          # float32 sums of ~200 log-probs
    assert abs(windowed - full) > 1e-3      # the windows really did cut the context


def test_generate_until_cuts_generate_at_stop(eval_model):
    adapter = BraidLM(eval_model=eval_model, batch_size=2)
    prompts = ["the quick brown fox", "what is the answer to the pass key number 12 here"]
    full = [eval_model.decode(generate(eval_model.model, [eval_model.encode(p)], 12, stop_tokens=[0])[0])
            for p in prompts]
    stops = [text[len(text) // 2:len(text) // 2 + 2] for text in full]
    assert all(stops), full
    requests = [(p, {"until": [s], "max_gen_toks": 12, "do_sample": False}) for p, s in zip(prompts, stops)]
    got = adapter.generate_until(_requests("generate_until", requests))
    assert got == [text.split(stop)[0] for text, stop in zip(full, stops)]
    assert all(len(g) < len(text) for g, text in zip(got, full))
    # no stop string met: the whole generation
    got = adapter.generate_until(_requests("generate_until", [(prompts[0], {"until": ["\x00nope"],
                                                                            "max_gen_toks": 12})]))
    assert got == [full[0]]


def test_simple_evaluate_local_tasks(eval_model):
    from lm_eval.evaluator import simple_evaluate

    adapter = BraidLM(eval_model=eval_model, batch_size=4, max_gen_toks=8)
    results = simple_evaluate(model=adapter, tasks=["braid_mc", "braid_gen"], limit=6, bootstrap_iters=0,
                              task_manager=harness.task_manager_for([harness.TASKS_DIR], ["braid_mc"]),
                              log_samples=False)
    scores = results["results"]
    # exact_match is what the adapter's own generations give against the targets, by the task's rules
    # (strip, ignore case and punctuation)
    with open(os.path.join(harness.TASKS_DIR, "braid_gen.jsonl")) as f:
        gen_docs = [json.loads(line) for line in f][:6]
    outputs = adapter.generate_until(_requests("generate_until", [
        (f"Q: {d['question']}\nA:", {"until": ["\n", "Q:"], "do_sample": False, "max_gen_toks": 16}) for d in gen_docs]))
    norm = lambda t: t.strip().lower().translate(str.maketrans("", "", string.punctuation))
    expected = sum(norm(o) == norm(d["answer"]) for o, d in zip(outputs, gen_docs)) / len(gen_docs)
    assert scores["braid_gen"]["exact_match,strip"] == pytest.approx(expected)
    # the accuracy is the one our loglikelihoods give: the argmax choice after "Question: ...\nAnswer:"
    with open(os.path.join(harness.TASKS_DIR, "braid_mc.jsonl")) as f:
        docs = [json.loads(line) for line in f][:6]
    correct = 0
    for doc in docs:
        requests = [(f"Question: {doc['question']}\nAnswer:", f" {choice}") for choice in doc["choices"]]
        logprobs = [ll for ll, _ in adapter.loglikelihood(_requests("loglikelihood", requests))]
        correct += max(range(len(logprobs)), key=logprobs.__getitem__) == doc["label"]
    assert scores["braid_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    assert results["n-samples"]["braid_mc"]["effective"] == 6


def test_run_writes_results(eval_model, tmp_path):
    record = harness.run(eval_model, str(tmp_path), **harness.SMOKE)
    assert (tmp_path / "results.json").stat().st_size > 0
    assert record["suite"] == "harness"
    assert set(record["scores"]) == set(harness.DEFAULT_TASKS)
    assert record["scores"]["braid_text"]["bits_per_byte,none"] > 0
    assert record["scores"]["braid_text"]["sample_len"] == harness.SMOKE["limit"]
    assert 0.0 <= record["scores"]["braid_mc"]["acc,none"] <= 1.0
    import lm_eval
    assert record["settings"]["lm_eval_version"] == lm_eval.__version__
    assert record["settings"]["max_length"] == 64
    assert record["provenance"]["model"] == "random tiny (test)"


def test_arguments_and_arg_string(eval_model, monkeypatch):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    options = vars(parser.parse_args([]))
    assert options["tasks"].split(",") == harness.DEFAULT_TASKS
    options = vars(parser.parse_args(["--tasks", "braid_mc", "--limit", "3", "--batch-size", "2",
                                      "--num-fewshot", "1", "--include-path", "/x"]))
    assert (options["limit"], options["batch_size"], options["num_fewshot"], options["include_path"]) == \
        (3, 2, 1, ["/x"])

    calls = []
    monkeypatch.setattr(harness, "load_eval_model", lambda path, **kw: calls.append((path, kw)) or eval_model)
    from lm_eval.api.registry import get_model
    lm = get_model("braid").create_from_arg_string("pretrained=/runs/x,step=20,max_length=32",
                                                   {"batch_size": "auto", "device": None})
    assert calls == [("/runs/x", {"step": 20, "dtype": torch.float32, "device": "cpu"})]
    assert lm.lm is eval_model and lm.max_length == 32 and lm.batch_size == harness.DEFAULT_BATCH_SIZE


def test_run_stock_hf_same_tasks_and_settings(eval_model, tmp_path, monkeypatch):
    """The stock-hf path's wiring (its scores on a real HF folder are checked in test_eval_cli.py): with
    HFLM stood in for by the adapter, it builds HFLM as documented and evaluates the same tasks with the
    same settings as run()."""
    import lm_eval.models.huggingface as hf
    made = []

    def fake_hflm(**kwargs):
        made.append(kwargs)
        return BraidLM(eval_model=eval_model, batch_size=kwargs["batch_size"])
    monkeypatch.setattr(hf, "HFLM", fake_hflm)
    options = {key: harness.SMOKE[key] for key in ("tasks", "limit", "batch_size", "bootstrap_iters")}
    stock = harness.run_stock_hf("/some/hf_dir", str(tmp_path / "hf"), **options)
    ours = harness.run(eval_model, str(tmp_path / "braid"), **options)
    assert made == [{"pretrained": "/some/hf_dir", "trust_remote_code": True, "device": "cpu",
                     "batch_size": harness.SMOKE["batch_size"]}]
    assert set(stock["scores"]) == set(ours["scores"]) == set(harness.SMOKE["tasks"])
    shared = ("tasks", "limit", "batch_size", "num_fewshot", "include_path", "bootstrap_iters", "max_length")
    assert {k: stock["settings"][k] for k in shared} == {k: ours["settings"][k] for k in shared}
    assert stock["provenance"] == {"model": "/some/hf_dir", "kind": "hf-stock"}
    assert os.path.isfile(tmp_path / "hf" / "results.json")
