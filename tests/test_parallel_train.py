"""Tensor, pipeline and data parallelism in `braid train` compute what one process computes.

Each layout trains the same model on the same data (global batch fixed) for 3 steps under
torchrun with gloo; losses, gradient norms and validation loss must equal the single
process's (fp32, 1e-5 relative).
"""
import json
import os

import pytest
import torch

from conversion.checkpoint import load_training_checkpoint
from test_train import assert_resumed_from, braid_train, losses, tag_logged_records, torchrun, write_config

pytestmark = pytest.mark.slow


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def by_step(run_dir, key):
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards):
    tmp = tmp_path_factory.mktemp("single")
    out = braid_train(write_config(tmp, shards, max_steps=3, val_every=3, val_samples=4, val_lengths=[1]),
                      f"data.val={shards}")
    assert out.returncode == 0, out.stdout[-2000:]
    return str(tmp / "run")


def assert_same_run(run_dir, reference):
    for key in ("loss", "grad_norm", "val_loss@1x"):
        mine, theirs = by_step(run_dir, key), by_step(reference, key)
        assert sorted(mine) == sorted(theirs), key
        for step in theirs:
            assert abs(mine[step] - theirs[step]) <= 1e-5 * abs(theirs[step]), (key, step, mine[step], theirs[step])


@pytest.mark.parametrize("nproc, overrides", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2"]),                                          # balanced by parameters
    (2, ["data.micro_batch=1", "parallel.zero_stage=2"]),            # DP=2 at the same global batch
    (2, ["data.micro_batch=1", "parallel.zero_stage=3"]),
    (4, ["parallel.tp=2", "parallel.pp=2"]),
    (2, ["parallel.pp=2", "model.pattern=M-G-S|R-*-", "train.activation_checkpointing=true"]),
    (2, ["parallel.pp=2", "model.tie_embeddings=false"]),
    (2, ["parallel.tp=2", "model.tie_embeddings=false", "train.activation_checkpointing=M*"]),
], ids=["tp2", "pp2", "dp2-zero2", "dp2-zero3", "tp2xpp2", "pp2-cut-at-bar-recompute", "pp2-untied",
        "tp2-untied-recompute"])
