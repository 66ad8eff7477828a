"""YAML configs with `key.sub=value` overrides: one loader for recipes and training configs."""
from __future__ import annotations

import os
from typing import Any

import yaml


class ConfigFileError(ValueError):
    """A config file or override that cannot be read; the message names the file or key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigFileError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigFileError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = config
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigFileError(f"override {text!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return config


def load_config(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML mapping from `path` and apply `key.sub=value` overrides."""
    if not os.path.isfile(path):
        raise ConfigFileError(f"{path}: config file not found")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return apply_overrides(config, overrides or [])
