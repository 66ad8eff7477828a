"""The training loop end to end on CPU: exact resume, preemption by SIGTERM, errors.

Each run is a fresh process (as under a launcher), on a small shard set written here.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def write_config(tmp_path, shards, checkpoint_every=100, **train):
    config = {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"preset": "tiny", "vocab_size": 256, "d_model": 64, "mlp_hidden": 96,
                  "attn": {"window": 8}, "gla": {"chunk_size": 8}},
        "data": {"train": [shards], "seq_len": 32, "micro_batch": 2},
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 8, "log_every": 1, **train},
        "checkpoint": {"every": checkpoint_every, "keep": 2}, "logging": {"tensorboard": False},
    }
    path = tmp_path / "config.yaml"
    import yaml
    path.write_text(yaml.safe_dump(config))
    return str(path)


def braid_train(config, *overrides, wait=True, patch=""):
    """`braid train` in a fresh process; `patch` is Python run first (fault injection by the test)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-c", f"{patch}\nfrom launch.cli import main\nraise SystemExit(main())",
           "train", config, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)



def torchrun(config, nproc, *overrides):
    """`braid train` as `nproc` ranks under torchrun on a free port."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "launch.cli", "train", config, *overrides]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# A deterministic CPU run that silently started over would log the same losses again, so equal curves
# alone do not show a resume. Records logged before a restart are tagged; a resumed run keeps the ones up
# to its checkpoint (tag included), a run that started over drops them all and logs untagged ones.
_BEFORE_RESTART = "logged_before_restart"


def tag_logged_records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    with open(path, "w") as f:
        for line in lines:
            try:
                f.write(json.dumps({**json.loads(line), _BEFORE_RESTART: True}) + "\n")
            except json.JSONDecodeError:      # a half-written last line stays as it is
                f.write(line)


def assert_resumed_from(run_dir, step):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = list(map(json.loads, f))
    kept = [r["step"] for r in records if r.get(_BEFORE_RESTART)]
    assert kept and max(kept) == step and all(r.get(_BEFORE_RESTART) for r in records if r["step"] <= step), \
        f"did not resume from step {step}: records kept from before the restart: {kept}"
    assert not any(r.get(_BEFORE_RESTART) for r in records if r["step"] > step)


def test_resume_continues_the_unbroken_loss_curve(tmp_path, shards):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unbroken = write_config(tmp_path / "a", shards)
    assert braid_train(unbroken).returncode == 0
    broken = write_config(tmp_path / "b", shards)
    first = braid_train(broken, "train.stop_after=4")
    assert first.returncode == 0, first.stdout[-2000:]
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')                  # a line a kill left half-written
    tag_logged_records(str(tmp_path / "b" / "run"))
    second = braid_train(broken)                     # same run dir: resumes from step 4
    assert second.returncode == 0, second.stdout[-2000:]
    assert_resumed_from(str(tmp_path / "b" / "run"), 4)
    a, b = losses(str(tmp_path / "a" / "run")), losses(str(tmp_path / "b" / "run"))
    assert sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]     # bitwise, CPU is deterministic
    assert a[8] < a[1]
    # the start-up summary, and where each invocation started
    for line in ("braid: model: ", " parameters (", "braid: batch: 2 sequences x 32 tokens = 64 tokens per step "
                 "(data.micro_batch 2 x grad_accum 1 x 1 data-parallel rank)", "braid: threads: ",
                 f"braid: start: step 0 of 8 (no checkpoint in {tmp_path / 'b' / 'run' / 'checkpoints'})"):
        assert line in first.stdout, (line, first.stdout[-2000:])
    assert (f"braid: resumed from step 4 of 8 ({tmp_path / 'b' / 'run' / 'checkpoints' / 'step_00000004'})"
            in second.stdout), second.stdout[-2000:]
    # a changed model is refused before anything is built, naming the field and both values
    changed = braid_train(broken, "train.max_steps=10", "model.attn.window=4")
    assert changed.returncode == 2 and changed.stderr.strip().splitlines()[-1].startswith(
        f"braid: error: checkpoint {tmp_path / 'b' / 'run' / 'checkpoints' / 'step_00000008'} was saved with "
        "model.attn.window=8, this run's config has model.attn.window=4: a resumed run keeps its model")
    assert sorted(losses(str(tmp_path / "b" / "run"))) == list(range(1, 9))

    # log_every=4: each record is the mean loss of the 4 steps since the previous one
    (tmp_path / "c").mkdir()
    every4 = write_config(tmp_path / "c", shards, log_every=4)
    assert braid_train(every4).returncode == 0
    c = losses(str(tmp_path / "c" / "run"))
    assert sorted(c) == [4, 8]
    assert c[4] == (a[1] + a[2] + a[3] + a[4]) / 4 and c[8] == (a[5] + a[6] + a[7] + a[8]) / 4


def test_sigterm_saves_and_exits_for_requeue(tmp_path, shards):
    config = write_config(tmp_path, shards, max_steps=100000)
    proc = braid_train(config, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-2000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    saved_step = int(latest.split("_")[1])
    assert saved_step == max(losses(str(tmp_path / "run"))) and saved_step >= 3
    tag_logged_records(str(tmp_path / "run"))
    resumed = braid_train(config, f"train.stop_after={saved_step + 2}")
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert_resumed_from(str(tmp_path / "run"), saved_step)
    assert max(losses(str(tmp_path / "run"))) == saved_step + 2


def test_errors_are_one_line(tmp_path, shards):
    config = write_config(tmp_path, shards)
    bad = braid_train(config, "train.max_stpes=3")
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        "train.max_stpes: unknown key (known: activation_checkpointing, grad_accum, log_every, max_nonfinite, "
        "max_steps, stop_after, val_every, val_lengths, val_samples)")
    missing = braid_train(config, f"data.train=[{tmp_path}/nowhere]")
    assert missing.returncode == 2 and "nowhere" in missing.stderr.splitlines()[-1]
    os.makedirs(tmp_path / "run" / "checkpoints", exist_ok=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000099")
    gone = braid_train(config)
    assert gone.returncode == 2 and "step_00000099, which is missing" in gone.stderr.splitlines()[-1]
    (tmp_path / "run" / "checkpoints" / "step_00000099").mkdir()          # present but empty: corrupt
    corrupt = braid_train(config)
    assert corrupt.returncode == 2 and "cannot be loaded" in corrupt.stderr.splitlines()[-1]


def test_two_data_parallel_ranks_match_one_process(tmp_path, shards):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = write_config(tmp_path / "one", shards, max_steps=4)
    assert braid_train(single, "data.global_batch=4").returncode == 0                # 2 micro-steps of 2
    double = write_config(tmp_path / "two", shards, max_steps=4)
    out = torchrun(double, 2, "data.global_batch=4", "data.micro_batch=1")         # 2 ranks x 2 micro-steps of 1
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "braid: batch: 4 sequences x 32 tokens = 128 tokens per step (data.micro_batch 1 x grad_accum 2 x " \
           "2 data-parallel ranks)" in out.stdout
    one, two = records(str(tmp_path / "one" / "run")), records(str(tmp_path / "two" / "run"))
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-5 * abs(one[step]["loss"]), (step, one[step], two[step])
        assert one[step]["tokens"] == two[step]["tokens"] == step * 128
    # a global batch that the ranks cannot split is refused before any step
    bad = torchrun(double, 2, "data.global_batch=2", "data.micro_batch=2", "run_dir=" + str(tmp_path / "bad"))
    assert bad.returncode != 0 and "data.global_batch=2 is not a multiple of data.micro_batch=2 x 2 data-parallel " \
        "ranks = 4" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_data_and_model_vocabularies_are_compared_before_the_first_step(tmp_path, shards):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shards, data / "train")
    (data / "braid_data.json").write_text(json.dumps({"row_length": 33, "vocab_size": 256, "eos_id": 0,
                                                      "tokenizer": {"path": "tok.json", "sha256": "0" * 64,
                                                                    "vocab_size": 256}}))
    config = write_config(tmp_path, str(data / "train"))
    small = braid_train(config, "model.vocab_size=200")
    assert small.returncode == 2 and small.stderr.strip().splitlines()[-1] == (
        f"braid: error: model.vocab_size=200 is smaller than the 256-token vocabulary of {data}/braid_data.json "
        "(tokenizer tok.json): token ids up to 255 would index past the embedding; set model.vocab_size=256")
    large = braid_train(config, "model.vocab_size=4096")
    assert large.returncode == 2 and "model.vocab_size=4096 but" in large.stderr.splitlines()[-1]
    rows = braid_train(config, "data.seq_len=16")
    assert rows.returncode == 2 and "data.seq_len=16 needs rows of 17 tokens" in rows.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()                       # nothing started


def test_validation_at_multiples_of_the_training_length(tmp_path, shards):
    config = write_config(tmp_path, shards, max_steps=6, val_every=3, val_samples=8, val_lengths=[1, 2])
    out = braid_train(config, f"data.val={shards}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        vals = [r for r in map(json.loads, f) if "val_loss@1x" in r]
    assert [r["step"] for r in vals] == [3, 6]
    for r in vals:
        for k in (1, 2):
            assert abs(r[f"val_ppl@{k}x"] - math.exp(r[f"val_loss@{k}x"])) < 1e-6 * r[f"val_ppl@{k}x"]
        assert r["val_loss@2x"] != r["val_loss@1x"]              # other sequences: a separate measurement
    assert vals[1]["val_loss@1x"] < vals[0]["val_loss@1x"]        # the counting data is being learned
    bad = braid_train(config, "train.val_every=3")                  # no data.val
    assert bad.returncode == 2 and "needs data.val" in bad.stderr.splitlines()[-1]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, shards):
    """Losses of an uninterrupted 8-step run, checkpointing every 2 steps."""
    tmp = tmp_path_factory.mktemp("unbroken")
    out = braid_train(write_config(tmp, shards, checkpoint_every=2))
    assert out.returncode == 0, out.stdout[-2000:]
    return losses(str(tmp / "run"))


def wait_for_steps(run_dir, count, proc, timeout=300):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} logged steps in {metrics}")


def test_sigkill_at_a_random_step_then_restart_matches_unbroken(tmp_path, shards, unbroken):
    import random
    # after step 3 is logged, step 2's checkpoint (checkpoint_every=2) is complete: one process saves
    # before it starts the next step; printed in the failure messages below
    kill_after = random.Random().randint(3, 6)
    config = write_config(tmp_path, shards, checkpoint_every=2)
    proc = braid_train(config, wait=False)
    wait_for_steps(str(tmp_path / "run"), kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill after step {kill_after}"
    saved = int((tmp_path / "run" / "checkpoints" / "latest").read_text().split("_")[1])
    tag_logged_records(str(tmp_path / "run"))
    restarted = braid_train(config)
    assert restarted.returncode == 0, restarted.stdout[-2000:]
    assert_resumed_from(str(tmp_path / "run"), saved)
    resumed = losses(str(tmp_path / "run"))
    assert resumed == unbroken, f"killed after step {kill_after}"     # bitwise, and no duplicate steps


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, shards, unbroken):
    # The process dies half-way through writing step 4's first file: `latest` still names step 2.
    patch = """
