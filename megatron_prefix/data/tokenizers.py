"""Tokenizers behind one small interface: byte-level, SentencePiece, and Hugging Face ``tokenizer.json``.

``load_tokenizer(spec)`` accepts:

- ``"byte"``: UTF-8 bytes are ids 0-255, then EOS = 256, PAD = 257 (vocab 258); no BOS.
- a path to a SentencePiece ``.model`` file (BOS/EOS/PAD from the model; PAD falls back to EOS when the
  model has none; ``encode(add_special=True)`` prepends BOS when the model has one).
- a Hugging Face tokenizer directory holding ``tokenizer.json`` (read with the ``tokenizers`` package, not
  ``transformers``) and optionally ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
  ``add_bos_token``, ``chat_template``) and/or ``chat_template.jinja``. When ``add_bos_token`` is not
  given, whether BOS is added is read off the tokenizer's own post-processor (as ``transformers`` does).

``encode(text, add_special)`` never appends EOS: ``add_special`` only controls the BOS. Special-token
text inside ``text`` (``<|im_start|>``...) maps to the special ids for HF tokenizers, as with
``transformers``. ``render_chat`` uses the tokenizer's chat template, or ``templates.PLAIN_CHAT_TEMPLATE``.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from megatron_prefix.data.records import Message
from megatron_prefix.data.templates import PLAIN_CHAT_TEMPLATE, TemplateError, render_template

BYTE_EOS = 256
BYTE_PAD = 257
BYTE_VOCAB = 258
_EOS_FALLBACKS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer:
    """The interface the data pipeline uses. Subclasses fill the attributes and ``_encode``/``decode``."""

    kind: str = ""
    path: str = ""
    vocab_size: int = 0
    eos_id: int = 0
    pad_id: int = 0
    bos_id: int | None = None
    bos_token: str | None = None  # text of the BOS token (what a template emits), if any
    eos_token: str | None = None
    add_bos: bool = False  # whether encode(add_special=True) prepends bos_id
    chat_template: str | None = None  # None: the plain template
    template_date: date | None = None  # what the template's strftime_now prints; None: today (the clock)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_special: bool) -> list[int]:
        """Token ids of ``text``; with ``add_special`` the BOS is prepended if this tokenizer adds one."""
        ids = self._encode(text)
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (best effort; used for inspection, not by the pipeline)."""
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        """True when the tokenizer ships its own chat template (else the plain template is used)."""
        return self.chat_template is not None

    def render_chat(
        self, messages: Sequence[Message | dict], add_generation_prompt: bool, parts: bool = False
    ) -> str:
        """Render messages with the tokenizer's chat template (or the plain one); raises ``TemplateError``.

        ``parts``: messages with image parts are given as content-part lists when the template takes
        them (``takes_parts``), else as their flattened text (each image part ``"<image>\n"``)."""
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return render_template(
            self.chat_template or PLAIN_CHAT_TEMPLATE,
            messages,
            add_generation_prompt,
            specials,
            today=self.template_date,
            parts=parts and self.takes_parts,
        )

    @property
    def takes_parts(self) -> bool:
        """Whether the chat template renders content-part lists (decided once by a probe).

        Probe: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE}]}]``
        with the generation prompt; the template takes parts when it renders without error, writes the
        probe text and does not write the part dicts themselves (``{'type': ...}``). The plain template
        takes strings only."""
        cached = getattr(self, "_takes_parts", None)
        if cached is None:
            cached = False
            if self.chat_template is not None:
                probe = "Xq7 probe text"
                msgs = [Message("user", "<image>\n" + probe, (("image", ""), ("text", probe)))]
                specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
                try:
                    out = render_template(self.chat_template, msgs, True, specials, today=self.template_date,
                                          parts=True)
                    cached = probe in out and "'type'" not in out and '"type"' not in out
                except TemplateError:
                    cached = False
            self._takes_parts = cached
        return cached

    def _files(self) -> list[Path]:
        return []

    def content_hash(self) -> str:
        """sha256 over the tokenizer's files (and its kind), identifying it in dataset metadata."""
        h = hashlib.sha256(self.kind.encode())
        for f in self._files():
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """Metadata for the dataset: kind, path, vocab size, special ids, template, content hash."""
        tmpl = self.chat_template or PLAIN_CHAT_TEMPLATE
        return {
            "kind": self.kind,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
            "has_chat_template": self.has_chat_template,
            "chat_template_sha256": hashlib.sha256(tmpl.encode()).hexdigest(),
            "sha256": self.content_hash(),
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255; EOS 256, PAD 257; no BOS."""

    def __init__(self) -> None:
        self.kind, self.path = "byte", "byte"
        self.vocab_size, self.eos_id, self.pad_id = BYTE_VOCAB, BYTE_EOS, BYTE_PAD

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS/PAD are dropped, invalid UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self._file = path
        self.kind, self.path = "sentencepiece", str(path)
        self.vocab_size = int(self._sp.get_piece_size())
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if eos < 0:
            raise ValueError(f"tokenizer {path}: the SentencePiece model has no EOS piece")
        self.eos_id, self.eos_token = eos, self._sp.id_to_piece(eos)
        self.pad_id = pad if pad >= 0 else eos
        if bos >= 0:
            self.bos_id, self.bos_token, self.add_bos = bos, self._sp.id_to_piece(bos), True

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """SentencePiece decode (control pieces such as BOS/EOS are dropped)."""
        return self._sp.decode([int(i) for i in ids])

    def _files(self) -> list[Path]:
        return [self._file]


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_template(cfg: dict, folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    return tmpl if isinstance(tmpl, str) and tmpl else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``) read with the ``tokenizers`` package."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        self._folder = folder
        self._tok = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"tokenizer {cfg_path}: invalid JSON: {err}") from err
        self.kind, self.path = "hf", str(folder)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.chat_template = _config_template(cfg, folder)

        eos = _token_text(cfg.get("eos_token"))
        if eos is None:
            eos = next((t for t in _EOS_FALLBACKS if self._tok.token_to_id(t) is not None), None)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise ValueError(f"tokenizer {folder}: no EOS token (set eos_token in tokenizer_config.json)")
        self.eos_token, self.eos_id = eos, self._tok.token_to_id(eos)
        pad = _token_text(cfg.get("pad_token"))
        self.pad_id = (
            self._tok.token_to_id(pad) if pad and self._tok.token_to_id(pad) is not None else self.eos_id
        )
        bos = _token_text(cfg.get("bos_token"))
        if bos is not None and self._tok.token_to_id(bos) is not None:
            self.bos_token, self.bos_id = bos, self._tok.token_to_id(bos)
            if isinstance(cfg.get("add_bos_token"), bool):
                self.add_bos = cfg["add_bos_token"]
            else:  # what the tokenizer's post-processor does
                with_special = self._tok.encode("a", add_special_tokens=True).ids
                self.add_bos = with_special[:1] == [self.bos_id]

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens kept as their text."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        return [self._folder / n for n in names if (self._folder / n).is_file()]


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, a SentencePiece ``.model`` path, or a HF directory with ``tokenizer.json``.

    Raises ``ValueError`` naming the spec when it is none of these.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.name == "tokenizer.json":
            return HFTokenizer(path.parent)
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        raise ValueError(f"tokenizer {spec!r}: directory has neither tokenizer.json nor tokenizer.model")
    raise ValueError(
        f"tokenizer {spec!r}: expected 'byte', a SentencePiece .model file or a Hugging Face "
        "directory with tokenizer.json, and no such file or directory exists"
    )
