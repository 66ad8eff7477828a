"""What `braid train` checks and says before its first step, from the config and what is on disk.

Checks (one-line ConfigErrors naming both sides), against each stream's braid_data.json:
  * vocabulary: model.vocab_size must hold every token id of the data (no smaller than the tokenizer)
    and be no larger than the tokenizer padded to a multiple of 128 x tp (Megatron's padding); a
    larger embedding trains rows no token reaches and exports a model that disagrees with its tokenizer;
  * one tokenizer: every stream (and the validation stream) made with the same tokenizer file (sha256);
  * rows: the shards' rows hold data.seq_len + 1 tokens.
The model config against a checkpoint's is checked by pretrain.checkpoint.resume_point, the window
against the sequence length by TrainConfig.validate.

The start-up summary: parameters, layout, global batch and tokens per step, dataset size and the
epochs the run will read, threads, and where the run starts (step 0 or "resumed from step N").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from data_pipeline.dataset_info import find_dataset_info, split_rows, tokenizer_record
from model.config import ConfigError

from .config import TrainConfig

VOCAB_PADDING = 128          # Megatron's make-vocab-size-divisible-by default (times the tensor-parallel size)


@dataclass
class StreamFacts:
    path: str
    rows: int | None                  # MDS samples in the split's index.json (None: not readable here)
    row_length: int | None            # from braid_data.json (None: shards made by other tools)
    info_path: str | None = None
    tokenizer: dict[str, Any] | None = None


def _stream_facts(path: str) -> StreamFacts:
    found = find_dataset_info(path)
    facts = StreamFacts(path=path, rows=split_rows(path), row_length=None)
    if found:
        facts.info_path, info = found
        facts.row_length = info.get("row_length")
        facts.tokenizer = tokenizer_record(info)
    return facts


def check_data(cfg: TrainConfig, tp: int = 1) -> list[StreamFacts]:
    """The training streams' facts, after checking vocabulary, tokenizer and row length against the config."""
    streams = [_stream_facts(s.path) for s in cfg.data.train]
    every = streams + ([_stream_facts(cfg.data.val)] if cfg.data.val else [])
    described = [s for s in every if s.tokenizer]
    for stream in described:
        vocab = stream.tokenizer.get("vocab_size")
        if vocab:
            _check_vocabulary(cfg.model.vocab_size, int(vocab), stream, tp)
    shas = {s.tokenizer.get("sha256") for s in described if s.tokenizer.get("sha256")}
    if len(shas) > 1:
        first = described[0]
        other = next(s for s in described if s.tokenizer.get("sha256") != first.tokenizer.get("sha256"))
        raise ConfigError(f"{first.info_path} was tokenized with {first.tokenizer.get('path')} (sha256 "
                          f"{first.tokenizer['sha256'][:12]}), {other.info_path} with {other.tokenizer.get('path')} "
                          f"(sha256 {other.tokenizer['sha256'][:12]}): the streams of one run must share a tokenizer")
    for stream in streams:
        if stream.row_length is not None and stream.row_length != cfg.data.seq_len + 1:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} needs rows of {cfg.data.seq_len + 1} tokens, but "
                              f"{stream.info_path} has rows of {stream.row_length} (its recipe's shards.row_length); "
                              f"set data.seq_len={stream.row_length - 1}")
    return streams


def _check_vocabulary(model_vocab: int, data_vocab: int, stream: StreamFacts, tp: int) -> None:
    multiple = VOCAB_PADDING * tp
    padded = math.ceil(data_vocab / multiple) * multiple
    where = f"{stream.info_path} (tokenizer {stream.tokenizer.get('path')})"
    if model_vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={model_vocab} is smaller than the {data_vocab}-token vocabulary of "
                          f"{where}: token ids up to {data_vocab - 1} would index past the embedding; set "
                          f"model.vocab_size={data_vocab}")
    if model_vocab > padded:
        raise ConfigError(f"model.vocab_size={model_vocab} but {where} has {data_vocab} tokens: "
                          f"{model_vocab - data_vocab} embedding rows would never be trained and the exported model "
                          f"would not match its tokenizer; set model.vocab_size={data_vocab}"
                          + (f" (or pad it to at most {padded}, a multiple of {multiple})" if padded > data_vocab else ""))


def count_parameters(cfg: TrainConfig) -> tuple[int, int]:
    """(parameters, embedding parameters) of the whole model, counted on the meta device (a tied head once)."""
    import torch

    from model import HybridLM
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    return total, model.embed.weight.numel()


def startup_lines(cfg: TrainConfig, layout: Any, streams: list[StreamFacts], grad_accum: int, global_batch: int,
                  threads: str, resumed_step: int | None, checkpoint: str | None,
                  weights: str | None = None) -> list[str]:
    """The start-up summary, one fact per line (printed by rank 0 before the first step)."""
    total, embedding = count_parameters(cfg)
    tokens_per_step = global_batch * cfg.data.seq_len
    rows = [s.rows for s in streams]
    lines = [
        f"model: {total:,} parameters ({total - embedding:,} without the embedding), pattern "
        f"{cfg.model.pattern!r}, vocabulary {cfg.model.vocab_size:,}",
        f"ranks: {layout.world} (tp {layout.tp} x pp {layout.pp} x dp {layout.dp})",
        f"batch: {global_batch:,} sequences x {cfg.data.seq_len:,} tokens = {tokens_per_step:,} tokens per step "
        f"(data.micro_batch {cfg.data.micro_batch} x grad_accum {grad_accum} x {layout.dp} data-parallel "
        f"rank{'s' if layout.dp > 1 else ''})",
    ]
    names = ", ".join(os.path.normpath(s.path) for s in streams)
    if all(r is not None for r in rows):
        total_rows = sum(rows)  # type: ignore[arg-type]
        planned = cfg.train.max_steps * global_batch
        lines.append(f"data: {names}: {total_rows:,} rows = {total_rows * cfg.data.seq_len:,} training tokens; "
                     f"{cfg.train.max_steps:,} steps read {planned * cfg.data.seq_len:,} tokens = "
                     f"{planned / max(total_rows, 1):.2f} epochs")
    else:
        lines.append(f"data: {names}")
    lines.append(f"threads: {threads}")
    if weights is not None:
        lines.append(f"start: step 0 of {cfg.train.max_steps:,} from the weights in {weights} (a fresh optimizer)")
    elif resumed_step is None:
        lines.append(f"start: step 0 of {cfg.train.max_steps:,} (no checkpoint in "
                     f"{os.path.join(cfg.run_dir, 'checkpoints')})")
    else:
        lines.append(f"resumed from step {resumed_step:,} of {cfg.train.max_steps:,} ({checkpoint})")
    return lines
