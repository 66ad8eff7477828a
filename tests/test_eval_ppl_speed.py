"""The ppl and speed eval suites: chunked NLL equals the full forward, results are written,
decode memory is flat for a window/recurrent hybrid and grows for its full-attention twin."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from conftest import small_preset
from evals import ppl, speed
from model import HybridLM, transformer_twin


@pytest.mark.parametrize("preset", ["tiny", "samba-421m"])
def test_chunked_nll_equals_full(preset):
    # window 8; lengths past it; chunks that do not divide the window or the length, and 1
    model = HybridLM(small_preset(preset)).eval()
    ids = torch.randint(0, 256, (2, 46))
    ref = ppl.full_nll(model, ids)
    assert ref.shape == (2, 45)
    for chunk in (1, 3, 5, 8, 11, 45, 64):
        got = ppl.chunked_nll(model, ids, chunk)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < 1e-4, chunk


def test_bucket_scores():
    nll = torch.arange(1, 10, dtype=torch.float64).expand(2, 9)      # position p has NLL p
    scores = ppl.bucket_scores(nll, train_length=4)
    assert [(b["start"], b["end"]) for b in scores["buckets"]] == [(1, 2), (2, 4), (4, 8), (8, 10)]
    assert [b["tokens"] for b in scores["buckets"]] == [2, 4, 8, 4]
    assert scores["buckets"][2]["nll"] == pytest.approx(5.5)
    assert scores["buckets"][2]["ppl"] == pytest.approx(np.exp(5.5))
    assert scores["nll_at_train_length"] == pytest.approx(2.5)      # positions 2, 3
    assert scores["nll_beyond"] == pytest.approx(6.5)               # positions 4 .. 9


def _text_file(tmp_path, lm, tokens: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while grass is green and sky is blue".split()
    rng = np.random.default_rng(0)
    text = ""
    while lm.count_tokens(text) < tokens:
        text += " ".join(rng.choice(words, 200)) + ". "
    path = tmp_path / "held_out.txt"
    path.write_text(text)
    return str(path)


def test_ppl_run_writes_results_and_plot(eval_model, tmp_path):
    text = _text_file(tmp_path, eval_model, 2 * ppl.SMOKE["length"] + 10)
    parser = argparse.ArgumentParser()
    ppl.add_arguments(parser)
    options = vars(parser.parse_args(["--text", text]))
    options.update(ppl.SMOKE, progress=False)
    record = ppl.run(eval_model, str(tmp_path / "out"), **options)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["suite"] == "ppl" and record["scores"] == on_disk["scores"]
    buckets = on_disk["scores"]["buckets"]
    assert buckets[0]["start"] == 1 and buckets[-1]["end"] == ppl.SMOKE["length"]
    assert sum(b["tokens"] for b in buckets) == ppl.SMOKE["samples"] * (ppl.SMOKE["length"] - 1)
    assert all(np.isfinite(b["nll"]) and b["ppl"] > 1 for b in buckets)
    assert on_disk["scores"]["nll_beyond"] is not None                 # train_length 64 < length 96
    assert os.path.getsize(tmp_path / "out" / "ppl.png") > 1000


def test_ppl_reads_mds_split(eval_model, shards, tmp_path):
    tokens = ppl.mds_tokens(shards, 100)
    assert len(tokens) >= 100 and tokens[:33].tolist() == ((tokens[0] + np.arange(33)) % 256).tolist()
    # documents of 17 and 16 tokens: 40-token windows only across documents, as asked
    record = ppl.run(eval_model, str(tmp_path / "out"), data=shards, length=40, chunk=7, samples=3,
                     cross_documents=True, progress=False)
    assert record["settings"]["source"].startswith("mds:")
    assert record["settings"]["windows"].startswith("stream")
    assert sum(b["tokens"] for b in record["scores"]["buckets"]) == 3 * 39
    with pytest.raises(ValueError, match=r"^length=40: only 0 window\(s\) .* the longest 17 tokens"):
        ppl.run(eval_model, str(tmp_path / "out"), data=shards, length=40, samples=3, progress=False)


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    """An MDS split written by the pipeline's RowPacker (33-token rows, EOS 0 after each document) from
    documents of known lengths, most of them spanning several rows; token t of document d is 1 + d."""
    from data_pipeline.mds import MDSWriter
    from data_pipeline.pipeline import RowPacker
    lengths = [50, 7, 130, 64, 12, 99, 300, 40, 70]
    docs = [[1 + d] * n for d, n in enumerate(lengths)]
    rows, starts = RowPacker(33, 0, "uint16").add(docs)
    out = tmp_path_factory.mktemp("long_docs") / "val"
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16", "doc_starts": "ndarray:int32"}) as writer:
        for row, row_starts in zip(rows, starts):
            writer.write({"tokens": row, "doc_starts": row_starts})
    return str(out), lengths


def test_mds_documents_come_back_from_the_rows(long_documents):
    folder, lengths = long_documents
    stream, starts = ppl.mds_documents(folder, stop=lambda tokens, done: False)
    sizes = np.diff(np.append(starts, len(stream)))
    # each document and its EOS; the last one loses the tail the packer dropped (no full row)
    assert sizes[:-1].tolist() == [n + 1 for n in lengths[:-1]] and sizes[-1] <= lengths[-1] + 1
    for d, (start, size) in enumerate(zip(starts, sizes)):
        assert set(stream[start:start + size - 1].tolist()) <= {1 + d}


def test_ppl_windows_stay_inside_one_document(long_documents):
    folder, lengths = long_documents
    stream, starts = ppl.mds_documents(folder, stop=lambda tokens, done: False)
    ends = np.append(starts[1:], len(stream))

    def document_of(window_start: int, length: int) -> int:
        d = int(np.searchsorted(starts, window_start, side="right")) - 1
        assert window_start + length <= ends[d], "window crosses a document boundary"
        return d

    # 60 tokens: documents 2, 3, 5, 6 are long enough (8 lost its tail) -> 3 windows at 3 document starts
    chosen, facts = ppl.window_starts(len(stream), starts, 60, 3, seed=1)
    docs = [document_of(s, 60) for s in chosen]
    assert len(set(docs)) == 3 and set(chosen.tolist()) <= set(starts.tolist())
    assert facts["documents_long_enough"] == 4 and facts["windows_at_document_start"] == 3
    # more windows than long documents: the rest 60, 120 ... tokens into the long ones, never across
    # (2 fit in document 2, 1 in 3, 1 in 5, 5 in 6)
    chosen, facts = ppl.window_starts(len(stream), starts, 60, 9, seed=1)
    assert len(set(chosen.tolist())) == 9 and facts["windows_at_document_start"] == 4
    for s in chosen:
        d = document_of(int(s), 60)
        assert (s - starts[d]) % 60 == 0
    # another seed draws other documents; the same seed the same ones
    a, _ = ppl.window_starts(len(stream), starts, 30, 3, seed=0)
    b, _ = ppl.window_starts(len(stream), starts, 30, 3, seed=0)
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="^length=302: only 0 window"):
        ppl.window_starts(len(stream), starts, 302, 1, seed=0)


def test_ppl_run_on_long_documents(eval_model, long_documents, tmp_path):
    folder, _ = long_documents
    record = ppl.run(eval_model, str(tmp_path / "out"), data=folder, length=90, chunk=32, samples=3,
                     progress=False)
    settings = record["settings"]
    assert settings["windows"].startswith("document-bounded") and settings["windows_at_document_start"] == 3
    assert sum(b["tokens"] for b in record["scores"]["buckets"]) == 3 * 89


@pytest.mark.parametrize("options, name", [
    ({"length": 0}, "length"), ({"chunk": -1}, "chunk"), ({"samples": 0}, "samples"),
    ({"batch_size": 0}, "batch_size"), ({"text": "/nonexistent.txt"}, "text"), ({"data": "/nonexistent"}, "data"),
    ({}, "text"), ({"bogus": 1}, "bogus")])
def test_ppl_bad_options(eval_model, tmp_path, options, name):
    with pytest.raises(ValueError) as err:
        ppl.run(eval_model, str(tmp_path), **options)
    message = str(err.value)
    assert message.startswith(name) and "\n" not in message


def test_ppl_text_too_short(eval_model, tmp_path):
    text = _text_file(tmp_path, eval_model, 10)
    with pytest.raises(ValueError, match="^length=100000"):
        ppl.run(eval_model, str(tmp_path), text=text, length=100000)


def test_decode_memory_flat_for_hybrid_grows_for_twin():
    # Samba's pattern (M-S- x6, window 8) at width 64: every cache entry is constant in size.
    # (The `tiny` preset has one `*` layer, whose KV cache grows with the context.)
    cfg = small_preset("samba-421m")
    models = {"hybrid": HybridLM(cfg).eval(), "twin": HybridLM(transformer_twin(cfg)).eval()}
    memory = {name: {n: speed.measure_point(m, n, decode_tokens=2, prefill_chunk=2048, time_prefill=False)
                     for n in (1024, 8192)} for name, m in models.items()}
    hybrid, twin = memory["hybrid"], memory["twin"]
    assert hybrid[8192]["cache_bytes"] == hybrid[1024]["cache_bytes"]
    assert hybrid[8192]["decode_memory_bytes"] <= 1.05 * hybrid[1024]["decode_memory_bytes"]
    assert twin[8192]["decode_memory_bytes"] > 2 * twin[1024]["decode_memory_bytes"]
    assert twin[8192]["cache_bytes"] >= 8192 * 6 * 2 * 64 * 4       # 6 layers x (k, v) x d_model x fp32


def test_speed_run_smoke(eval_model, tmp_path):
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    options = vars(parser.parse_args([]))
    options.update(speed.SMOKE)
    record = speed.run(eval_model, str(tmp_path / "out"), **options)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["suite"] == "speed" and record["scores"] == on_disk["scores"]
    assert "memory_measure" in on_disk["settings"]
    for name in ("model", "twin"):
        rows = on_disk["scores"]["points"][name]
        assert [r["length"] for r in rows] == speed.SMOKE["lengths"]
        assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
    assert set(on_disk["scores"]["decode_speedup_vs_twin"]) == {"32", "64"}
    assert os.path.getsize(tmp_path / "out" / "speed.png") > 1000


def test_speed_takes_turns_and_reports_the_spread_over_repeats(eval_model, tmp_path, monkeypatch, capsys):
    real, order = speed.decode_steps, []

    def decode_steps(model, cache, logits, steps):
        if steps == 5:                                     # the timed windows, not the warm-up steps
            order.append("twin" if "-" in model.cfg.pattern and set(model.cfg.pattern) <= {"*", "-"} else "model")
        return real(model, cache, logits, steps)
    monkeypatch.setattr(speed, "decode_steps", decode_steps)
    record = speed.run(eval_model, str(tmp_path / "a"), lengths=[32], decode_tokens=5, repeats=3)
    # timed in turn, order alternating; then each model's memory alone
    assert order == ["model", "twin", "twin", "model", "model", "twin", "model", "twin"]
    for row in (record["scores"]["points"]["model"][0], record["scores"]["points"]["twin"][0]):
        assert row["repeats"] == 3 and len(row["decode_s_repeats"]) == len(row["prefill_s_repeats"]) == 3
        for kind in ("decode", "prefill"):
            assert row[f"{kind}_tokens_per_s_min"] <= row[f"{kind}_tokens_per_s"] <= row[f"{kind}_tokens_per_s_max"]
    low, high = record["scores"]["prefill_speedup_vs_twin_range"]["32"]
    assert low <= record["scores"]["prefill_speedup_vs_twin"]["32"] <= high

    # a machine whose load changed between repeats: the ratio's range says so, and so does a warning
    fake = {"model": {"prefill": [1.0, 0.05, 1.0], "decode": [1.0, 1.0, 1.0]},
            "twin": {"prefill": [1.0, 1.0, 1.1], "decode": [2.0, 2.0, 2.0]}}
    monkeypatch.setattr(speed, "time_side_by_side", lambda *args, **kwargs: fake)
    record = speed.run(eval_model, str(tmp_path / "b"), lengths=[32], decode_tokens=5, repeats=3)
    assert record["scores"]["prefill_speedup_vs_twin"]["32"] == pytest.approx(1.1)
    assert record["scores"]["prefill_speedup_vs_twin_range"]["32"] == pytest.approx([1.0, 20.0])
    assert record["scores"]["decode_speedup_vs_twin"]["32"] == 2.0
    assert "speed: warning: prefill speed-up vs twin at 32 tokens ranged 1x..20x over 3 repeats" in \
        capsys.readouterr().err


@pytest.mark.parametrize("options, name", [
    ({"lengths": []}, "lengths"), ({"lengths": [0, 8]}, "lengths"), ({"decode_tokens": 0}, "decode_tokens"),
    ({"repeats": 0}, "repeats"), ({"batch_size": -2}, "batch_size"), ({"prefill_chunk": -1}, "prefill_chunk"),
    ({"colour": "red"}, "colour")])
def test_speed_bad_options(eval_model, tmp_path, options, name):
    with pytest.raises(ValueError) as err:
        speed.run(eval_model, str(tmp_path), **options)
    message = str(err.value)
    assert message.startswith(name) and "\n" not in message


def test_bench_decode_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_decode.py"), "--smoke", "--threads", "1",
                    "--out", str(out)], cwd=repo, check=True, capture_output=True, timeout=120)
    data = json.loads(out.read_text())
    entry = data["results"]["samba-tiny"]
    assert entry["hybrid_pattern"] == "M-S-M-S-M-S-" and set(entry["twin_pattern"]) == {"*", "-"}
    for point in entry["lengths"].values():
        assert len(point["hybrid"]["runs_s"]) == len(point["twin"]["runs_s"]) == data["meta"]["repeats"]
        assert all(t > 0 for t in point["hybrid"]["runs_s"] + point["twin"]["runs_s"])
    # the twin caches every key and value: twice the context, twice the cache; the hybrid's recurrent
    # state is fixed and its window (2048) is not yet full at 512, so it grows by the 256 new keys only
    short, long = entry["lengths"]["256"], entry["lengths"]["512"]
    assert long["twin"]["cache_bytes"] == 2 * short["twin"]["cache_bytes"]
    assert long["hybrid"]["cache_bytes"] < 2 * short["hybrid"]["cache_bytes"]


def test_bench_decode_summary_is_median_based_and_oriented_hybrid_over_twin():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_decode", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # the hybrid decodes 8 tokens in 1, 2 or 9 s (median 2 s: 4 tok/s), the twin in 4, 3 or 5 s (median 4 s)
    hybrid, twin = {"runs_s": [1.0, 9.0, 2.0]}, {"runs_s": [4.0, 3.0, 5.0]}
    ratios = bench.summarize(hybrid, twin, decode_tokens=8)
    assert hybrid["tokens_per_s"] == 4.0 and twin["tokens_per_s"] == 2.0 and hybrid["ms_per_token"] == 250.0
    assert ratios["ratio_tokens_per_s"] == 2.0                        # hybrid twice as fast
    assert ratios["ratio_median_of_pairs"] == 2.5                     # pairs 4/1, 3/9, 5/2: median 2.5


def test_ppl_defaults_to_the_runs_validation_split(eval_model, shards, tmp_path):
    import dataclasses
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_4").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"data:\n  train: [{shards}]\n  val: {shards}\n")
    lm = dataclasses.replace(eval_model, provenance={"model": str(run_dir / "checkpoints" / "step_4"),
                                                     "kind": "checkpoint"})
    record = ppl.run(lm, str(tmp_path / "out"), length=16, chunk=8, samples=2, progress=False)
    assert record["settings"]["source"] == f"mds:{os.path.abspath(shards)}"
