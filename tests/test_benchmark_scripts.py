"""benchmarks/train_throughput.py and kernel_parity.py at smoke size on CPU."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def _run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--presets", "samba-421m", "--out", str(out), *flags],
                   cwd=REPO, check=True, capture_output=True, timeout=900)
    return json.loads(out.read_text())


def test_train_throughput_smoke_times_the_engine_on_packed_loader_batches(tmp_path):
    data = _run(tmp_path, "--recompute", "all")
    meta = data["meta"]
    assert meta["mode"] == "train" and meta["device"].startswith("cpu") and meta["peak_flops"] is None
    assert meta["versions"]["torch"] and "flash-attn" in meta["versions"] and "--smoke" in meta["command"]
    result = data["results"]["samba-421m"]
    assert set(result["twin"]["pattern"]) <= {"*", "-"} and "M" in result["hybrid"]["pattern"]
    rows = meta["micro_batch"] * meta["steps"]
    medians = {}
    for name in ("hybrid", "twin"):
        entry = result[name]
        assert entry["mfu"] is None and entry["peak_memory_bytes"] is None      # CPU: no peak FLOPs, no CUDA memory
        assert len(entry["runs"]) == 1 and entry["train_flops_per_token"] > 0
        for run in entry["runs"]:
            # the timed window counted the loader's batches: every token of every row, and packed
            # documents (more than one per row, at a mean length of 16 in rows of 64)
            assert run["steps"] == meta["steps"] and run["tokens"] == rows * meta["seq_len"]
            assert run["documents"] > 2 * rows
            assert run["window_s"] > 0 and run["step_s"] == pytest.approx(run["window_s"] / run["steps"])
            assert 0 < run["final_loss"] < 10
        medians[name] = statistics.median(r["tokens"] / r["window_s"] for r in entry["runs"])
        assert entry["tokens_per_s"] == pytest.approx(medians[name])
        # the path of every sublayer that has one: on CPU with kernels=reference, all the reference
        kinds = [k for k in _layer_kinds(entry["pattern"]) if k != "mlp"]
        assert len(entry["dispatch"]) == len(kinds)
        for (block, ops), kind in zip(entry["dispatch"].items(), kinds):
            assert block.endswith(f"({kind})")
            assert set(ops) == ({"conv", "scan"} if kind == "mamba" else {"attention"})
            assert set(ops.values()) == {"reference"}
    assert result["ratio_tokens_per_s"] == pytest.approx(medians["hybrid"] / medians["twin"])
    assert "ratio_mfu" in result and result["ratio_mfu"] is None


def _layer_kinds(pattern: str) -> list[str]:
    from model.config import parse_pattern
    return parse_pattern(pattern)


def test_long_context_smoke_reports_prefill_and_decode(tmp_path):
    data = _run(tmp_path, "--long-context")
    assert data["meta"]["mode"] == "long_context" and data["meta"]["prefill_lengths"] == [64, 128]
    result = data["results"]["samba-421m"]
    for name in ("hybrid", "twin"):
        assert set(result[name]["prefill"]) == {"64", "128"}
        assert all(p["tokens_per_s"] > 0 for p in result[name]["prefill"].values())
        assert result[name]["decode"]["tokens_per_s"] > 0 and result[name]["decode"]["context"] == 64
    assert set(result["ratio_prefill_tokens_per_s"]) == {"64", "128"} and result["ratio_decode_tokens_per_s"] > 0


def _kernel_parity():
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernel_parity", REPO / "benchmarks" / "kernel_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_parity_comparison_passes_close_curves_and_fails_parted_ones():
    compare = _kernel_parity().compare_curves
    reference = {1: 8.0, 2: 7.0, 3: 6.0}
    close = compare({1: 8.04, 2: 7.0, 3: 5.95}, reference, tolerance=0.01)
    assert close["passed"] and close["max_relative_deviation"] == pytest.approx(0.05 / 6) and close["at_step"] == 3
    parted = compare({1: 8.0, 2: 7.2, 3: 6.0}, reference, tolerance=0.02)
    assert not parted["passed"] and parted["at_step"] == 2
    assert parted["max_relative_deviation"] == pytest.approx(0.2 / 7)
    assert not compare({1: 8.0, 2: float("nan"), 3: 6.0}, reference, tolerance=0.5)["passed"]
    assert not compare({1: 8.0, 2: 7.0}, reference, tolerance=0.5)["passed"]                # a step missing


def test_kernel_parity_end_to_end_catches_a_perturbed_run(tmp_path, shards):
    """Two `braid train` runs; on CPU `--fast auto` is the reference path, so the fast run is
    perturbed (a higher learning rate): the script must see its curve part and exit 1."""
    from test_train import write_config
    config = write_config(tmp_path, shards)
    out = tmp_path / "parity.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_parity.py"), "--config", config,
                          "--steps", "3", "--fast", "auto", "--fast-override", "optim.lr=0.5", "--tolerance", "0.001",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert not data["passed"] and data["max_relative_deviation"] > 0.001 and data["fast_overrides"] == ["optim.lr=0.5"]
    assert len(data["losses"]["fast"]) == 3 and data["losses"]["fast"][0] == data["losses"]["reference"][0]
    assert data["losses"]["fast"][1:] != data["losses"]["reference"][1:]
    assert out.with_suffix(".png").stat().st_size > 0
