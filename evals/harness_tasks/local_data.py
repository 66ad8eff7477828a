"""Loads the shipped tasks' jsonl files (next to this file) without `datasets` downloads or caches.

A task YAML names `custom_dataset: !function local_data.load` and `dataset_kwargs: {file: NAME.jsonl}`;
lm-eval resolves `!function` relative to the YAML, whereas `data_files` would be resolved relative to
the working directory, so this keeps the tasks runnable from anywhere.
"""
from __future__ import annotations

import json
import os
from typing import Any

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(file: str, split: str = "test", **unused: Any) -> datasets.DatasetDict:
    """jsonl file (relative to this folder) -> DatasetDict with one split."""
    with open(os.path.join(HERE, file)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
