"""Per-format parsing: one decoded record (a JSON object or a Parquet/Arrow row) -> one ``PreferenceRecord``,
or ``SkipRecord`` raised.

The six formats (``FORMATS``; ``--format``), with canonical field names (``--field-map`` renames them,
see ``messages.Fields``):

``pair``
    ``prompt`` + ``chosen`` + ``rejected``. Strings: TRL *standard* format (raw-text prompt).
    Message lists: TRL *conversational* format, ``prompt`` a list of ``{role, content}`` and
    ``chosen``/``rejected`` each a list holding one assistant message (a bare message dict or a plain
    string is accepted for a response too). With ``prompt`` absent and ``chosen``/``rejected`` full
    conversations, the prompt is their common prefix: each must end with an assistant turn, the
    messages before it must be identical in both (else ``prompt_mismatch``). UltraFeedback-binarized
    (``HuggingFaceH4/ultrafeedback_binarized``): ``prompt`` a string and ``chosen``/``rejected`` full
    conversations that include the user turn: the same common-prefix rule, and the prompt string must
    be the last user turn's text (else ``prompt_mismatch``). A raw-text prompt with one-message
    responses is ``bad_type`` (mixing the two TRL formats).
``transcript``
    HH-RLHF: ``chosen``/``rejected`` are whole transcripts; see ``parse_transcript`` for the exact
    policy. The prompt is the messages before the final assistant turn of each; they must be equal
    (else ``prompt_mismatch``).
``sharegpt``
    ``conversations`` (or ``messages`` when ``conversations`` is absent: LLaMA-Factory's OpenAI-style
    preference data) of ``{from, value}`` / ``{role, content}`` messages + ``chosen`` + ``rejected``
    (one assistant message each, or a string); optional top-level ``system`` string, prepended as a
    system message when non-empty.
``ranked``
    A prompt as ``messages`` (list) or, when ``messages`` is absent, ``prompt`` (string or list);
    ``responses``: K >= 2 strings or ``{content}`` dicts; ``scores`` (higher is better) or ``ranks``
    (0 = best, stored as ``score = -rank``); if both are present ``scores`` is used. Exact duplicate
    responses are dropped, keeping the first occurrence and its label; the record is skipped as
    ``identical_responses`` only when fewer than 2 distinct responses remain, and as ``bad_scores``
    when the remaining labels are all equal. One empty response skips the whole record
    (``empty_response``): responses are never silently dropped for being empty.
``alpaca``
    LLaMA-Factory alpaca pairwise: ``instruction``, optional ``input``, ``chosen``, ``rejected``
    (strings), optional ``system`` and ``history`` (``[[user, assistant], ...]``), converted as
    LLaMA-Factory's ``AlpacaDatasetConverter`` does: the user turn is the non-empty ones of
    ``instruction`` and ``input`` joined with ``"\n"``, after the history turns.
``swift``
    ms-swift RLHF: ``messages`` ending with the chosen assistant turn, and ``rejected_response`` (a
    string): the prompt is ``messages[:-1]``.

Pair formats score chosen 1.0, rejected 0.0. Message rules (roles, content parts, media) are in
``messages.py``; every format may carry images (``images``/``image`` column, ``image_refs.py``). A chat prompt may start with one system message and must end with a user turn
(``bad_prompt``); it is ``empty_prompt`` when it has no non-system message with visible text. A JSON
``null`` counts as a missing field. Over-length is not judged here.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from megatron_prefix.data.messages import (
    Fields,
    check_chat_prompt,
    finish,
    parse_messages,
    parse_prompt,
    response_text,
    type_name,
)
from megatron_prefix.data.records import Message, PreferenceRecord, Prompt, SkipRecord

FORMATS = ("pair", "transcript", "sharegpt", "ranked", "alpaca", "swift")

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
    "instruction",
    "input",
    "history",
    "rejected_response",
    "images",
    "image",
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
    "image_unsupported",
    "image_count_mismatch",
    "image_in_response",
    "bad_image",
    "truncated_file",
)

HUMAN_SEP = "\n\nHuman:"
ASSISTANT_SEP = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")

# --------------------------------------------------------------------------------------------- formats


def _common_prefix(convs: list[tuple[Message, ...]], names: list[str]) -> tuple[Message, ...]:
    """The shared prompt of two full conversations: all but their final assistant turns, which must match."""
    for conv, n in zip(convs, names):
        if not conv or conv[-1].role != "assistant":
            raise SkipRecord("bad_prompt", f"{n} (a whole conversation) must end with an assistant turn")
    if convs[0][:-1] != convs[1][:-1]:
        a, b = convs[0][:-1], convs[1][:-1]
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        at = f"at message {i}" if i is not None else f"({len(a)} vs {len(b)} messages)"
        raise SkipRecord(
            "prompt_mismatch", f"{names[0]} and {names[1]} differ before the final assistant turn {at}"
        )
    return check_chat_prompt(convs[0][:-1], f"{names[0]}[:-1]")


def parse_pair(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """TRL standard or conversational pair, or UltraFeedback-binarized (see the module docstring)."""
    f = Fields(obj, field_map)
    chosen, rejected = f.require("chosen"), f.require("rejected")
    names = [f.column("chosen"), f.column("rejected")]
    raw_prompt = f.get("prompt")
    whole = isinstance(chosen, list) and isinstance(rejected, list) and min(len(chosen), len(rejected)) >= 2
    if raw_prompt is None or (whole and isinstance(raw_prompt, str)):
        if raw_prompt is None and not (isinstance(chosen, list) or isinstance(rejected, list)):
            f.require("prompt")  # raises missing_field
        convs = [parse_messages(v, n) for v, n in zip((chosen, rejected), names)]
        prompt: Prompt = _common_prefix(convs, names)
        if isinstance(raw_prompt, str) and raw_prompt.strip() != prompt[-1].content.strip():
            raise SkipRecord(
                "prompt_mismatch",
                f"{f.column('prompt')} is not the last user turn of {names[0]} (a whole conversation)",
            )
        return finish(prompt, [convs[0][-1].content, convs[1][-1].content], [1.0, 0.0], names)
    if isinstance(raw_prompt, str):
        for v, n in zip((chosen, rejected), names):
            if not isinstance(v, str):
                raise SkipRecord("bad_type", f"{n} is a {type_name(v)} but the prompt is a string")
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
        raise SkipRecord("bad_type", f"{where} is a {type_name(text)}, expected a transcript string")
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
    """ShareGPT-style (or ``messages``) pair as LLaMA-Factory reads it (see the module docstring)."""
    f = Fields(obj, field_map)
    key = "messages" if not f.has("conversations") and f.has("messages") else "conversations"
    conv_col = f.column(key)
    msgs = parse_messages(f.require(key), conv_col)
    chosen, rejected = f.require("chosen"), f.require("rejected")
    system = f.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise SkipRecord("bad_type", f"{f.column('system')} is a {type_name(system)}, expected a string")
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
        raise SkipRecord("bad_type", f"{col} is a {type_name(values)}, expected a list of numbers")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SkipRecord("bad_type", f"{col}[{i}] is a {type_name(v)}, expected a number")
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
        raise SkipRecord("bad_type", f"{col} is a {type_name(raw)}, expected a list")
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


def _text_field(f: Fields, name: str, required: bool = True) -> str:
    value = f.require(name) if required else f.get(name, "")
    if not isinstance(value, str):
        raise SkipRecord("bad_type", f"{f.column(name)} is a {type_name(value)}, expected a string")
    return value


def parse_alpaca(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """LLaMA-Factory alpaca pairwise (see the module docstring)."""
    f = Fields(obj, field_map)
    msgs: list[Message] = []
    system = _text_field(f, "system", required=False)
    if system.strip():
        msgs.append(Message("system", system))
    history = f.get("history", [])
    hcol = f.column("history")
    if not isinstance(history, list):
        raise SkipRecord(
            "bad_type", f"{hcol} is a {type_name(history)}, expected a list of [user, assistant]"
        )
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise SkipRecord("bad_type", f"{hcol}[{i}] is not a [user, assistant] pair of strings")
        msgs += [Message("user", turn[0]), Message("assistant", turn[1])]
    query = [t for t in (_text_field(f, "instruction"), _text_field(f, "input", required=False)) if t]
    msgs.append(Message("user", "\n".join(query)))
    prompt = check_chat_prompt(tuple(msgs), f.column("instruction"))
    names = [f.column("chosen"), f.column("rejected")]
    return finish(prompt, [_text_field(f, "chosen"), _text_field(f, "rejected")], [1.0, 0.0], names)


def parse_swift(obj: Mapping[str, Any], field_map: Mapping[str, str] | None = None) -> PreferenceRecord:
    """ms-swift RLHF pair: ``messages`` ending with the chosen reply, ``rejected_response``."""
    f = Fields(obj, field_map)
    col = f.column("messages")
    msgs = parse_messages(f.require("messages"), col)
    if not msgs or msgs[-1].role != "assistant":
        raise SkipRecord("bad_prompt", f"{col} must end with the chosen assistant turn")
    prompt = check_chat_prompt(msgs[:-1], f"{col}[:-1]")
    rejected = _text_field(f, "rejected_response")
    return finish(
        prompt, [msgs[-1].content, rejected], [1.0, 0.0], [f"{col}[-1]", f.column("rejected_response")]
    )


PARSERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str] | None], PreferenceRecord]] = {
    "pair": parse_pair,
    "transcript": parse_transcript_pair,
    "sharegpt": parse_sharegpt,
    "ranked": parse_ranked,
    "alpaca": parse_alpaca,
    "swift": parse_swift,
}


def guess_format(obj: Any, field_map: Mapping[str, str] | None = None) -> str | None:
    """The format of one raw record by its fields, or None.

    Rules, in order: ``conversations`` -> sharegpt; ``responses`` -> ranked; ``rejected_response`` ->
    swift; ``instruction`` with ``chosen``/``rejected`` -> alpaca; ``chosen`` and ``rejected`` with
    ``prompt`` -> pair; with ``messages`` -> sharegpt; without either: message lists -> pair (implicit
    prompt), strings holding an ``Assistant:`` turn -> transcript.
    """
    if not isinstance(obj, dict):
        return None
    f = Fields(obj, field_map)
    if f.has("conversations"):
        return "sharegpt"
    if f.has("responses"):
        return "ranked"
    if f.has("rejected_response"):
        return "swift"
    if f.has("chosen") and f.has("rejected"):
        if f.has("instruction"):
            return "alpaca"
        if f.has("prompt"):
            return "pair"
        if f.has("messages"):
            return "sharegpt"
        chosen = f.get("chosen")
        if isinstance(chosen, list):
            return "pair"
        if isinstance(chosen, str) and "Assistant:" in chosen and "Human:" in chosen:
            return "transcript"
    return None
