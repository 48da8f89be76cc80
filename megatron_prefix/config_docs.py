"""``docs/config.md`` generated from the config dataclasses: every key with its type, default and meaning.

The meaning of a field is its trailing ``# comment`` in the dataclass source, else its bullet in the
class docstring (``- ``name``: text``). ``tools/config_docs.py --check`` (and a test) keep the file current.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any

from megatron_prefix.config import optional_section, type_name

HEADER = """# Config reference

Every key of a training recipe (`launch/train_dpo.py`, `launch/train_rm.py`): YAML sections plus dotted
overrides (`optimizer.lr=5e-7`). Generated from the dataclasses by `python tools/config_docs.py --write`;
a test fails when this file is stale. Values are type-checked (`optimizer.lr: expected a float, got 'abc'`)
and every error of a recipe is reported at once; `--print-config` prints the resolved config and exits.
"""


def _comments(cls: type) -> dict[str, str]:
    """Field name -> trailing comment on its line in the class source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    field_line = re.compile(r"^\s{4}(\w+)\s*:")
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = lines[tok.start[0] - 1]
            m = field_line.match(row)
            if m and tok.start[1] > len(m.group(0)):
                out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _doc_bullets(cls: type) -> dict[str, str]:
    """Field name -> its ``- ``name``: text`` bullet in the class docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"^- ``(\w+)``\s*:?\s*(.*)$", line.strip())
        if m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.startswith("  ") and line.strip():
            out[current] += " " + line.strip()
        else:
            current = None
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value!r}`".replace("|", "\\|")


def section_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf field of ``cls``, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    comments, bullets = _comments(cls), _doc_bullets(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp: Any = hints[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(section_rows(tp, key + "."))
            continue
        section = optional_section(tp)
        if section is not None:  # an optional section: one row for the section, then its keys
            meaning = comments.get(f.name) or bullets.get(f.name) or ""
            rows.append((key, "section or null", _default(f), meaning.replace("|", "\\|")))
            rows.extend(section_rows(section, key + "."))
            continue
        meaning = comments.get(f.name) or bullets.get(f.name) or ""
        rows.append((key, type_name(tp), _default(f), meaning.replace("|", "\\|")))
    return rows


def render(root: type) -> str:
    """The whole markdown page for the dataclass ``root`` (one table per top-level section)."""
    hints = typing.get_type_hints(root)
    parts = [HEADER]
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(hints[f.name])]
    if top:
        parts.append("## top level\n\n| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in section_rows_of(root, top))
        parts.append("")
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            continue
        doc = (inspect.getdoc(tp) or "").splitlines()[0] if inspect.getdoc(tp) else ""
        parts.append(f"## {f.name}\n\n{doc}\n\n| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in section_rows(tp, f.name + "."))
        parts.append("")
    return "\n".join(parts)


def section_rows_of(cls: type, fields: list[dataclasses.Field]) -> list[tuple[str, str, str, str]]:
    """Rows for a chosen subset of ``cls``'s (leaf) fields."""
    names = {f.name for f in fields}
    return [row for row in section_rows(cls, "") if row[0] in names]
