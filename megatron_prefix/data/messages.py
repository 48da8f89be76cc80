"""Message-level parsing shared by every format: fields, roles, content parts, prompts, responses, media.

``Fields`` reads canonical fields through a ``field_map``. Messages accept ``role``/``from`` and
``content``/``value``; roles are normalised (``ROLE_ALIASES``, case-insensitive); content is a string or a
list of parts (``parse_content``): text parts, and ``{"type": "image"}`` parts (TRL's vision format). A
message with image parts keeps the part list (``Message.parts``, what a chat template that takes part
lists is given) and its ``content`` is the flattened text, each image part written as ``"<image>\n"``
(what a template that only takes strings is given). Images themselves are read by ``images_of`` from
the record's ``images`` (or ``image``) field, in placeholder order; ``check_images`` checks that the
prompt has one placeholder per image (``image_count_mismatch``) and that no response has one
(``image_in_response``). Other media (``videos``/``audios`` fields, ``video``/``audio``/``image_url``
parts, ``<video>``/``<audio>`` placeholders) are refused as ``image_unsupported`` (``refuse_media``,
``parse_content``, ``refuse_placeholders``): reading such a record as text would train on it with the
media silently dropped.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from megatron_prefix.data.records import IMAGE_PLACEHOLDER, Message, PreferenceRecord, Prompt, SkipRecord

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


IMAGE_FIELDS = ("images", "image")  # read by images_of
MEDIA_FIELDS = ("videos", "video", "audios", "audio")  # refused
MEDIA_PARTS = ("image_url", "input_image", "video", "video_url", "audio", "input_audio")  # refused
MEDIA_PLACEHOLDERS = ("<video>", "<audio>")  # refused
IMAGE_PART_TEXT = IMAGE_PLACEHOLDER + "\n"  # an image part in flattened text
_MEDIA_FIELD_SET = frozenset(MEDIA_FIELDS)
_PLACEHOLDER_RE = re.compile("|".join(re.escape(t) for t in MEDIA_PLACEHOLDERS))
MEDIA_MESSAGE = (
    "video, audio and image_url media are not supported; images go in the record's 'images' column with "
    "{'type': 'image'} parts or <image> placeholders"
)


class Fields:
    """Read canonical fields of one raw record through a ``field_map`` (canonical -> file column)."""

    def __init__(self, obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None):
        self.obj = obj
        self.field_map = field_map or {}

    def column(self, name: str) -> str:
        """The file's column name for canonical field ``name``."""
        return self.field_map.get(name, name)

    def has(self, name: str) -> bool:
        """True when the field is present and not null."""
        return self.obj.get(self.column(name)) is not None

    def get(self, name: str, default: Any = None) -> Any:
        """The field's value, or ``default`` when absent or null."""
        value = self.obj.get(self.column(name))
        return default if value is None else value

    def require(self, name: str) -> Any:
        """The field's value; ``missing_field`` when absent or null."""
        value = self.obj.get(self.column(name))
        if value is None:
            col = self.column(name)
            shown = f"'{col}'" if col == name else f"'{col}' (for {name})"
            raise SkipRecord("missing_field", f"no field {shown}")
        return value


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    return type(value).__name__


# --------------------------------------------------------------------------------------------- messages


def normalise_role(role: str, where: str) -> str:
    """Map a role name to system/user/assistant; ``bad_role`` when unknown."""
    norm = ROLE_ALIASES.get(role.strip().lower())
    if norm is None:
        raise SkipRecord("bad_role", f"{where}: unknown role {role!r}")
    return norm


def parse_content(value: Any, where: str) -> tuple[str, tuple[tuple[str, str], ...] | None]:
    """A message's content -> ``(text, parts)``: a string, or a list of parts. Text parts are joined as HF
    chat templates join them (concatenated, no separator); an image part ``{"type": "image"}`` is written
    ``"<image>\n"`` in the text, and then ``parts`` keeps the list (``("image", "")`` / ``("text", t)``);
    ``parts`` is None without image parts. A video/audio/image_url part is ``image_unsupported``; any
    other part is ``bad_type``. (A columnar file's struct may hold ``"text": null`` in image parts.)"""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise SkipRecord("bad_type", f"{where} is a {type_name(value)}, expected a string or a list of parts")
    texts, parts, images = [], [], 0
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise SkipRecord("image_unsupported", f"{where}[{i}] is an {kind!r} part: {MEDIA_MESSAGE}")
        if kind == "image":
            texts.append(IMAGE_PART_TEXT)
            parts.append(("image", ""))
            images += 1
            continue
        if kind != "text" or not isinstance(part.get("text"), str):
            raise SkipRecord("bad_type", f"{where}[{i}] is not a {{'type': 'text', 'text': str}} part")
        texts.append(part["text"])
        parts.append(("text", part["text"]))
    return "".join(texts), (tuple(parts) if images else None)


