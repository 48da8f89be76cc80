"""Typed config plumbing: dataclasses from YAML with dotted command-line overrides.

Every component owns one ``@dataclass`` config with defaults and a ``validate()`` method that raises
``ValueError`` naming the offending field (``"data.pack_tokens: must be positive, got 0"``). This module
turns nested dicts into those dataclasses (unknown keys are errors, naming the full dotted path), parses
``a.b=c`` overrides with YAML scalar typing, and loads a YAML recipe.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more config errors, each ``"section.field: what is wrong and what to do"``, one per line."""

    def __init__(self, messages: Sequence[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


# --------------------------------------------------------------------------- YAML with 1.2-style floats


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``5e-7`` and ``1e5`` are floats (YAML 1.1 wants ``5.0e-7``)."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2-style floats (``5e-7`` is a number, as users write it)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------- type checks from hints


def type_name(tp: Any) -> str:
    """A short, user-facing name of a type hint: ``float``, ``int or null``, ``list of float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int -> float, integral float -> int), or ``_NO`` when it is not one."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _NO
        for arg in sorted(args, key=lambda a: a is str):  # try str last: "5" stays 5 for int | str
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is typing.Literal:
        return value if value in args else _NO
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_coerce(v, args[0]) if args else v for v in value]
        if any(v is _NO for v in items):
            return _NO
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _NO
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _NO
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _NO
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NO
    return value  # a hint this checker does not know: leave it to validate()


def check_type(value: Any, tp: Any, field: str) -> Any:
    """``value`` converted to the hinted type, or ``ValueError("field: expected a float, got 'abc'")``."""
    out = _coerce(value, tp)
    if out is _NO:
        name = type_name(tp)
        article = "an" if name[:1] in "aeiou" else "a"
        raise ValueError(f"{field}: expected {article} {name}, got {value!r}")
    return out


# --------------------------------------------------------------------------- dataclasses from dicts


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def optional_section(tp: Any) -> type | None:
    """The dataclass of an optional section hint (``VisionConfig | None``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2 and _is_dataclass_type(args[0]):
            return args[0]
    return None


def from_dict(cls: type[T], data: dict | None, path: str = "", errors: list[str] | None = None) -> T:
    """Build dataclass ``cls`` from ``data``: nested dataclass fields recurse, every value is checked
    against the field's type hint, unknown keys are errors. All errors are reported at once
    (``ConfigError``, one line each); with ``errors`` given, they are appended there instead."""
    own = errors is None
    errors = [] if own else errors
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    where = f"{path}." if path else ""
    for key in sorted(set(data) - names, key=str):
        errors.append(f"{where}{key}: unknown config key; known keys{' of ' + path if path else ''}: "
                      f"{', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        sub = f"{where}{f.name}"
        if _is_dataclass_type(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{sub}: expected a mapping of {tp.__name__} fields, got {value!r}")
                continue
            kwargs[f.name] = from_dict(tp, value, sub, errors)
            continue
        section = optional_section(tp)
        if section is not None and isinstance(value, dict):  # an optional section given (null = off)
            kwargs[f.name] = from_dict(section, value, sub, errors)
            continue
        try:
            kwargs[f.name] = check_type(value, tp, sub)
        except ValueError as err:
            errors.append(str(err))
    if own and errors:
        raise ConfigError(errors)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    """A plain-dict copy of a (nested) config dataclass."""
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    """A (nested) config dataclass as YAML, in field order (``--print-config``)."""
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is typed as YAML (int, float incl. ``5e-7``, bool, null,
    str, ``[a, b]`` lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {text!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text, the type check names the field
    return keys, value


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
        data = yaml_load(path.read_text()) or {}
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
        with collect_errors():
            validate()
    return cfg


_COLLECTING: list[list[str]] = []


def require(cond: bool, field: str, message: str) -> None:
    """Raise ``ValueError("field: message")`` unless ``cond`` (inside ``collect_errors``: record it)."""
    if not cond:
        if _COLLECTING:
            _COLLECTING[-1].append(f"{field}: {message}")
        else:
            raise ValueError(f"{field}: {message}")


@contextlib.contextmanager
def collect_errors():
    """Run a ``validate()`` so that every failed ``require`` is reported, not just the first.

    Raises ``ConfigError`` with all messages at the end. A validator that stops on its own (a direct
    ``ValueError``, or a follow-on error caused by a value already reported) ends the collection there.
    """
    found: list[str] = []
    _COLLECTING.append(found)
    try:
        yield found
    except ValueError as err:
        found.extend(getattr(err, "messages", None) or [str(err)])
    except (ArithmeticError, TypeError, KeyError, AttributeError):
        if not found:
            raise
    finally:
        _COLLECTING.pop()
    if found:
        raise ConfigError(list(dict.fromkeys(found)))
