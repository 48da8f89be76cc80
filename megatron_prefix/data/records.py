"""What a reader yields: one preference record, before tokenization.

A record is one prompt with K >= 2 responses and a preference among them. The prompt is either raw
text (TRL's "standard" format, tokenized as is) or a list of chat messages (TRL's "conversational"
format, rendered with the tokenizer's chat template). Each response is the text of one assistant turn.

Preferences are carried as ``scores``: higher is better, ties allowed. Rank data (rank 0 = best) is
stored as ``score = -rank`` so that both kinds sort the same way.

A record may carry images (``images``, in placeholder order: the order of the ``<image>`` placeholders and
``{"type": "image"}`` parts of its prompt, message by message). A message whose content had image parts
keeps them in ``Message.parts`` (``("image", "")`` / ``("text", text)``) so that the chat template sees
the content-part list; ``Message.content`` is then the text of its text parts.

Every record remembers where it came from (``source`` file and 1-based ``line``; for a JSON array the
line is the element index + 1) so that every skip and every error can name it.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn; ``parts`` only when the content was a part list holding an image."""

    role: str
    content: str
    parts: tuple[tuple[str, str], ...] | None = None

    @property
    def num_images(self) -> int:
        """Images of this turn: image parts, or ``<image>`` placeholders in its text."""
        if self.parts is not None:
            return sum(1 if kind == "image" else text.count(IMAGE_PLACEHOLDER) for kind, text in self.parts)
        return self.content.count(IMAGE_PLACEHOLDER)


IMAGE_PLACEHOLDER = "<image>"  # LLaVA-style placeholder in text (one per image, in order)


@dataclass(frozen=True, repr=False)
class ImageRef:
    """One image of a record: a file ``path`` (resolved against the data file's folder) or embedded
    encoded ``data`` (PNG/JPEG/... bytes); ``name`` says where it came from (``images[0]``)."""

    path: str | None = None
    data: bytes | None = None
    name: str = ""

    def __repr__(self) -> str:
        what = f"path={self.path!r}" if self.data is None else f"{len(self.data)} bytes"
        return f"ImageRef({self.name}, {what})"

    def describe(self) -> str:
        """``images[0] (cat.png)`` or ``images[0] (embedded, 1234 bytes)`` for messages."""
        what = self.path if self.data is None else f"embedded, {len(self.data)} bytes"
        return f"{self.name} ({what})"

    def key(self) -> str:
        """A short content key (the path, or a digest of the bytes) for duplicate detection."""
        if self.data is None:
            return f"path:{self.path}"
        return "bytes:" + hashlib.blake2b(self.data, digest_size=8).hexdigest()


Prompt = Union[str, tuple[Message, ...]]


@dataclass(frozen=True)
class PreferenceRecord:
    """One prompt, K >= 2 responses, and their scores (higher is better)."""

    prompt: Prompt
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    source: str = ""
    line: int = 0
    images: tuple[ImageRef, ...] = ()

    @property
    def is_chat(self) -> bool:
        """True when the prompt is a message list (rendered with a chat template)."""
        return not isinstance(self.prompt, str)

    @property
    def k(self) -> int:
        """Number of responses."""
        return len(self.responses)

    def where(self) -> str:
        """``file:line`` for messages."""
        return f"{self.source}:{self.line}"


class SkipRecord(Exception):
    """Raised by readers and the tokenizer stage for a record that is counted and skipped.

    ``reason`` is a short stable key (``malformed_json``, ``missing_field``, ``prompt_mismatch``, ...)
    used as the key in ``stats.json`` and ``skipped.jsonl``; ``detail`` is free text for humans.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Skipped:
    """A record that was counted and skipped: where it was and why (one line of ``skipped.jsonl``)."""

    source: str
    line: int
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        return {"file": self.source, "line": self.line, "reason": self.reason, "detail": self.detail}
