"""Chat templates: the plain fallback template and a sandboxed Jinja renderer like transformers'.

A chat template turns a message list into one string. Hugging Face tokenizers ship theirs in
``tokenizer_config.json`` (``chat_template``) or ``chat_template.jinja``; the byte tokenizer, SentencePiece
models and HF tokenizers without one use ``PLAIN_CHAT_TEMPLATE``. Every message becomes::

    <|{role}|>\\n{content}\\n

and ``add_generation_prompt=True`` appends ``<|assistant|>\\n``. So ``[system: S, user: U]`` plus the
generation prompt renders as ``"<|system|>\\nS\\n<|user|>\\nU\\n<|assistant|>\\n"`` and an assistant reply
``A`` after it renders as ``"A\\n"``. The markers are ordinary text (no special tokens); no BOS/EOS text
is emitted (the tokenization policy adds those, see ``docs/tokenization.md``).

Rendering follows ``transformers``' ``apply_chat_template``: an ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not
escape HTML, and the globals ``raise_exception`` and ``strftime_now``. Templates are compiled once and
cached. ``strftime_now`` (Llama-3.1 templates print "Today Date: ...") reads the clock unless a build pins
the date (``render_template(..., today=date)``, ``--date`` of ``tools/build_dataset.py``); a pinned date is
midnight of that day, so a rebuild on another day is byte-identical.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import date, datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megatron_prefix.data.records import Message

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A chat template failed to render (``raise_exception`` in the template, or a Jinja error)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def parse_template_date(text: str) -> date:
    """``YYYY-MM-DD`` -> ``date``; ``ValueError`` saying what to write otherwise."""
    try:
        if isinstance(text, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"template date {text!r} is not a YYYY-MM-DD date (e.g. --date 2026-01-31)")


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandboxed environment configured like transformers'."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise TemplateError(f"chat template does not compile: {err}") from err


def part_dicts(parts: Sequence[tuple[str, str]]) -> list[dict]:
    """``Message.parts`` -> the content-part list HF templates take (``{"type": "image"}``, text parts)."""
    return [{"type": "image"} if kind == "image" else {"type": "text", "text": text} for kind, text in parts]


def messages_to_dicts(messages: Sequence[Message | dict], parts: bool = False) -> list[dict]:
    """``Message`` objects (or dicts) -> the ``[{"role", "content"}]`` list templates expect.

    With ``parts``, a message holding image parts gets its content-part list (``part_dicts``); else every
    content is its (flattened) text."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            content = part_dicts(m.parts) if parts and m.parts is not None else m.content
            out.append({"role": m.role, "content": content})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def render_template(
    source: str,
    messages: Sequence[Message | dict],
    add_generation_prompt: bool,
    special_tokens: dict[str, str | None] | None = None,
    today: date | None = None,
    parts: bool = False,
) -> str:
    """Render ``messages`` with template ``source``; ``special_tokens`` gives ``bos_token``, ``eos_token``, ...

    ``today`` pins what ``strftime_now`` prints (midnight of that day); None reads the clock, as
    transformers does. ``parts``: messages with image parts are given as content-part lists
    (``messages_to_dicts``). Raises ``TemplateError`` when the template raises or fails.
    """
    tmpl = compile_template(source)
    variables: dict[str, Any] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    if today is not None:
        pinned = datetime(today.year, today.month, today.day)
        variables["strftime_now"] = pinned.strftime
    try:
        return tmpl.render(
            messages=messages_to_dicts(messages, parts), add_generation_prompt=add_generation_prompt, **variables
        )
    except (jinja2.exceptions.TemplateError, TypeError) as err:  # TypeError: str + list in a template
        raise TemplateError(f"chat template failed: {err}") from err