import os, signal
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
real_save = TorchCheckpointEngine.save
def save(self, state_dict, path):
    if "step_00000004" in path:
        open(path, "wb").write(b"PK half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, state_dict, path)
TorchCheckpointEngine.save = save
"""
    config = write_config(tmp_path, shards, checkpoint_every=2)
    killed = braid_train(config, patch=patch)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run" / "checkpoints"
    assert (run / "latest").read_text() == "step_00000002" and (run / "step_00000004").is_dir()
    tag_logged_records(str(tmp_path / "run"))
    restarted = braid_train(config)
    assert restarted.returncode == 0, restarted.stdout[-2000:]
    assert_resumed_from(str(tmp_path / "run"), 2)
    assert losses(str(tmp_path / "run")) == unbroken
    assert (run / "latest").read_text() == "step_00000008"


NAN_LOSS = """
import pretrain.parallel as t
real_loss_fn, calls = t.loss_fn, [0]
def loss_fn(logits, labels, reduction="mean"):
    calls[0] += 1
    loss = real_loss_fn(logits, labels, reduction)
    return loss * float("nan") if calls[0] in NAN_CALLS else loss
t.loss_fn = loss_fn
"""


def test_a_nonfinite_step_is_skipped_and_logged(tmp_path, shards):
    out = braid_train(write_config(tmp_path, shards), patch="NAN_CALLS = {3}" + NAN_LOSS)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "step 3: non-finite loss or gradient" in out.stdout
    r = records(str(tmp_path / "run"))
    assert sorted(r) == list(range(1, 9))
    assert r[3]["skipped"] and r[3]["loss"] is None and r[3]["grad_norm"] is None
    assert r[3]["lr"] == r[2]["lr"] != r[4]["lr"]           # the schedule did not advance on the skipped step
    assert all(r[s]["loss"] is not None and "skipped" not in r[s] for s in r if s != 3)


def test_too_many_nonfinite_steps_stop_naming_the_last_good_checkpoint(tmp_path, shards):
    config = write_config(tmp_path, shards, checkpoint_every=2, max_nonfinite=3)
    out = braid_train(config, patch="NAN_CALLS = set(range(3, 100))" + NAN_LOSS)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("braid: error: steps 3..5: 3 non-finite steps in a row (train.max_nonfinite=3)"), last
    assert last.endswith(os.path.join("checkpoints", "step_00000004")), last
    assert max(records(str(tmp_path / "run"))) == 5


def test_signal_to_one_data_parallel_rank_stops_both(tmp_path, shards):
    """Only rank 1 is signalled: both ranks agree, save together and exit for requeue.
    The ranks are started directly (not under torchrun, which kills the others when one exits)."""
    config = write_config(tmp_path, shards, max_steps=100000)
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        ranks.append(subprocess.Popen([sys.executable, "-m", "launch.cli", "train", config, "data.micro_batch=1"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_for_steps(str(tmp_path / "run"), 3, ranks[0])
    ranks[1].send_signal(signal.SIGUSR1)
    outs = [proc.communicate(timeout=300)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [75, 75], outs[0][-2000:] + outs[1][-2000:]
    assert "preempted (signal on another rank)" in outs[0]
    saved = int((tmp_path / "run" / "checkpoints" / "latest").read_text().split("_")[1])
    assert saved == max(losses(str(tmp_path / "run")))


# Counts the sublayers recomputed in backward (torch.utils.checkpoint calls), printed at exit.
COUNT_RECOMPUTED = """
import atexit, collections, torch.utils.checkpoint as tc
real_checkpoint, recomputed = tc.checkpoint, collections.Counter()
def checkpoint(function, *args, **kwargs):
    recomputed[getattr(function, "kind", "?")] += 1
    return real_checkpoint(function, *args, **kwargs)
tc.checkpoint = checkpoint
import model.hybrid, pretrain.parallel
model.hybrid.checkpoint = pretrain.parallel.checkpoint = checkpoint
atexit.register(lambda: print("RECOMPUTED", dict(sorted(recomputed.items()))))
"""


def _recomputed(stdout):
    line = [x for x in stdout.splitlines() if x.startswith("RECOMPUTED ")][-1]
    return __import__("ast").literal_eval(line.removeprefix("RECOMPUTED "))


def test_activation_checkpointing_and_wandb_offline(tmp_path, shards, unbroken):
    import wandb  # noqa: F401  (a dev dependency: its absence is a failure, not a skip)
    config = write_config(tmp_path, shards, checkpoint_every=2, activation_checkpointing=True)
    out = braid_train(config, "logging.wandb.enabled=true", "train.stop_after=4", patch=COUNT_RECOMPUTED)
    assert out.returncode == 0, out.stdout[-2000:]
    # 4 steps x the 10 sublayers of M-G-S-R-*- recomputed
    assert _recomputed(out.stdout) == {"attention": 4, "gla": 4, "mamba": 4, "mlp": 20, "rglru": 4, "swa": 4}
    out = braid_train(config, "logging.wandb.enabled=true")                       # resumes the same W&B run
    assert out.returncode == 0, out.stdout[-2000:]
    assert losses(str(tmp_path / "run")) == unbroken                              # recomputation changes nothing
    run_id = (tmp_path / "run" / "wandb_id").read_text()
    logs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2 and all(b"tokens_per_s" in f.read_bytes() for f in logs)
    bad = braid_train(config, "train.activation_checkpointing=MX")
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        "train.activation_checkpointing='MX': X not in the model's sublayer kinds *-GMRS")
    only = braid_train(config, "run_dir=" + str(tmp_path / "only"), "train.activation_checkpointing=M*",
                       "train.max_steps=2", patch=COUNT_RECOMPUTED)
    assert only.returncode == 0 and _recomputed(only.stdout) == {"attention": 2, "mamba": 2}
    off = braid_train(config, "run_dir=" + str(tmp_path / "off"), "train.activation_checkpointing=false",
                      "train.max_steps=2", patch=COUNT_RECOMPUTED)
    assert off.returncode == 0 and _recomputed(off.stdout) == {}