def content_text(value: Any, where: str) -> str:
    """The flattened text of a message's content (``parse_content``)."""
    return parse_content(value, where)[0]


def parse_message(value: Any, where: str) -> Message:
    """One ``{role|from, content|value}`` dict -> ``Message`` with a normalised role.

    ``content`` may be a list of text parts (``content_text``). A ``null`` key counts as absent, so a
    columnar file whose struct holds both ``role`` and ``from`` (one of them null) reads as JSON does.
    """
    if not isinstance(value, dict):
        raise SkipRecord("bad_type", f"{where} is a {type_name(value)}, expected a message object")
    role = value.get("role")
    role = value.get("from") if role is None else role
    content = value.get("content")
    content = value.get("value") if content is None else content
    if role is None:
        raise SkipRecord("missing_field", f"{where} has no 'role' (or 'from')")
    if content is None:
        raise SkipRecord("missing_field", f"{where} has no 'content' (or 'value')")
    if not isinstance(role, str):
        raise SkipRecord("bad_type", f"{where}.role is a {type_name(role)}, expected a string")
    text, parts = parse_content(content, f"{where}.content")
    return Message(normalise_role(role, where), text, parts)


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """A list of message dicts -> tuple of ``Message``; ``bad_type`` when not a list."""
    if not isinstance(value, list):
        raise SkipRecord("bad_type", f"{where} is a {type_name(value)}, expected a list of messages")
    return tuple(parse_message(m, f"{where}[{i}]") for i, m in enumerate(value))


def check_chat_prompt(msgs: tuple[Message, ...], where: str = "prompt") -> tuple[Message, ...]:
    """Validate a chat prompt: non-empty, one optional leading system message, ends with a user turn."""
    if not any(m.role != "system" and m.content.strip() for m in msgs):
        raise SkipRecord("empty_prompt", f"{where} has no non-system message with text")
    for i, m in enumerate(msgs):
        if m.role == "system" and i > 0:
            raise SkipRecord("bad_prompt", f"{where}[{i}] is a system message; only one, first, is allowed")
    if msgs[-1].role != "user":
        raise SkipRecord("bad_prompt", f"{where} must end with a user turn, ends with {msgs[-1].role}")
    return msgs


def check_text_prompt(value: Any, where: str = "prompt") -> str:
    """Validate a raw-text prompt (TRL standard format)."""
    if not isinstance(value, str):
        raise SkipRecord("bad_type", f"{where} is a {type_name(value)}, expected a string")
    if not value.strip():
        raise SkipRecord("empty_prompt", f"{where} is empty")
    return value


def parse_prompt(value: Any, where: str = "prompt") -> Prompt:
    """A prompt given as a string (raw text) or a list of messages (chat)."""
    if isinstance(value, list):
        return check_chat_prompt(parse_messages(value, where), where)
    return check_text_prompt(value, where)


def response_text(value: Any, where: str) -> str:
    """One response: a string, an assistant message dict, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise SkipRecord("bad_type", f"{where} must hold exactly one assistant message, has {len(value)}")
        value = value[0]
    msg = parse_message(value, where)
    if msg.role != "assistant":
        raise SkipRecord("bad_role", f"{where} must be an assistant message, got {msg.role}")
    return msg.content


def finish(prompt: Prompt, responses: list[str], scores: list[float], names: list[str]) -> PreferenceRecord:
    """Common response checks (empty, identical), then build the record (source/line set by the reader)."""
    for name, text in zip(names, responses):
        if not text.strip():
            raise SkipRecord("empty_response", f"{name} is empty")
    if len(set(responses)) < len(responses):
        raise SkipRecord("identical_responses", f"{' and '.join(names)} have the same text")
    return PreferenceRecord(prompt=prompt, responses=tuple(responses), scores=tuple(scores))


def refuse_media(obj: Mapping[str, Any]) -> None:
    """``image_unsupported`` when the raw record names other media (a non-empty ``videos``, ``audio``, ...)."""
    if _MEDIA_FIELD_SET.isdisjoint(obj):
        return
    for name in MEDIA_FIELDS:
        value = obj.get(name)
        if value is not None and value != [] and value != "":
            raise SkipRecord("image_unsupported", f"the record has an {name!r} field: {MEDIA_MESSAGE}")


def refuse_placeholders(rec: PreferenceRecord) -> None:
    """``image_unsupported`` when the prompt or a response holds a ``<video>`` or ``<audio>`` tag."""
    texts = [rec.prompt] if isinstance(rec.prompt, str) else [m.content for m in rec.prompt]
    for text in (*texts, *rec.responses):
        found = _PLACEHOLDER_RE.search(text)
        if found:
            raise SkipRecord(
                "image_unsupported", f"a text holds the placeholder {found.group()}: {MEDIA_MESSAGE}"
            )
