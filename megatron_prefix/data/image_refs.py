"""A record's images: where they are (``ImageRef``) and whether the text agrees with them.

``images_of(obj, field_map, base_dir)`` reads the record's ``images`` column (or ``image``; a list, or
one image) into ``ImageRef`` objects, in order. Each image may be given as:

- a path (a string): absolute, or relative to ``base_dir`` (the folder of the data file);
- a dict ``{"bytes": ..., "path": ...}`` as ``datasets``' ``Image`` feature writes it (Parquet/Arrow
  rows): the bytes when not null (bytes, or a base64 string in JSON), else the path;
- a base64 string in JSON: a ``data:image/...;base64,...`` URL, or a bare base64 string whose decoded
  bytes start with a known image signature (PNG, JPEG, GIF, WebP, BMP, TIFF); any other string is a path.

Files are not opened here (``images.py`` decodes them in the builder's workers; an unreadable one is the
skip ``bad_image``). An entry of another type is ``bad_image`` too (with its index).

``check_images(record)``: the prompt must hold exactly one placeholder per image (``<image>`` in text,
or a ``{"type": "image"}`` part; else ``image_count_mismatch``), and no response may hold one
(``image_in_response``: an image is always part of the shared prompt).

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_prefix.data.messages import Fields, type_name
from megatron_prefix.data.records import IMAGE_PLACEHOLDER, ImageRef, PreferenceRecord, SkipRecord

IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
_B64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$", re.ASCII)
MIN_B64_CHARS = 24  # shorter strings are paths (no image file is that small)


def _is_image_bytes(data: bytes) -> bool:
    return data.startswith(IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _decode_b64(text: str) -> bytes | None:
    """The bytes of a data URL or a bare base64 string holding an image; None when ``text`` is neither."""
    m = _DATA_URL.match(text)
    body = text[m.end() :] if m else text
    if not m and (len(text) < MIN_B64_CHARS or not _B64.match(text)):
        return None
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if (m or _is_image_bytes(data)) else None


def image_ref(value: Any, base_dir: Path, name: str) -> ImageRef:
    """One image reference (see the module docstring); ``bad_image`` for an unusable entry."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return ImageRef(data=bytes(data), name=name)
        if isinstance(data, str) and data:
            m = _DATA_URL.match(data)
            try:
                decoded = base64.b64decode("".join(data[m.end() if m else 0 :].split()), validate=True)
            except (binascii.Error, ValueError):
                raise SkipRecord("bad_image", f"{name}: 'bytes' is a string but not base64") from None
            return ImageRef(data=decoded, name=name)
        if isinstance(path, str) and path:
            value = path
        else:
            raise SkipRecord("bad_image", f"{name}: a dict without 'bytes' or 'path'")
    if isinstance(value, (bytes, bytearray)) and value:
        return ImageRef(data=bytes(value), name=name)
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("bad_image", f"{name} is a {type_name(value)}, expected a path, bytes or base64 string")
    decoded = _decode_b64(value)
    if decoded is not None:
        return ImageRef(data=decoded, name=name)
    p = Path(value).expanduser()
    return ImageRef(path=str(p if p.is_absolute() else base_dir / p), name=name)


def images_of(obj: Mapping[str, Any], field_map: Mapping[str, str] | None, base_dir: Path) -> tuple[ImageRef, ...]:
    """The record's images, in order (empty when it has no ``images``/``image`` field or it is null/empty)."""
    f = Fields(obj, field_map)
    key = "images" if f.has("images") or not f.has("image") else "image"
    raw = f.get(key)
    if raw is None or raw == [] or raw == "":
        return ()
    col = f.column(key)
    items = raw if isinstance(raw, list) else [raw]
    names = [f"{col}[{i}]" for i in range(len(items))] if isinstance(raw, list) else [col]
    return tuple(image_ref(v, base_dir, n) for v, n in zip(items, names))


def prompt_placeholders(record: PreferenceRecord) -> int:
    """Image placeholders of the prompt (``<image>`` in text, image parts), in order."""
    if isinstance(record.prompt, str):
        return record.prompt.count(IMAGE_PLACEHOLDER)
    return sum(m.num_images for m in record.prompt)


def check_images(record: PreferenceRecord) -> None:
    """``image_in_response`` / ``image_count_mismatch`` (see the module docstring)."""
    for i, r in enumerate(record.responses):
        if IMAGE_PLACEHOLDER in r:
            raise SkipRecord("image_in_response", f"response {i} holds an image ({IMAGE_PLACEHOLDER}); images "
                             "belong in the prompt")
    n = prompt_placeholders(record)
    if n != len(record.images):
        raise SkipRecord(
            "image_count_mismatch",
            f"the prompt has {n} image placeholder(s) ({IMAGE_PLACEHOLDER} or {{'type': 'image'}} parts) but "
            f"the record has {len(record.images)} image(s)",
        )
