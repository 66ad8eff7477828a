"""Eval hooks in training: suites run on saved checkpoints, scores in metrics.jsonl and TensorBoard.

Runs `braid train` on the counting shards (no tokenizer of their own: evals.tokenizer supplies the
test BPE, and model.vocab_size=512 holds it).
"""
import json
import os
import stat

import pytest
import yaml

from test_train import braid_train

pytestmark = pytest.mark.slow


def write_config(tmp_path, shards, tokenizer, suites, max_steps=4, **evals):
    config = {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"preset": "tiny", "vocab_size": 512, "d_model": 64, "mlp_hidden": 96,
                  "attn": {"window": 8}, "gla": {"chunk_size": 8}},
        "data": {"train": [shards], "seq_len": 32, "micro_batch": 2},
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
        "train": {"max_steps": max_steps, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 2}, "logging": {"tensorboard": True},
        "evals": {"every": 2, "suites": suites, "mode": "inline", "tokenizer": tokenizer, **evals},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_steps(run_dir, suite):
    """Steps of the eval records of `suite`, in file order (a repeat would show twice)."""
    return [r["step"] for r in records(run_dir) if any(k.startswith(f"eval/{suite}/") for k in r)]


def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def ppl_options(shards):
    return {"length": 16, "chunk": 8, "samples": 2, "batch_size": 2, "data": shards}     # inside 16/17-token documents


