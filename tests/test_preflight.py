"""What `braid train` checks before its first step, without training: data against the model, the global
batch, the window, a checkpoint's model against the config, threads; and launch.torchrun's quiet requeue."""
import json
import logging
import signal
import os

import pytest

from launch.config_io import load_config
from model.config import ConfigError
from pretrain import checkpoint
from pretrain.config import train_config
from pretrain.preflight import check_data, startup_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def config(*overrides):
    return train_config(load_config(TINY, ["train.val_every=0", *overrides]))


def prepared(tmp_path, name="data", vocab=4096, row_length=257, sha="a" * 64, rows=(10, 6)):
    """A prepared folder as `braid data prepare` leaves it, shards left out: braid_data.json and train/index.json."""
    folder = tmp_path / name
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "index.json").write_text(json.dumps({"version": 2, "shards": [{"samples": n} for n in rows]}))
    (folder / "braid_data.json").write_text(json.dumps({
        "row_length": row_length, "vocab_size": vocab, "eos_id": 0, "pad_id": 1,
        "tokenizer": {"path": str(folder / "tokenizer.json"), "sha256": sha, "vocab_size": vocab}}))
    return str(folder / "train")


def test_data_vocabulary_must_match_the_model(tmp_path):
    data = prepared(tmp_path)
    assert [s.rows for s in check_data(config(f"data.train=[{data}]", "data.val=null"))] == [16]
    with pytest.raises(ConfigError) as small:
        check_data(config(f"data.train=[{data}]", "data.val=null", "model.vocab_size=1000"))
    assert str(small.value).startswith("model.vocab_size=1000 is smaller than the 4096-token vocabulary of "
                                       f"{tmp_path}/data/braid_data.json")
    assert str(small.value).endswith("set model.vocab_size=4096")
    with pytest.raises(ConfigError, match=r"model.vocab_size=32000 but .*braid_data.json .* has 4096 tokens: 27904 "
                                          r"embedding rows would never be trained"):
        check_data(config(f"data.train=[{data}]", "data.val=null", "model.vocab_size=32000"))
    # Megatron-style padding up to a multiple of 128 x tp is fine; past it is not
    odd = prepared(tmp_path, "odd", vocab=4000)
    check_data(config(f"data.train=[{odd}]", "data.val=null", "model.vocab_size=4096"))
    check_data(config(f"data.train=[{odd}]", "data.val=null", "model.vocab_size=4096"), tp=2)
    with pytest.raises(ConfigError, match=r"pad it to at most 4096, a multiple of 128"):
        check_data(config(f"data.train=[{odd}]", "data.val=null", "model.vocab_size=4224"))


def test_streams_share_one_tokenizer_and_rows_fit_seq_len(tmp_path):
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b", sha="b" * 64)
    with pytest.raises(ConfigError, match=r"a/braid_data.json was tokenized with .*, .*b/braid_data.json with .*"
                                          r"the streams of one run must share a tokenizer"):
        check_data(config(f"data.train=[{a}, {b}]", "data.val=null"))
    with pytest.raises(ConfigError, match=r"share a tokenizer"):                     # the validation stream too
        check_data(config(f"data.train=[{a}]", f"data.val={os.path.dirname(b)}/train"))
    with pytest.raises(ConfigError, match=r"data.seq_len=128 needs rows of 129 tokens, but .*a/braid_data.json has "
                                          r"rows of 257 .* set data.seq_len=256"):
        check_data(config(f"data.train=[{a}]", "data.val=null", "data.seq_len=128", "model.attn.window=64"))


def test_window_longer_than_the_sequence_is_an_error():
    with pytest.raises(ConfigError, match=r"model.attn.window=512 is longer than data.seq_len=256"):
        config("model.attn.window=512")
    config("model.attn.window=256")
    config("model.pattern=M-*-", "model.attn.window=512")            # no sliding-window layer: nothing to say


def test_global_batch_fixes_tokens_per_step_across_data_parallel_sizes():
    cfg = config("data.global_batch=32", "data.micro_batch=4")
    assert [cfg.batch_plan(dp) for dp in (1, 2, 4, 8)] == [(8, 32), (4, 32), (2, 32), (1, 32)]
    with pytest.raises(ConfigError, match=r"data.global_batch=32 is not a multiple of data.micro_batch=4 x 16 "
                                          r"data-parallel ranks = 64"):
        cfg.batch_plan(16)
    both = config("data.global_batch=32", "data.micro_batch=4", "train.grad_accum=2")
    assert both.batch_plan(4) == (2, 32)
    with pytest.raises(ConfigError, match=r"data.global_batch=32 but data.micro_batch=4 x train.grad_accum=2 x "
                                          r"2 data-parallel ranks = 16"):
        both.batch_plan(2)
    plain = config("data.micro_batch=4")                              # no global batch: it follows the ranks
    assert plain.batch_plan(2) == (1, 8) and config("train.grad_accum=3").batch_plan(1) == (3, 24)
    with pytest.raises(ConfigError, match="data.global_batch=0: must be a positive integer"):
        config("data.global_batch=0")
    from pretrain.parallel import plan_layout                         # what the launchers check before starting
    with pytest.raises(ConfigError, match="is not a multiple of"):
        plan_layout(config("data.global_batch=8", "data.micro_batch=8"), 2)


