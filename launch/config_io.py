"""YAML configs with `key.sub=value` overrides: one loader for recipes and training configs."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable

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


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:         # YAML has lists; the dataclass default is a tuple
        items = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and len(value) == len(items) and all(map(_type_ok, value, items))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def build_dataclass(cls: type, data: Any, where: str = "",
                    builders: dict[type, Callable[[Any, str], Any]] | None = None) -> Any:
    """Dataclass `cls` from YAML data, rejecting unknown keys and wrongly typed values by their path.

    `where` is the path prefix of messages ("recipe" -> `recipe.filters.lenght`; "" -> `train.max_stpes`).
    `builders` maps a type that builds itself (e.g. ModelConfig, from a preset) to `f(value, path)`.
    """
    builders = builders or {}
    if cls in builders:
        return builders[cls](data, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigFileError(f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        hint, path = hints[name], f"{where}.{name}" if where else name
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
        if dataclasses.is_dataclass(inner):
            values[name] = None if value is None and inner is not hint else build_dataclass(inner, value, path, builders)
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            if not isinstance(value, list):
                raise ConfigFileError(f"{path}: expected a list, got {type(value).__name__}")
            values[name] = [build_dataclass(typing.get_args(inner)[0], v, f"{path}[{i}]", builders) for i, v in enumerate(value)]
        elif inner in builders:
            values[name] = builders[inner](value, path)
        elif not _type_ok(value, hint):
            raise ConfigFileError(f"{path}: {value!r} is not a valid {_hint_name(hint)}")
        else:
            values[name] = tuple(value) if typing.get_origin(hint) is tuple else value
    return cls(**values)


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
