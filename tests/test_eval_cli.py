"""`braid eval` on a converted folder, `braid eval report`, and lm-eval's stock `hf` model on a converted
folder agreeing with Braid's own lm-eval adapter on the same local tasks."""
import json
import os
import subprocess
import sys

import pytest

from conftest import small_preset
from conversion.hf import to_hf
from evals.common import load_eval_model
from test_conversion import weights_checkpoint
from test_train import ROOT


@pytest.fixture(scope="module")
def converted(tmp_path_factory, eval_tokenizer_path):
    """A converted folder of a random tiny hybrid (vocabulary 512) shipping the test tokenizer."""
    tmp = tmp_path_factory.mktemp("converted")
    weights_checkpoint(tmp / "run", small_preset("tiny", vocab_size=512))
    to_hf(str(tmp / "run"), str(tmp / "hf"), tokenizer=eval_tokenizer_path, progress=False)
    return str(tmp / "hf")


def braid(*args):
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)


def test_eval_on_a_converted_folder_then_report(converted):
    out = braid("eval", "ppl", converted, "--text", os.path.join(ROOT, "README.md"), "--length", "96", "--chunk",
                "32", "--samples", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    results = os.path.join(converted, "evals", "ppl", "results.json")
    assert f"ppl: {results}" in out.stdout
    record = json.load(open(results))
    assert record["provenance"]["kind"] == "hf-braid" and record["provenance"]["tokenizer_sha256"]
    out = braid("eval", "passkey", converted, "--lengths", "256", "--depths", "0.5", "--samples", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    out = braid("eval", "report", converted)
    assert out.returncode == 0, out.stderr[-2000:]
    report = open(os.path.join(converted, "evals", "REPORT.md")).read()
    assert "## ppl" in report and "## passkey" in report and "](ppl/ppl.png)" in report
    assert "| 256 |" in report                                   # the passkey grid as a table
    assert os.path.isfile(os.path.join(converted, "evals", "ppl", "ppl.png"))


def test_eval_errors_are_one_line(converted, tmp_path):
    out = braid("eval", "ppl", str(tmp_path / "nothing"))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("braid: error: ") and "nothing" in last
    assert "neither a checkpoint" in last
    out = braid("eval", "report", str(tmp_path))
    assert out.returncode == 2 and "no results.json" in out.stderr


@pytest.mark.slow
def test_stock_hf_model_on_a_converted_folder_agrees_with_the_braid_adapter(converted, tmp_path):
    from evals import harness
    settings = dict(tasks=["braid_mc", "braid_gen", "braid_text"], limit=4, batch_size=4, bootstrap_iters=0,
                    max_length=256)
    stock = harness.run_stock_hf(converted, str(tmp_path / "hf"), **settings)
    ours = harness.run(load_eval_model(converted), str(tmp_path / "braid"), **settings)
    assert stock["settings"]["model"] == "hf" and ours["settings"]["model"] == "braid"
    assert set(stock["scores"]) == {"braid_mc", "braid_gen", "braid_text"}
    assert stock["scores"]["braid_mc"]["acc,none"] == ours["scores"]["braid_mc"]["acc,none"]
    assert stock["scores"]["braid_gen"]["exact_match,strip"] == ours["scores"]["braid_gen"]["exact_match,strip"]
    theirs, mine = stock["scores"]["braid_text"]["word_perplexity,none"], ours["scores"]["braid_text"][
        "word_perplexity,none"]
    assert abs(theirs - mine) < 1e-4 * mine

    out = braid("eval", "harness", converted, "--stock-hf", "--tasks", "braid_mc", "--limit", "4", "--batch-size", "4",
                "--bootstrap-iters", "0", "--max-length", "256", "--out", str(tmp_path / "cli"))
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.load(open(tmp_path / "cli" / "results.json"))
    assert record["settings"]["model"] == "hf"
    assert record["scores"]["braid_mc"]["acc,none"] == stock["scores"]["braid_mc"]["acc,none"]


def test_headline_scores_flatten_what_metrics_can_plot():
    from evals.cli import headline_scores
    assert headline_scores("passkey", {"accuracy": 0.5, "grid": {"256": {"0.5": 1.0}}}) == {"accuracy": 0.5}
    assert headline_scores("speed", {"points": [], "decode_speedup_vs_twin": {"1024": 2.0, "8192": 5.0}}) == {
        "decode_speedup_vs_twin@1024": 2.0, "decode_speedup_vs_twin@8192": 5.0}
    assert headline_scores("harness", {"braid_mc": {"acc,none": 0.25, "acc_stderr,none": 0.1, "alias": "x"}}) == {
        "braid_mc/acc": 0.25}