def test_layouts_match_one_process(tmp_path, shards, single, nproc, overrides):
    config = write_config(tmp_path, shards, max_steps=3, val_every=3, val_samples=4, val_lengths=[1])
    reference = single
    if any(o.startswith("model.") for o in overrides):     # another model: its own single-process run
        (tmp_path / "one").mkdir()
        one = write_config(tmp_path / "one", shards, max_steps=3, val_every=3, val_samples=4, val_lengths=[1])
        out = braid_train(one, f"data.val={shards}", *[o for o in overrides if o.startswith("model.")])
        assert out.returncode == 0, out.stdout[-2000:]
        reference = str(tmp_path / "one" / "run")
    out = torchrun(config, nproc, f"data.val={shards}", *overrides)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "error" in line.lower()]
    assert out.returncode == 0, "\n".join(errors[-10:]) or out.stderr[-3000:]
    assert_same_run(str(tmp_path / "run"), reference)
    tag = tmp_path / "run" / "checkpoints" / "step_00000003"
    settings = dict(o.split("=", 1) for o in overrides)
    tp, pp = int(settings.get("parallel.tp", 1)), int(settings.get("parallel.pp", 1))
    layout = {"tp": tp, "pp": pp, "dp": nproc // (tp * pp)}
    info = json.loads((tag / "braid.json").read_text())
    assert (info["step"], info["layout"]) == (3, layout)
    if tp == pp == 1:     # each data-parallel rank saved its ZeRO partition, of the stage asked for
        for dp_rank in range(layout["dp"]):    # files this test just wrote: trusted, full unpickling
            saved = torch.load(tag / f"zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt", weights_only=False)
            assert int(saved["optimizer_state_dict"]["zero_stage"]) == int(settings["parallel.zero_stage"])
    if pp > 1:      # one file per pipeline layer and tensor-parallel rank, each rank's shard of the weights
        for rank in range(tp):
            embed = torch.load(tag / f"layer_00-model_{rank:02d}-model_states.pt", weights_only=True)
            assert embed["embed.weight"].shape == (256 // tp, 64)
    # The shards consolidate into the weights one process trained. Not to 1e-5: AdamW's first steps
    # move each weight by about lr * sign(grad), so the 1e-7 gradient differences of another
    # summation order show up as ~5e-4 of a tensor's largest weight; a wrong merge is off by ~1.
    state, cfg, _ = load_training_checkpoint(str(tmp_path / "run"))
    reference_state, reference_cfg, _ = load_training_checkpoint(reference)
    assert cfg == reference_cfg and sorted(state) == sorted(reference_state)
    worst = {name: ((state[name] - tensor).abs().max() / tensor.abs().max().clamp_min(1e-12)).item()
             for name, tensor in reference_state.items()}
    assert max(worst.values()) < 5e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_pipeline_resume_is_exact_and_layout_is_checked(tmp_path, shards):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unbroken = write_config(tmp_path / "a", shards, max_steps=6)
    assert torchrun(unbroken, 2, "parallel.pp=2").returncode == 0
    broken = write_config(tmp_path / "b", shards, max_steps=6)
    assert torchrun(broken, 2, "parallel.pp=2", "train.stop_after=3").returncode == 0
    info = json.loads((tmp_path / "b" / "run" / "checkpoints" / "step_00000003" / "braid.json").read_text())
    assert (info["step"], info["layout"], info["model"]["vocab_size"]) == (3, {"tp": 1, "pp": 2, "dp": 1}, 256)
    other = braid_train(broken)                               # one process cannot take a 2-stage checkpoint
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].endswith(
        "step_00000003 was saved with tp=1 pp=2 dp=1, this run has tp=1 pp=1 dp=1: "
        "resume with the same parallel.tp/pp and number of ranks")
    tag_logged_records(str(tmp_path / "b" / "run"))
    assert torchrun(broken, 2, "parallel.pp=2").returncode == 0
    assert_resumed_from(str(tmp_path / "b" / "run"), 3)
    assert losses(str(tmp_path / "b" / "run")) == losses(str(tmp_path / "a" / "run"))


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=3"], "parallel.tp=1 x parallel.pp=3 = 3 does not divide the 1 ranks"),
    (["parallel.tp=3"], "model.vocab_size=256 is not divisible by tensor-parallel size parallel.tp=3"),
    (["parallel.pp=2", "model.pattern=M-|S-|R-"], "model.pattern='M-|S-|R-' marks 3 stages with '|', but parallel.pp=2"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage=2 with parallel.pp=2: DeepSpeed's pipeline "
                                                 "engine takes ZeRO stage 1 only"),
    (["parallel.pp=1", "model.pattern=M-|S-"], None),                                   # '|' ignored at pp=1
])
def test_layout_errors_before_any_process_group(tmp_path, shards, overrides, message):
    out = braid_train(write_config(tmp_path, shards, max_steps=1), *overrides)
    if message is None:
        assert out.returncode == 0, out.stdout[-2000:]
    else:
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == f"braid: error: {message}"


def test_consolidation_errors_name_the_file_or_tensor(tmp_path, shards):
    config = write_config(tmp_path, shards, max_steps=1)
    assert torchrun(config, 2, "parallel.pp=2").returncode == 0
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    info = json.loads((tag / "braid.json").read_text())
    (tag / "braid.json").write_text(json.dumps({**info, "model": {**info["model"], "mlp_hidden": 128}}))
    with pytest.raises(ValueError, match=r"tensor layers\.1\.mixer\.\w+_proj\.weight has shape \(\d+, \d+\), "
                                         r"the model config expects \(\d+, \d+\)"):
        load_training_checkpoint(str(tmp_path / "run"))
    (tag / "braid.json").write_text(json.dumps(info))
    (tag / "layer_03-model_00-model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_03-model_00-model_states\.pt: missing \(the checkpoint is partial\)"):
        load_training_checkpoint(str(tag))
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
        load_training_checkpoint(str(tmp_path / "run"), step=7)