def test_inline_evals_land_in_metrics_and_tensorboard_once_across_a_restart(tmp_path, shards, eval_tokenizer_path):
    suites = {"ppl": ppl_options(shards),
              "passkey": {"lengths": [192], "depths": [0.5], "samples": 1, "batch_size": 1, "progress": False}}
    config = write_config(tmp_path, shards, eval_tokenizer_path, suites)
    first = braid_train(config, "train.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = str(tmp_path / "run")
    assert eval_steps(run_dir, "ppl") == [2] and eval_steps(run_dir, "passkey") == [2]
    second = braid_train(config)                     # resumes from step 2: step 2's evals are not redone
    assert second.returncode == 0, second.stderr[-3000:]
    assert eval_steps(run_dir, "ppl") == [2, 4] and eval_steps(run_dir, "passkey") == [2, 4]
    assert sorted(r["step"] for r in records(run_dir) if "loss" in r) == [1, 2, 3, 4]
    record = next(r for r in records(run_dir) if "eval/ppl/nll_mean" in r)
    assert record["step"] == 2 and record["eval/ppl/nll_mean"] > 0 and "eval/passkey/accuracy" in record
    results = tmp_path / "run" / "evals" / "step_00000002" / "ppl" / "results.json"
    assert json.loads(results.read_text())["settings"]["length"] == 16
    assert (tmp_path / "run" / "evals" / "step_00000004" / "passkey" / "results.json").exists()
    assert (tmp_path / "run" / "evals" / "step_00000002" / "ppl.log").exists()
    tags = tensorboard_tags(run_dir)
    assert sorted(tags["eval/ppl/nll_mean"]) == [2, 4] and sorted(tags["eval/passkey/accuracy"]) == [2, 4]
    assert "loss" in tags


def test_a_failing_eval_is_one_line_and_training_goes_on(tmp_path, shards, eval_tokenizer_path):
    config = write_config(tmp_path, shards, eval_tokenizer_path, {"ppl": {**ppl_options(shards), "chunk": 0}},
                          max_steps=2)
    done = braid_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    log = tmp_path / "run" / "evals" / "step_00000002" / "ppl.log"
    failures = [line for line in done.stderr.splitlines() if line.startswith("braid: eval ")]
    assert failures == [f"braid: eval ppl at step 2 failed (exit 2); see {log}"]
    assert "chunk=0" in log.read_text()
    assert eval_steps(str(tmp_path / "run"), "ppl") == []
    assert "done: step 2" in done.stdout


def test_config_errors_are_one_line(tmp_path, shards, eval_tokenizer_path):
    from launch.config_io import load_config
    from pretrain.config import train_config
    config = write_config(tmp_path, shards, eval_tokenizer_path, {"ppl": "smoke"})
    bad = braid_train(config, "evals.every=3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "braid: error: evals.every=3 must be a multiple of checkpoint.every=2 (evals run on saved checkpoints)")
    for override, message in [
        ("evals.suites={pplx: smoke}", "evals.suites.pplx: unknown eval suite (known: passkey, niah, "),
        ("evals.suites={ppl: {lenght: 5}}", "evals.suites.ppl.lenght: unknown option of the ppl suite (known: "),
        ("evals.suites={ppl: {length: many}}", "evals.suites.ppl: argument --length: invalid int value: 'many'"),
        ("evals.mode=later", "evals.mode='later': must be auto, inline or slurm"),
        ("evals.suites={}", "evals.every=2: evals.suites names no suite"),
    ]:
        with pytest.raises(ValueError) as err:
            train_config(load_config(config, [override]))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    cfg = train_config(load_config(config, ["evals.suites={ppl: smoke, passkey: {}}"]))
    assert cfg.evals.commands() == {"ppl": ["--length", "96", "--chunk", "24", "--samples", "2", "--batch-size", "2"],
                                    "passkey": ["--lengths", "256", "512", "--depths", "0.0", "0.5", "1.0",
                                                "--samples", "1", "--batch-size", "6", "--no-progress"]}


def test_slurm_mode_submits_a_job_and_logs_its_results_later(tmp_path, shards, eval_tokenizer_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    config = write_config(tmp_path, shards, eval_tokenizer_path, {"ppl": ppl_options(shards), "passkey": "smoke"},
                          max_steps=6, mode="slurm")
    run_dir = tmp_path / "run"
    # a job's results for step 2 appear while training goes on: the next log step picks them up
    patch = (f"import os, json, pretrain.evals_hook as h\n"
             f"os.environ['PATH'] = {str(bin_dir)!r} + os.pathsep + os.environ['PATH']\n"
             f"submit = h.EvalHook.submit\n"
             f"def fake(self, step):\n"
             f"    submit(self, step)\n"
             f"    if step == 2:\n"
             f"        from evals.common import write_results\n"
             f"        write_results(os.path.join(h.step_dir(self.cfg.run_dir, 2), 'ppl'), 'ppl', "
             f"{{'nll_mean': 1.5, 'buckets': []}}, {{}})\n"
             f"h.EvalHook.submit = fake\n")
    done = braid_train(config, patch=patch)
    assert done.returncode == 0, done.stderr[-3000:]
    submitted = calls.read_text().splitlines()
    assert len(submitted) == 3 and all(line.startswith("--parsable ") for line in submitted)
    assert submitted[0].endswith(str(run_dir / "slurm" / "eval-step_00000002.sbatch"))
    script = (run_dir / "slurm" / "eval-step_00000004.sbatch").read_text()
    assert "-m launch.cli eval ppl" in script and "-m launch.cli eval passkey" in script
    assert f"--step 4 --out {run_dir}/evals/step_00000004/passkey" in script and "--no-progress" in script
    assert f"--tokenizer {eval_tokenizer_path}" in script and "--chunk 8 --data" in script
    steps = [(i, r["step"]) for i, r in enumerate(records(str(run_dir))) if "eval/ppl/nll_mean" in r]
    assert len(steps) == 1 and steps[0][1] == 2
    after = [r["step"] for r in records(str(run_dir))[:steps[0][0]] if "loss" in r]
    assert after[-1] == 3                      # logged at the first log step after the job's results appeared
    assert "submitted" not in done.stderr and "Slurm job 4242" in done.stdout
    # keep=2, but no job has run: every checkpoint a job has yet to read is still there
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert tags == ["step_00000002", "step_00000004", "step_00000006"]
    marker = run_dir / "evals" / "step_00000002" / "PENDING"
    assert marker.is_file() and f"rm -f {marker}" in (run_dir / "slurm" / "eval-step_00000002.sbatch").read_text()
    for step in (2, 4):                                # their jobs end (the scripts' last line)
        (run_dir / "evals" / f"step_{step:08d}" / "PENDING").unlink()
    # a later invocation logs results that finished after training ended, once
    from evals.common import write_results
    write_results(str(run_dir / "evals" / "step_00000006" / "ppl"), "ppl", {"nll_mean": 1.25}, {})
    again = braid_train(config, "train.max_steps=6", patch=patch)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(r["step"], r["eval/ppl/nll_mean"]) for r in records(str(run_dir)) if "eval/ppl/nll_mean" in r] == \
        [(2, 1.5), (6, 1.25)]
    more = braid_train(config, "train.max_steps=8", patch=patch)      # the next save prunes what is done
    assert more.returncode == 0, more.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]


def test_evals_deferred_by_a_preemption_run_on_resume(tmp_path, shards, eval_tokenizer_path):
    config = write_config(tmp_path, shards, eval_tokenizer_path, {"ppl": ppl_options(shards)})
    # a preemption signal arrives at step 2, a due step: the save happens, its evals wait for the restart
    patch = ("import pretrain.train as t\n"
             "calls = [0]\n"
             "def agreed(self):\n"
             "    calls[0] += 1\n"
             "    return calls[0] == 2\n"
             "t.StopRequest.agreed = agreed\n")
    first = braid_train(config, patch=patch)
    assert first.returncode == 75, first.stderr[-3000:]
    assert "evals of step 2 deferred: preempted" in first.stderr
    run_dir = str(tmp_path / "run")
    assert eval_steps(run_dir, "ppl") == []
    second = braid_train(config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert eval_steps(run_dir, "ppl") == [2, 4]


def test_a_result_already_in_metrics_is_not_logged_again(tmp_path, shards, eval_tokenizer_path):
    """A kill between the metrics record and logged.json: the record itself says it was logged."""
    from pretrain.config import train_config
    from pretrain.evals_hook import EvalHook
    import yaml
    from evals.common import write_results
    cfg = train_config(yaml.safe_load(open(write_config(tmp_path, shards, eval_tokenizer_path, {"ppl": "smoke"}))))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_results(str(run_dir / "evals" / "step_00000002" / "ppl"), "ppl", {"nll_mean": 2.0}, {})
    write_results(str(run_dir / "evals" / "step_00000004" / "ppl"), "ppl", {"nll_mean": 1.0}, {})
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/ppl/nll_mean": 2.0}) + "\n")
    logged = []
    assert EvalHook(cfg, active=True, log=logged.append).collect() == 1
    assert logged == [{"step": 4, "eval/ppl/nll_mean": 1.0}]
