"""experiments/hybrids.py: the models are solved to equal parameter counts, and the smoke preset runs
every stage end to end (data pipeline -> braid train -> fine-tune -> evals -> summary and plots)."""
import json
import os
import subprocess
import sys

import pytest

from experiments import hybrids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_models_have_equal_parameters(preset):
    models = hybrids.solve_models(hybrids.PRESETS[preset], 4096, list(hybrids.MODELS))
    reference = models[hybrids.REFERENCE]
    for name, m in models.items():
        cfg = m["config"]
        assert cfg.n_sublayers == hybrids.PRESETS[preset].sublayers and cfg.init == "samba"
        assert cfg.pattern.startswith(hybrids.MODELS[name][0])
        assert abs(m["non_embedding_parameters"] / reference["non_embedding_parameters"] - 1) <= hybrids.PARAM_TOLERANCE
        assert abs(m["parameters"] / reference["parameters"] - 1) <= hybrids.PARAM_TOLERANCE
    assert models["samba"]["config"].attn.window < hybrids.PRESETS[preset].seq_len / 2


def test_unequal_models_are_refused(monkeypatch):
    monkeypatch.setattr(hybrids, "PARAM_TOLERANCE", 0.0001)
    with pytest.raises(AssertionError, match="parameters .* differ from samba's"):
        hybrids.solve_models(hybrids.PRESETS["cpu"], 4096, list(hybrids.MODELS))


def test_smoke_preset_end_to_end(tmp_path):
    out, runs, data = tmp_path / "out", tmp_path / "runs", tmp_path / "data"
    command = [sys.executable, "-m", "experiments.hybrids", "--preset", "smoke", "--models", "samba", "transformer",
               "--threads", "1",
               "--runs", str(runs), "--data", str(data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    smoke = hybrids.PRESETS["smoke"]
    assert set(summary["models"]) == {"samba", "transformer"}
    assert summary["meta"]["train_tokens"] == smoke.steps * smoke.micro_batch * smoke.seq_len
    for name, m in summary["models"].items():
        assert m["train_loss_end"]["n"] == 1 and m["train_loss_end"]["mean"] > 0
        assert m["ppl_by_position"][-1]["end"] == smoke.ppl_length >= 4 * smoke.seq_len
        assert all(b["ppl"]["mean"] > 1 for b in m["ppl_by_position"])
        assert list(m["passkey_by_length"]) == [str(x) for x in smoke.passkey_lengths]
        assert list(m["phonebook_x1"]) == list(m["phonebook_x2"]) == [str(x) for x in smoke.phonebook_entries]
        assert [p["length"] for p in m["speed"]] == smoke.speed_lengths
        # every suite's own results.json beside the summary
        for suite in ("ppl", "passkey", "phonebook_x1", "phonebook_x2"):
            assert (out / "raw" / f"{name}-s0" / suite / "results.json").is_file(), suite
    speed = json.loads((out / "raw" / "speed" / "results.json").read_text())
    assert set(speed["scores"]["points"]) == {"samba", "transformer"}          # measured side by side
    ppl = json.loads((out / "raw" / "samba-s0" / "ppl" / "results.json").read_text())
    assert ppl["settings"]["windows"].startswith("document-bounded")
    jrt = json.loads((out / "raw" / "samba-s0" / "phonebook_x2" / "results.json").read_text())
    assert jrt["settings"]["repeat_context"] == 2
    # the fine-tune started from the pretrained weights and trained on the retrieval mixture
    finetune = yaml_load(runs / "samba-s0" / "finetune" / "config.yaml")
    assert [s["proportion"] for s in finetune["data"]["train"]] == [0.9, 0.1]
    assert "Perplexity by position" in (out / "summary.md").read_text()
    for png in ("ppl_by_position.png", "passkey.png", "phonebook.png", "speed.png"):
        assert (out / png).stat().st_size > 1000, png
    # a rerun finds every stage done and only rewrites the summary
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "train " not in again.stdout and "eval " not in again.stdout


def yaml_load(path):
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)
