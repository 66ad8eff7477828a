"""What every suite shares: the model under evaluation, its tokenizer, and how results are written.

    lm = load_eval_model("runs/tiny")        # a run directory, a step_* checkpoint or a converted HF folder
    ...
    write_results(out_dir, "passkey", scores, settings, lm)    # out_dir/results.json, atomically

Every results.json has the same top level: suite, scores, settings, provenance (model path and
kind, checkpoint step, tokenizer path and sha256, training length), created (UTC).
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from data_pipeline.tokenizer import file_sha256, load_tokenizer
from model import HybridLM, ModelConfig

RESULTS = "results.json"


@dataclass
class EvalModel:
    model: HybridLM                     # eval mode, float32 on CPU unless moved
    tokenizer: Tokenizer
    eos_id: int | None                  # the document separator the model was trained with
    train_length: int | None            # training sequence length (None: unknown)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))


def load_eval_model(path: str, step: int | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", tokenizer: str | None = None) -> EvalModel:
    """A run directory, a step_* checkpoint folder, or a converted Hugging Face folder -> EvalModel.

    `tokenizer` (a tokenizer.json) replaces the model's own, e.g. for a run whose data folder has none;
    its vocabulary must fit the model's embedding.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        from conversion.hf import load_hf_folder
        model, facts = load_hf_folder(path)
        own_tokenizer, eos_id, train_length = facts["tokenizer"], facts["eos_id"], facts["train_length"]
        provenance = facts["provenance"]
    else:
        from conversion.checkpoint import load_training_checkpoint, resolve_tag, run_tokenizer
        tag = resolve_tag(path, step)
        state, cfg, info = load_training_checkpoint(tag)
        own_tokenizer, data = run_tokenizer(os.path.dirname(os.path.dirname(os.path.abspath(tag))))
        eos_id, train_length = data.get("eos_id"), data.get("seq_len")
        # evals generate through a cache, whose continuation steps no kernel takes (model.kernels=cuda
        # would refuse them): kernels where they apply, the reference step elsewhere
        model = HybridLM(cfg.replace(kernels="auto"))
        model.load_state_dict(state)
        provenance = {"model": os.path.abspath(path), "kind": "checkpoint", "checkpoint": os.path.abspath(tag),
                      "step": info.get("step")}
    tokenizer_path = tokenizer or own_tokenizer
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer found (neither a tokenizer.json in the folder nor one named by "
                                "the run's data folder); pass --tokenizer PATH")
    loaded = load_tokenizer(tokenizer_path)
    if loaded.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(f"{tokenizer_path}: tokenizer vocabulary {loaded.get_vocab_size()} is larger than the "
                         f"model's vocab_size {model.cfg.vocab_size} ({path})")
    model = model.to(device=device, dtype=dtype).eval()
    provenance = {**provenance, "tokenizer": os.path.abspath(tokenizer_path),
                  "tokenizer_sha256": file_sha256(tokenizer_path), "dtype": str(dtype).removeprefix("torch."),
                  "pattern": model.cfg.pattern}
    return EvalModel(model=model, tokenizer=loaded, eos_id=eos_id,
                     train_length=train_length, provenance=provenance)


def with_defaults(suite: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A suite's run() options over its defaults; an unknown option is a one-line error naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option of the {suite} suite (known: {', '.join(defaults)})")
    return {**defaults, **options}


def write_results(out_dir: str, suite: str, scores: dict[str, Any], settings: dict[str, Any],
                  lm: EvalModel | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write out_dir/results.json (temporary file, then rename) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"suite": suite, "scores": scores, "settings": settings,
              "provenance": dict(lm.provenance) if lm is not None else {},
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **(extra or {})}
    path = os.path.join(out_dir, RESULTS)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
