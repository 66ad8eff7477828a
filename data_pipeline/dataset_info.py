"""What a prepared dataset says about itself, read without mosaicml-streaming.

`braid data prepare` writes `<output>/braid_data.json` last (tokenizer path, sha256 and size, row
length, eos/pad ids, stats); a training config names the split folders (`data/tiny/train`). These
helpers go from a split folder (or the prepared folder itself) to that record, and count a split's
rows from its MDS `index.json`: what training checks before its first step and prints at start-up.
"""
from __future__ import annotations

import json
import os
from typing import Any

DATA_INFO = "braid_data.json"
INDEX = "index.json"          # mosaicml-streaming's merged index of a split folder


def find_dataset_info(path: str) -> tuple[str, dict[str, Any]] | None:
    """(path of braid_data.json, its contents) for a prepared folder or one of its split folders;
    None for shards written by other tools (no braid_data.json there or one level up)."""
    path = path.rstrip("/") or "/"
    for folder in (path, os.path.dirname(path)):
        info_path = os.path.join(folder, DATA_INFO)
        if os.path.isfile(info_path):
            try:
                with open(info_path) as f:
                    return info_path, json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"{info_path}: not readable ({err})") from None
    return None


def tokenizer_record(info: dict[str, Any]) -> dict[str, Any]:
    """{path, sha256, vocab_size} of the tokenizer the shards were made with (vocab_size: the
    top-level field in records written before it moved under `tokenizer`)."""
    record = dict(info.get("tokenizer") or {})
    record.setdefault("vocab_size", info.get("vocab_size"))
    return record


def split_rows(path: str) -> int | None:
    """Rows (MDS samples) of a split folder, from its index.json; None when it has none."""
    index_path = os.path.join(path, INDEX)
    if not os.path.isfile(index_path):
        return None
    with open(index_path) as f:
        index = json.load(f)
    return sum(int(shard.get("samples", 0)) for shard in index.get("shards", []))
