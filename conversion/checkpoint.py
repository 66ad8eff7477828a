"""A training checkpoint as one unsharded state dict, with HybridLM's parameter names.

    state_dict, cfg, info = load_training_checkpoint("runs/tiny")          # or a step_* folder

DeepSpeed writes, per tag (pretrain/checkpoint.py adds braid.json: step, layout, model config):
  pp = 1:  mp_rank_{tp:02d}_model_states.pt     ["module"]: TP rank tp's whole model
  pp > 1:  layer_{i:02d}-model_{tp:02d}-model_states.pt   pipeline layer i of TP rank tp:
           0 embedding (and the tied head), 1..n sublayers, n+1 final norm, n+2 untied head
  ZeRO-3:  zero_pp_rank_{dp}_mp_rank_{tp:02d}_{model,optim}_states.pt: parameter shapes, and each
           data-parallel rank's fp32 part of every parameter
Merge rules: data-parallel replicas are identical under ZeRO 1/2 (the module weights are
whole; rank 0's are read); under ZeRO-3 each parameter is its data-parallel parts joined;
pipeline layers are renamed back (`layer.` of pipeline layer i -> `layers.{i-1}.`);
tensor-parallel shards are joined by model.sharding's rule per parameter (column: dim 0,
row: dim 1, fused projections part by part, replicated: rank 0's copy).
A weights-only checkpoint (`braid convert from-hf`) has one safetensors file per TP rank instead.
Files are read with torch.load(weights_only=True) or safetensors, and every shape is checked against the config.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import Tensor

from model import HybridLM, ModelConfig
from model.sharding import merge_tp_shards
from pretrain.checkpoint import INFO, LATEST, checkpoint_dir, latest_tag, load_weights_only

ZERO3_MODEL = "zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt"
ZERO3_OPTIM = "zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"


def resolve_tag(path: str, step: int | None = None) -> str:
    """The step_* folder for a run directory, or the folder itself when it is one."""
    if os.path.isfile(os.path.join(path, INFO)):
        return path
    root = checkpoint_dir(path)
    if step is not None:
        tag = os.path.join(root, f"step_{step:08d}")
        if not os.path.isdir(tag):
            steps = sorted(int(t[5:]) for t in (os.listdir(root) if os.path.isdir(root) else [])
                           if t.startswith("step_") and t[5:].isdigit() and os.path.isfile(os.path.join(root, t, INFO)))
            there = f"the checkpoints there are of steps {', '.join(map(str, steps))}" if steps else \
                f"{root} holds no checkpoint"
            raise FileNotFoundError(f"{tag}: no checkpoint of step {step}; {there}")
        return tag
    latest = latest_tag(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {INFO}) nor a run directory with a saved "
                                f"checkpoint (no {os.path.join(root, LATEST)})")
    return os.path.join(root, latest)


def _load(path: str, bar: Any = None) -> dict[str, Any]:
    """One checkpoint file, weights_only; `bar` (tqdm) counts the bytes read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the checkpoint is partial)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if bar is not None:
        bar.update(os.path.getsize(path))
    return loaded


def _load_zero_optimizer(path: str, bar: Any = None) -> dict[str, Any]:
    """A ZeRO optimizer-state file: weights_only=True with DeepSpeed's two plain record types allowed
    (the stage enum and the loss-scaler settings), nothing that can run code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return _load(path, bar)


def _zero3_tp_rank_state(tag: str, tp_rank: int, dp: int, bar: Any = None) -> dict[str, Tensor]:
    """TP rank `tp_rank`'s weights from a ZeRO-3 checkpoint: each data-parallel rank holds, in its fp32
    flat groups, an equal part of every parameter (ceil(numel / dp), the last padded), parameter after
    parameter; a parameter is its ranks' parts joined and cut to its size. These fp32 masters are the
    weights the optimizer steps."""
    model = _load(os.path.join(tag, ZERO3_MODEL.format(dp=0, tp=tp_rank)), bar)
    shapes: dict[str, Any] = {}
    for group in model["param_shapes"]:
        shapes.update(group)
    flats = []
    for dp_rank in range(dp):
        path = os.path.join(tag, ZERO3_OPTIM.format(dp=dp_rank, tp=tp_rank))
        flats.append(torch.cat(_load_zero_optimizer(path, bar)["optimizer_state_dict"]["fp32_flat_groups"]).detach())
    state, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = -(-numel // dp)
        if offset + part > flats[0].numel():
            raise ValueError(f"{tag}: ZeRO-3 partitions hold {flats[0].numel()} values per rank, fewer than the "
                             f"parameter shapes in {ZERO3_MODEL.format(dp=0, tp=tp_rank)} need")
        state[name] = torch.cat([flat[offset:offset + part] for flat in flats])[:numel].view(shape).clone()
        offset += part
    for alias, target in model.get("shared_params", {}).items():      # the tied head
        state[alias] = state[target]
    return state


def _tp_rank_state(tag: str, cfg: ModelConfig, tp_rank: int, pp: int, dp: int, bar: Any = None) -> dict[str, Tensor]:
    """TP rank `tp_rank`'s state dict with HybridLM's names, its pipeline layers joined."""
    if pp == 1 and os.path.isfile(os.path.join(tag, ZERO3_MODEL.format(dp=0, tp=tp_rank))):
        return _zero3_tp_rank_state(tag, tp_rank, dp, bar)
    if pp == 1:
        module = _load(os.path.join(tag, f"mp_rank_{tp_rank:02d}_model_states.pt"), bar).get("module")
        if not module:
            raise ValueError(f"{tag}: no module weights in mp_rank_{tp_rank:02d}_model_states.pt")
        return dict(module)
    state: dict[str, Tensor] = {}
    n = cfg.n_sublayers
    for index in range(n + 3):
        if index == n + 2 and cfg.tie_embeddings:
            break                                 # a tied head is saved once, with the embedding (layer 0)
        layer = _load(os.path.join(tag, f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"), bar)
        for name, tensor in layer.items():
            if 1 <= index <= n:
                name = f"layers.{index - 1}.{name.removeprefix('layer.')}"
            state[name] = tensor
    return state


def _files_read(tag: str, pp: int) -> list[str]:
    """The files of a tag that consolidation reads (for the progress bar's total)."""
    names = os.listdir(tag)
    if any(n.startswith("weights-tp") for n in names):
        return [n for n in names if n.startswith("weights-tp")]
    if any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in names):     # ZeRO-3
        return [n for n in names if n.endswith("_optim_states.pt") or
                (n.startswith("zero_pp_rank_0_") and n.endswith("_model_states.pt"))]
    prefix = "layer_" if pp > 1 else "mp_rank_"
    return [n for n in names if n.startswith(prefix) and n.endswith("model_states.pt")]


