"""``--field-map``: canonical field names -> a file's column names (``"chosen=pos,rejected=neg"``).

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_prefix.data.formats import CANONICAL_FIELDS


def parse_field_map(text: str) -> dict[str, str]:
    """Parse ``"chosen=pos,rejected=neg"`` into ``{"chosen": "pos", "rejected": "neg"}``.

    Keys are canonical field names (``CANONICAL_FIELDS``), values the file's column names; spaces around
    names are ignored; an empty text gives ``{}``. Raises ``ValueError`` on an item without ``=``, an
    empty name, an unknown canonical name or a repeated one.
    """
    result: dict[str, str] = {}
    if not text.strip():
        return result
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--field-map item {item!r} is not canonical=column (in {text!r})")
        if key in result:
            raise ValueError(f"--field-map names {key!r} twice (in {text!r})")
        result[key] = value
    check_field_map(result)
    return result


def check_field_map(field_map: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a field map (known canonical keys, string values); returns it as a dict."""
    if not field_map:
        return {}
    for key, value in field_map.items():
        if key not in CANONICAL_FIELDS:
            raise ValueError(
                f"--field-map key {key!r} is not a canonical field; known: {', '.join(CANONICAL_FIELDS)}"
            )
        if not isinstance(value, str) or not value:
            raise ValueError(f"--field-map value for {key!r} must be a non-empty column name, got {value!r}")
    return dict(field_map)
