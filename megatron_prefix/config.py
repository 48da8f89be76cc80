"""Typed config plumbing: dataclasses from YAML with dotted command-line overrides.

Every component owns one ``@dataclass`` config with defaults and a ``validate()`` method that raises
``ValueError`` naming the offending field (``"data.pack_tokens: must be positive, got 0"``). This module
turns nested dicts into those dataclasses (unknown keys are errors, naming the full dotted path), parses
``a.b=c`` overrides with YAML scalar typing, and loads a YAML recipe.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields recurse. Unknown keys raise."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        sub = f"{path}.{f.name}" if path else f.name
        if _is_dataclass_type(tp):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{sub}: expected a mapping, got {value!r}")
            value = from_dict(tp, value, sub)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    """A plain-dict copy of a (nested) config dataclass."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is typed as a YAML scalar (int, float, bool, null, str)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {text!r}: empty key")
    return keys, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply dotted overrides to a nested dict in place and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML recipe into a dict, with the file named in errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """YAML recipe (optional) + dotted overrides -> validated ``cls`` instance."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides)
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def require(cond: bool, field: str, message: str) -> None:
    """Raise ``ValueError("field: message")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{field}: {message}")
