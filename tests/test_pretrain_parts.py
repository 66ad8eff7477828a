"""Training-loop parts that stand alone: LR schedules and weight-decay groups."""
import math

import pytest
import torch

from conftest import small_preset
from model import HybridLM
from pretrain.optim import decays, param_groups
from pretrain.schedule import ScheduleConfig, build_scheduler, lr_multiplier


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = ScheduleConfig(name="cosine", warmup_fraction=0.01, min_lr_ratio=0.1)
    lrs = [lr_multiplier(s, 1000, cfg) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)        # 10 warmup steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                        # monotone decay
    assert lrs[-1] == pytest.approx(0.1, abs=1e-4)
    mid = 10 + (1000 - 10) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 990)))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_holds_the_peak_then_decays(shape):
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.0)
    lrs = [lr_multiplier(s, 100, cfg) for s in range(101)]
    assert lrs[4] == 1.0 and all(lr == 1.0 for lr in lrs[5:80])
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:])) and lrs[100] == pytest.approx(0.0)
    if shape == "1-sqrt":
        assert lrs[90] == pytest.approx(1 - math.sqrt(0.5))


def test_scheduler_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=4e-4)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-4) and seen[1] == pytest.approx(4e-4) and seen[-1] < seen[2]


def test_bad_schedule_names_the_field():
    with pytest.raises(ValueError, match="^schedule.name"):
        ScheduleConfig(name="linear-ish")


def test_weight_decay_groups():
    model = HybridLM(small_preset("tiny", mamba=dict(version=1)))
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert not decayed & kept and len(decayed) + len(kept) == len(list(model.parameters()))
    for name in kept:
        assert any(key in name for key in ("norm", "bias", "A_log", ".D", "recurrent_param")), name
    assert "embed.weight" in decayed and any(n.endswith("A_log") for n in kept)
    assert any(n.endswith("recurrent_param") for n in kept) and any(n.endswith("input_gate_bias") for n in kept)
    assert all(decays(n, tuple(dict(model.named_parameters())[n].shape)) for n in decayed)
    assert any(n.endswith("q_proj.weight") for n in decayed) and any(n.endswith("input_gate_weight") for n in decayed)


def _config(**sections):
    from pretrain.config import train_config
    base = {"model": {"preset": "tiny"}, "data": {"train": ["data/tiny/train"], "seq_len": 256}}
    base.update(sections)
    return train_config(base)


def test_train_config_reads_sections_and_stream_shorthand():
    cfg = _config(data={"train": ["a/train", {"path": "b/train", "proportion": 0.3}], "seq_len": 128},
                  schedule={"name": "wsd", "decay_fraction": 0.1}, optim={"lr": 1e-3})
    assert [s.path for s in cfg.data.train] == ["a/train", "b/train"] and cfg.data.train[1].proportion == 0.3
    assert cfg.schedule.name == "wsd" and cfg.optim.lr == 1e-3 and cfg.model.pattern == "M-G-S-R-*-"
    assert cfg.to_dict()["data"]["seq_len"] == 128


@pytest.mark.parametrize("sections, message", [
    ({"train": {"max_stpes": 3}}, r"^train\.max_stpes: unknown key"),
    ({"data": {"train": [{"path": "x", "weight": 1}]}}, r"^data\.train\[0\]\.weight: unknown key"),
    ({"model": {"preset": "tiny", "d_modle": 3}}, r"model: unknown key"),
    ({"train": {"max_steps": 0}}, r"^train\.max_steps=0"),
    ({"data": {"train": []}}, r"^data\.train: needs at least one stream"),
    ({"parallel": {"tp": 0}}, r"^parallel\.tp=0: must be a positive integer"),
    ({"schedule": {"name": "step"}}, r"^schedule\.name='step'"),
    ({"parallel": {"zero_stage": 0}}, r"^parallel\.zero_stage=0: must be 1, 2 or 3"),
    ({"train": {"activation_checkpointing": "MQ"}}, r"^train\.activation_checkpointing='MQ': Q not in"),
    ({"train": {"max_nonfinite": 0}}, r"^train\.max_nonfinite=0: must be a positive integer"),
    ({"logging": {"wandb": {"mode": "cloud"}}}, r"^logging\.wandb\.mode='cloud'"),
    ({"logging": {"wandb": {"enabeld": True}}}, r"^logging\.wandb\.enabeld: unknown key"),
])
def test_train_config_errors_name_the_key(sections, message):
    with pytest.raises(ValueError, match=message) as err:     # ConfigError / ConfigFileError, both ValueErrors
        _config(**sections)
    assert "\n" not in str(err.value)
