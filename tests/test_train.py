"""The training loop end to end on CPU: exact resume, preemption by SIGTERM, errors.

Each run is a fresh process (as under a launcher), on a small shard set written here.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.mds import MDSWriter
    out = tmp_path_factory.mktemp("shards") / "train"
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16", "doc_starts": "ndarray:int32"}) as writer:
        for _ in range(256):
            start = rng.integers(0, 256)      # counting sequences: learnable in a few steps
            writer.write({"tokens": ((start + np.arange(33)) % 256).astype(np.uint16),
                          "doc_starts": np.array([0, 17], dtype=np.int32)})
    return str(out)


def write_config(tmp_path, shards, **train):
    config = {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"preset": "tiny", "vocab_size": 256, "d_model": 64, "mlp_hidden": 96,
                  "attn": {"window": 8}, "gla": {"chunk_size": 8}},
        "data": {"train": [shards], "seq_len": 32, "micro_batch": 2},
        "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 8, "log_every": 1, **train},
        "checkpoint": {"every": 100, "keep": 2}, "logging": {"tensorboard": False},
    }
    path = tmp_path / "config.yaml"
    import yaml
    path.write_text(yaml.safe_dump(config))
    return str(path)


def braid_train(config, *overrides, wait=True):
    env = {**os.environ, "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "launch.cli", "train", config, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)



def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_resume_continues_the_unbroken_loss_curve(tmp_path, shards):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unbroken = write_config(tmp_path / "a", shards)
    assert braid_train(unbroken).returncode == 0
    broken = write_config(tmp_path / "b", shards)
    first = braid_train(broken, "train.stop_after=4")
    assert first.returncode == 0, first.stdout[-2000:]
    second = braid_train(broken)                     # same run dir: resumes from step 4
    assert second.returncode == 0, second.stdout[-2000:]
    a, b = losses(str(tmp_path / "a" / "run")), losses(str(tmp_path / "b" / "run"))
    assert sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]     # bitwise, CPU is deterministic
    assert a[8] < a[1]


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
    resumed = braid_train(config, f"train.stop_after={saved_step + 2}")
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert max(losses(str(tmp_path / "run"))) == saved_step + 2


def test_errors_are_one_line(tmp_path, shards):
    config = write_config(tmp_path, shards)
    bad = braid_train(config, "train.max_stpes=3")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("train.max_stpes: unknown key (known: grad_accum, "
                                                               "log_every, max_steps, stop_after, val_every, "
                                                               "val_lengths, val_samples)")
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
    assert braid_train(single).returncode == 0
    double = write_config(tmp_path / "two", shards, max_steps=4)
    env = {**os.environ, "PYTHONPATH": ROOT}
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "launch.cli", "train", double, "data.micro_batch=1"]     # same global batch of 2
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    one, two = losses(str(tmp_path / "one" / "run")), losses(str(tmp_path / "two" / "run"))
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])


def test_validation_at_multiples_of_the_training_length(tmp_path, shards):
    config = write_config(tmp_path, shards, max_steps=6, val_every=3, val_samples=8, val_lengths=[1, 2])
    out = braid_train(config, f"data.val={shards}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        vals = [r for r in map(json.loads, f) if "val_loss@1x" in r]
    assert [r["step"] for r in vals] == [3, 6]
    for r in vals:
        assert all(k in r for k in ("val_loss@2x", "val_ppl@1x", "val_ppl@2x"))
        assert abs(r["val_ppl@1x"] - __import__("math").exp(r["val_loss@1x"])) < 1e-6 * r["val_ppl@1x"]
    assert vals[1]["val_loss@1x"] < vals[0]["val_loss@1x"]        # the counting data is being learned
    bad = braid_train(config, "train.val_every=3")                  # no data.val
    assert bad.returncode == 2 and "needs data.val" in bad.stderr.splitlines()[-1]
