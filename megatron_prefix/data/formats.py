"""Per-format parsing: one decoded JSON object -> one ``PreferenceRecord``, or ``SkipRecord`` raised.

The four formats (``FORMATS``), with canonical field names (``field_map`` renames them, see ``Fields``):

``pair``
    ``prompt`` + ``chosen`` + ``rejected``. Strings: TRL *standard* format (raw-text prompt).
    Message lists: TRL *conversational* format, ``prompt`` a list of ``{role, content}`` and
    ``chosen``/``rejected`` each a list holding one assistant message (a bare message dict or a plain
    string is accepted for a response too). A raw-text prompt with message-list responses is
    ``bad_type`` (mixing the two TRL formats). With ``prompt`` absent and ``chosen``/``rejected`` full
    conversations, the prompt is their common prefix: each must end with an assistant turn, the
    messages before it must be identical in both (else ``prompt_mismatch``).
``transcript``
    HH-RLHF: ``chosen``/``rejected`` are whole transcripts; see ``parse_transcript`` for the exact
    policy. The prompt is the messages before the final assistant turn of each; they must be equal
    (else ``prompt_mismatch``).
``sharegpt``
    ``conversations`` (``{from, value}`` messages, ``human``/``gpt``/``system``) + ``chosen`` +
    ``rejected`` (one ``{from: gpt, value}`` message each, or a string); optional top-level ``system``
    string, prepended as a system message when non-empty.
``ranked``
    A prompt as ``messages`` (list) or, when ``messages`` is absent, ``prompt`` (string or list);
    ``responses``: K >= 2 strings or ``{content}`` dicts; ``scores`` (higher is better) or ``ranks``
    (0 = best, stored as ``score = -rank``); if both are present ``scores`` is used. Exact duplicate
    responses are dropped, keeping the first occurrence and its label; the record is skipped as
    ``identical_responses`` only when fewer than 2 distinct responses remain, and as ``bad_scores``
    when the remaining labels are all equal. One empty response skips the whole record
    (``empty_response``): responses are never silently dropped for being empty.

Pair formats score chosen 1.0, rejected 0.0. Messages accept ``role``/``from`` and ``content``/``value``;
roles are normalised (``ROLE_ALIASES``, case-insensitive); an unknown role is ``bad_role``, and so is a
response message whose role is not assistant. A chat prompt may start with one system message and must
end with a user turn (``bad_prompt``); it is ``empty_prompt`` when it has no non-system message with
visible text. A JSON ``null`` counts as a missing field. Over-length is not judged here.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from megatron_prefix.data.records import Message, PreferenceRecord, Prompt, SkipRecord

FORMATS = ("pair", "transcript", "sharegpt", "ranked")

CANONICAL_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "messages",
    "responses",
    "ranks",
    "scores",
    "conversations",
    "system",
)

SKIP_REASONS = (
    "malformed_json",
    "bad_utf8",
    "missing_field",
    "bad_type",
    "empty_prompt",
    "empty_response",
    "identical_responses",
    "too_few_responses",
    "bad_scores",
    "prompt_mismatch",
    "bad_role",
    "bad_prompt",
    "truncated_file",
)

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

HUMAN_SEP = "\n\nHuman:"
ASSISTANT_SEP = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")

_MISSING = object()


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


def _type_name(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------------------------- messages


def normalise_role(role: str, where: str) -> str:
    """Map a role name to system/user/assistant; ``bad_role`` when unknown."""
    norm = ROLE_ALIASES.get(role.strip().lower())
    if norm is None:
        raise SkipRecord("bad_role", f"{where}: unknown role {role!r}")
    return norm


def parse_message(value: Any, where: str) -> Message:
    """One ``{role|from, content|value}`` dict -> ``Message`` with a normalised role."""
    if not isinstance(value, dict):
        raise SkipRecord("bad_type", f"{where} is a {_type_name(value)}, expected a message object")
    role = value.get("role", value.get("from"))
    content = value.get("content", value.get("value"))
    if role is None:
        raise SkipRecord("missing_field", f"{where} has no 'role' (or 'from')")
    if content is None:
        raise SkipRecord("missing_field", f"{where} has no 'content' (or 'value')")
    if not isinstance(role, str):
        raise SkipRecord("bad_type", f"{where}.role is a {_type_name(role)}, expected a string")
    if not isinstance(content, str):
        raise SkipRecord("bad_type", f"{where}.content is a {_type_name(content)}, expected a string")
    return Message(normalise_role(role, where), content)


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """A list of message dicts -> tuple of ``Message``; ``bad_type`` when not a list."""
    if not isinstance(value, list):
        raise SkipRecord("bad_type", f"{where} is a {_type_name(value)}, expected a list of messages")
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
        raise SkipRecord("bad_type", f"{where} is a {_type_name(value)}, expected a string")
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


# --------------------------------------------------------------------------------------------- formats


def parse_pair(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """TRL standard or conversational pair (see the module docstring)."""
    f = Fields(obj, field_map)
    chosen, rejected = f.require("chosen"), f.require("rejected")
    names = [f.column("chosen"), f.column("rejected")]
    if not f.has("prompt"):
        if not (isinstance(chosen, list) or isinstance(rejected, list)):
            f.require("prompt")  # raises missing_field
        convs = [parse_messages(v, n) for v, n in zip((chosen, rejected), names)]
        for conv, n in zip(convs, names):
            if not conv or conv[-1].role != "assistant":
                raise SkipRecord(
                    "bad_prompt", f"{n} (a conversation, no prompt field) must end with an assistant turn"
                )
        if convs[0][:-1] != convs[1][:-1]:
            raise SkipRecord(
                "prompt_mismatch", f"{names[0]} and {names[1]} differ before the final assistant turn"
            )
        prompt: Prompt = check_chat_prompt(convs[0][:-1], f"{names[0]}[:-1]")
        return finish(prompt, [convs[0][-1].content, convs[1][-1].content], [1.0, 0.0], names)
    raw_prompt = f.require("prompt")
    if isinstance(raw_prompt, str):
        for v, n in zip((chosen, rejected), names):
            if not isinstance(v, str):
                raise SkipRecord("bad_type", f"{n} is a {_type_name(v)} but the prompt is a string")
    prompt = parse_prompt(raw_prompt, f.column("prompt"))
    responses = [response_text(v, n) for v, n in zip((chosen, rejected), names)]
    return finish(prompt, responses, [1.0, 0.0], names)


def parse_transcript(text: str, where: str) -> list[Message]:
    """Split an HH-RLHF transcript into messages.

    Policy: turns are introduced by exactly ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` (the transcript
    may also begin with ``"Human:"`` without the blank line). Any other occurrence of these words
    (``"Assistant: Human: ..."``, a single newline before ``Human:``) is turn text. The turn text is
    everything up to the next separator, kept exactly, except that one single space right after the
    colon is removed: leading/trailing whitespace and newlines inside a turn are preserved, so no
    character of a response is lost. Text before the first ``Human:`` turn is ``bad_prompt``.
    """
    if not isinstance(text, str):
        raise SkipRecord("bad_type", f"{where} is a {_type_name(text)}, expected a transcript string")
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _TURN_RE.split(text)
    if parts[0] != "" or len(parts) < 3:
        raise SkipRecord("bad_prompt", f"{where} does not start with a '\\n\\nHuman:' turn")
    msgs = []
    for i in range(1, len(parts), 2):
        body = parts[i + 1]
        body = body.removeprefix(" ")
        msgs.append(Message("user" if parts[i] == "Human" else "assistant", body))
    return msgs


def parse_transcript_pair(
    obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None
) -> PreferenceRecord:
    """HH-RLHF pair of whole transcripts; the shared prompt is derived (see ``parse_transcript``)."""
    f = Fields(obj, field_map)
    names = [f.column("chosen"), f.column("rejected")]
    convs = [parse_transcript(f.require(name), n) for name, n in zip(("chosen", "rejected"), names)]
    for conv, n in zip(convs, names):
        if conv[-1].role != "assistant":
            raise SkipRecord("bad_prompt", f"{n} does not end with an Assistant turn")
    if convs[0][:-1] != convs[1][:-1]:
        i = next((j for j, (a, b) in enumerate(zip(convs[0][:-1], convs[1][:-1])) if a != b), None)
        at = f"at turn {i}" if i is not None else f"({len(convs[0]) - 1} vs {len(convs[1]) - 1} turns)"
        raise SkipRecord(
            "prompt_mismatch", f"{names[0]} and {names[1]} differ before the last Assistant turn {at}"
        )
    prompt = check_chat_prompt(tuple(convs[0][:-1]), f"{names[0]}[:-1]")
    return finish(prompt, [convs[0][-1].content, convs[1][-1].content], [1.0, 0.0], names)


def parse_sharegpt(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """ShareGPT-style pair as LLaMA-Factory reads it (see the module docstring)."""
    f = Fields(obj, field_map)
    conv_col = f.column("conversations")
    msgs = parse_messages(f.require("conversations"), conv_col)
    chosen, rejected = f.require("chosen"), f.require("rejected")
    system = f.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise SkipRecord("bad_type", f"{f.column('system')} is a {_type_name(system)}, expected a string")
        if system.strip():
            msgs = (Message("system", system),) + msgs
    prompt = check_chat_prompt(msgs, conv_col)
    names = [f.column("chosen"), f.column("rejected")]
    responses = [response_text(v, n) for v, n in zip((chosen, rejected), names)]
    return finish(prompt, responses, [1.0, 0.0], names)


def _labels(f: Fields, k: int) -> list[float]:
    """Scores (higher better) from ``scores``, or ``-rank`` from ``ranks``; validated."""
    name = "scores" if f.has("scores") else "ranks"
    if not f.has(name):
        raise SkipRecord("missing_field", f"no field '{f.column('scores')}' or '{f.column('ranks')}'")
    col = f.column(name)
    values = f.require(name)
    if not isinstance(values, list):
        raise SkipRecord("bad_type", f"{col} is a {_type_name(values)}, expected a list of numbers")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SkipRecord("bad_type", f"{col}[{i}] is a {_type_name(v)}, expected a number")
    if len(values) != k:
        raise SkipRecord("bad_scores", f"{col} has {len(values)} values for {k} responses")
    if not all(math.isfinite(v) for v in values):
        raise SkipRecord("bad_scores", f"{col} has a NaN or infinite value")
    return [float(v) for v in values] if name == "scores" else [-float(v) for v in values]


def parse_ranked(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """One prompt with K >= 2 ranked or scored responses (see the module docstring)."""
    f = Fields(obj, field_map)
    if f.has("messages"):
        col = f.column("messages")
        prompt: Prompt = check_chat_prompt(parse_messages(f.require("messages"), col), col)
    elif f.has("prompt"):
        prompt = parse_prompt(f.require("prompt"), f.column("prompt"))
    else:
        raise SkipRecord("missing_field", f"no field '{f.column('messages')}' or '{f.column('prompt')}'")
    col = f.column("responses")
    raw = f.require("responses")
    if not isinstance(raw, list):
        raise SkipRecord("bad_type", f"{col} is a {_type_name(raw)}, expected a list")
    if len(raw) < 2:
        raise SkipRecord("too_few_responses", f"{col} has {len(raw)} response(s), need at least 2")
    texts = []
    for i, r in enumerate(raw):
        if isinstance(r, dict) and "role" not in r and "from" not in r:
            r = r.get("content", r.get("value"))
            if r is None:
                raise SkipRecord("missing_field", f"{col}[{i}] has no 'content'")
        texts.append(response_text(r, f"{col}[{i}]"))
    scores = _labels(f, len(texts))
    for i, t in enumerate(texts):
        if not t.strip():
            raise SkipRecord("empty_response", f"{col}[{i}] is empty")
    keep: dict[str, float] = {}
    for t, s in zip(texts, scores):
        keep.setdefault(t, s)  # first occurrence wins
    if len(keep) < 2:
        raise SkipRecord("identical_responses", f"{col}: fewer than 2 distinct responses")
    if len(set(keep.values())) < 2:
        raise SkipRecord("bad_scores", "all responses have the same score/rank")
    return PreferenceRecord(prompt=prompt, responses=tuple(keep), scores=tuple(keep.values()))


PARSERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str] | None], PreferenceRecord]] = {
    "pair": parse_pair,
    "transcript": parse_transcript_pair,
    "sharegpt": parse_sharegpt,
    "ranked": parse_ranked,
}


def guess_format(obj: Any, field_map: Mapping[str, str] | None = None) -> str | None:
    """The format of one raw record by its fields, or None.

    Rules, in order: ``conversations`` -> sharegpt; ``responses`` -> ranked; ``chosen`` and ``rejected``
    with ``prompt`` -> pair; without ``prompt``: message lists -> pair (implicit prompt), strings
    holding an ``Assistant:`` turn -> transcript.
    """
    if not isinstance(obj, dict):
        return None
    f = Fields(obj, field_map)
    if f.has("conversations"):
        return "sharegpt"
    if f.has("responses"):
        return "ranked"
    if f.has("chosen") and f.has("rejected"):
        if f.has("prompt"):
            return "pair"
        chosen = f.get("chosen")
        if isinstance(chosen, list):
            return "pair"
        if isinstance(chosen, str) and "Assistant:" in chosen and "Human:" in chosen:
            return "transcript"
    return None