def test_startup_summary_says_batch_data_threads_and_start(tmp_path):
    from pretrain.parallel import plan_layout
    data = prepared(tmp_path, rows=(100, 28))
    cfg = config(f"data.train=[{data}]", "data.val=null", "data.global_batch=16", "data.micro_batch=4",
                 "train.max_steps=20")
    layout = plan_layout(cfg, 2)
    lines = startup_lines(cfg, layout, check_data(cfg), 2, 16, "1 per rank (test)", None, None)
    text = "\n".join(lines)
    assert "parameters (" in lines[0] and "'M-G-S-R-*-'" in lines[0]
    assert "ranks: 2 (tp 1 x pp 1 x dp 2)" in text
    assert "batch: 16 sequences x 256 tokens = 4,096 tokens per step (data.micro_batch 4 x grad_accum 2 x " \
           "2 data-parallel ranks)" in text
    assert f"{tmp_path}/data/train: 128 rows = 32,768 training tokens; 20 steps read 81,920 tokens = 2.50 epochs" in text
    assert "threads: 1 per rank (test)" in text and lines[-1].startswith("start: step 0 of 20")
    resumed = startup_lines(cfg, layout, check_data(cfg), 2, 16, "x", 12, "RUN/checkpoints/step_00000012")
    assert resumed[-1] == "resumed from step 12 of 20 (RUN/checkpoints/step_00000012)"


def saved_checkpoint(run_dir, model, layout=None, step=4):
    tag = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    os.makedirs(tag)
    with open(os.path.join(tag, checkpoint.INFO), "w") as f:
        json.dump({"step": step, "layout": layout or {"tp": 1, "pp": 1, "dp": 1}, "model": model}, f)
    with open(os.path.join(run_dir, "checkpoints", checkpoint.LATEST), "w") as f:
        f.write(f"step_{step:08d}")


def test_resuming_with_another_model_names_the_field(tmp_path):
    cfg = config()
    saved_checkpoint(str(tmp_path), cfg.model.to_dict())
    layout = {"tp": 1, "pp": 1, "dp": 1}
    assert checkpoint.resume_point(str(tmp_path), layout, cfg.model.to_dict())["step"] == 4
    # how the weights run, and the informational training length, may change
    assert checkpoint.resume_point(str(tmp_path), layout, config("model.kernels=reference",
                                                                 "model.max_seq_len=8192").model.to_dict())
    with pytest.raises(ValueError) as err:
        checkpoint.resume_point(str(tmp_path), layout, config("model.attn.window=32").model.to_dict())
    assert str(err.value).startswith(f"checkpoint {tmp_path}/checkpoints/step_00000004 was saved with "
                                     "model.attn.window=64, this run's config has model.attn.window=32: a resumed run "
                                     "keeps its model (only model.kernels and model.max_seq_len may change)")
    with pytest.raises(ValueError, match=r"model.d_model=128, this run's config has model.d_model=64 \(and 1 more"):
        checkpoint.resume_point(str(tmp_path), layout, config("model.d_model=64", "model.vocab_size=512").model.to_dict())
    with pytest.raises(ValueError, match=r"saved with tp=1 pp=1 dp=1, this run has tp=1 pp=1 dp=2"):
        checkpoint.resume_point(str(tmp_path), {"tp": 1, "pp": 1, "dp": 2}, cfg.model.to_dict())


def test_threads_are_a_share_of_the_usable_cores(monkeypatch):
    import torch

    from launch import threads
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        line = threads.configure_threads(4)
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert line.startswith("2 per rank (8 usable cores / 4 ranks on this machine")
        monkeypatch.setenv("OMP_NUM_THREADS", "3")                   # the user's setting wins
        assert threads.configure_threads(4).startswith("3 per rank (OMP_NUM_THREADS=3 from the environment")
        assert torch.get_num_threads() == 3
        assert threads.threads_per_rank(16) == 1
    finally:
        torch.set_num_threads(before)
        monkeypatch.undo()
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_torchrun_wrapper_is_quiet_when_every_rank_stopped_for_requeue(monkeypatch, caplog):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launch import torchrun

    def failing(codes):
        def run(args):
            agent = logging.getLogger(torchrun._AGENT_LOGGER)
            for rank, code in enumerate(codes):
                agent.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", code, rank, 1, "python")
            agent.warning("Sending process %s closing signal %s", 2, "SIGTERM")
            raise ChildFailedError("launch.cli", {r: ProcessFailure(r, 100 + r, c, "<N/A>")
                                                  for r, c in enumerate(codes)})
        return run

    argv = ["--nproc_per_node=2", "-m", "launch.cli", "train", "x.yaml"]
    monkeypatch.setattr(torchrun, "run", failing([75, 75]))
    with caplog.at_level(logging.INFO):
        assert torchrun.main(argv) == 75
    assert not [r for r in caplog.records if r.name == torchrun._AGENT_LOGGER]      # nothing said about it
    caplog.clear()
    # one rank exited 75 first and the agent stopped the other while it was exiting (seen under load)
    monkeypatch.setattr(torchrun, "run", failing([-signal.SIGTERM, 75]))
    with caplog.at_level(logging.INFO):
        assert torchrun.main(argv) == 75
    assert not [r for r in caplog.records if r.name == torchrun._AGENT_LOGGER]
    for codes in ([75, 1], [-signal.SIGTERM, 1], [-signal.SIGKILL]):       # a real failure: all of it
        caplog.clear()
        monkeypatch.setattr(torchrun, "run", failing(codes))
        with caplog.at_level(logging.INFO), pytest.raises(ChildFailedError):
            torchrun.main(argv)
        assert len([r for r in caplog.records if r.name == torchrun._AGENT_LOGGER]) == len(codes) + 1, codes