def load_training_checkpoint(path: str, step: int | None = None,
                             progress: bool = False) -> tuple[dict[str, Tensor], ModelConfig, dict]:
    """(unsharded state dict, model config, braid.json) of a checkpoint saved at any TP/PP/DP layout;
    `progress`: a bar over the bytes of the files read."""
    from tqdm import tqdm

    tag = resolve_tag(path, step)
    with open(os.path.join(tag, INFO)) as f:
        info = json.load(f)
    if not info.get("model") or not info.get("layout"):
        raise ValueError(f"{os.path.join(tag, INFO)}: no model config or layout (saved by an older Braid)")
    cfg = ModelConfig.from_dict(info["model"])
    tp, pp = info["layout"]["tp"], info["layout"]["pp"]
    total = sum(os.path.getsize(os.path.join(tag, name)) for name in _files_read(tag, pp))
    with tqdm(total=total, unit="B", unit_scale=True, desc="read checkpoint", disable=not progress) as bar:
        if info.get("weights_only"):             # `braid convert from-hf` output: one file per TP rank
            shards = [load_weights_only(tag, rank) for rank in range(tp)]
            bar.update(total)
        else:
            shards = [_tp_rank_state(tag, cfg, rank, pp, info["layout"].get("dp", 1), bar) for rank in range(tp)]
    state = merge_tp_shards(shards, cfg) if tp > 1 else shards[0]
    check_state_dict(state, cfg, tag)
    return state, cfg, info


def check_state_dict(state: dict[str, Tensor], cfg: ModelConfig, where: str) -> None:
    """Every tensor HybridLM(cfg) has, with its shape; errors name the tensor, expected and found shapes."""
    with torch.device("meta"):                                 # shapes only
        expected = HybridLM(cfg).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for the model config")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the model config expects {tuple(tensor.shape)}")


def run_tokenizer(run_dir: str) -> tuple[str | None, dict[str, Any]]:
    """(tokenizer.json path or None, data facts) of a training run, from its config.yaml and the data
    folder it trained on (braid_data.json names the tokenizer). Facts: seq_len, and when the data folder
    has a braid_data.json: eos_id, pad_id, data_info (its path), tokenizer_sha256 (the file the shards
    were made with; `data_pipeline.tokenizer.check_recorded_tokenizer` compares a file with it)."""
    import yaml

    from data_pipeline.dataset_info import find_dataset_info, tokenizer_record

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        return None, {}
    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    data = config.get("data") or {}
    streams = data.get("train") or []
    first = streams[0] if streams else None
    data_dir = first.get("path") if isinstance(first, dict) else first
    facts: dict[str, Any] = {"seq_len": data.get("seq_len")}
    if not data_dir:
        return None, facts
    found = find_dataset_info(data_dir)
    # a split folder (data/tiny/train) sits inside the prepared folder that has braid_data.json
    folder = os.path.dirname(found[0]) if found else data_dir
    candidates = [os.path.join(folder, "tokenizer.json")]
    if found:
        info_path, info = found
        record = tokenizer_record(info)
        facts.update(eos_id=info.get("eos_id"), pad_id=info.get("pad_id"), data_info=info_path,
                     tokenizer_sha256=record.get("sha256"), tokenizer_vocab_size=record.get("vocab_size"))
        if record.get("path"):
            candidates.insert(0, record["path"])
    return next((p for p in candidates if os.path.isfile(p)), None), facts
