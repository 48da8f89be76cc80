"""Streaming readers for preference files: JSONL or one JSON array (plain or gzip), Parquet or Arrow.

``open_records(paths)`` yields, in file order, one ``PreferenceRecord`` per good record and one
``Skipped`` per bad one (never raising on a bad record); it raises ``ValueError`` naming the file for an
unusable file (missing, unknown format, format detection impossible, corrupt compression).

Containers (memory stays flat in the input size):
- gzip is recognised by its magic bytes (``1f 8b``), whatever the file name;
- a file whose first non-blank character (after an optional UTF-8 BOM) is ``[`` is one JSON array,
  parsed element by element with ``json.JSONDecoder.raw_decode`` over a sliding text buffer; a record's
  ``line`` is then its element index + 1. A malformed element yields one ``malformed_json`` skip and ends
  that file (the rest of an array cannot be resynchronised);
- anything else is JSONL: one JSON object per line, ``line`` is the 1-based physical line number; each
  line is decoded from bytes on its own (a bad line is ``bad_utf8``, the file goes on); blank lines are
  ignored silently.

Parquet and Arrow files and folders (``datasets``' ``to_parquet``, ``save_to_disk``, a downloaded
dataset's shards) are read by ``columnar.py``, row by row (``line`` = 1-based row number); a folder input
expands to its data files, each read and reported on its own.

Images, in every format: the record's ``images`` (or ``image``) column, paths relative to the data file's
folder, embedded bytes or base64 (``image_refs.images_of``), with one ``<image>`` placeholder or
``{"type": "image"}`` part per image in the prompt (``image_refs.check_images``). Other media (videos,
audio) are skipped as ``image_unsupported`` (``messages.refuse_media``).
A record holding a lone surrogate escape (``"\\ud800"``, which Python's ``json.dumps`` writes for a
broken string) is ``bad_utf8`` (it cannot be encoded, so no tokenizer takes it). A gzip stream that ends
early (a cut download) keeps every record before the cut and adds one ``truncated_file`` skip.

Formats and per-record rules: see ``formats.py``. Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import codecs
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from megatron_prefix.data.columnar import columnar_kind, folder_files, iter_columnar
from megatron_prefix.data.formats import CANONICAL_FIELDS, FORMATS, PARSERS, SKIP_REASONS, guess_format
from megatron_prefix.data.image_refs import check_images, images_of
from megatron_prefix.data.messages import refuse_media, refuse_placeholders
from megatron_prefix.data.records import PreferenceRecord, Skipped, SkipRecord

__all__ = [
    "FORMATS",
    "SKIP_REASONS",
    "detect_format",
    "expand_inputs",
    "iter_raw",
    "open_records",
    "parse_field_map",
]

PathLike = str | Path
GZIP_MAGIC = b"\x1f\x8b"
CHUNK_CHARS = 1 << 16  # sliding-buffer read size for JSON arrays
DETECT_MAX_RECORDS = 32  # detect_format looks at most this many records for the first JSON object
_WS = " \t\r\n"
_TAIL = 32  # a decode error this close to the buffer end may be a cut element: read more first
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")
_SURROGATE_JSON = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape in JSON text (pairs are fine)
_LONE_SURROGATE = "lone surrogate escape (like \\ud800): the text is not valid Unicode"
_decoder = json.JSONDecoder()


# --------------------------------------------------------------------------------------------- field map


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


# --------------------------------------------------------------------------------------------- containers


class _GzipStream(io.RawIOBase):
    """gzip members (one or several, concatenated) decompressed incrementally; a stream cut short ends
    quietly with ``truncated`` set, so everything decompressed before the cut is still read."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.truncated = False
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            if self._z.eof:
                rest = self._z.unused_data
                if not rest:
                    rest = self.raw.read(1 << 15)
                if not rest:
                    return 0
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._buf = self._z.decompress(rest, 1 << 16)
                continue
            data = self._z.unconsumed_tail or self.raw.read(1 << 15)
            if not data:
                self.truncated = True  # no end-of-stream marker: the file was cut
                return 0
            self._buf = self._z.decompress(data, 1 << 16)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_bytes(path: Path) -> IO[bytes]:
    """Open a file for binary reading, gunzipping transparently when it starts with the gzip magic."""
    raw = open(path, "rb")  # noqa: SIM115 - returned open, closed by the caller's ``with``
    magic = raw.read(2)
    raw.seek(0)
    if magic == GZIP_MAGIC:
        return io.BufferedReader(_GzipStream(raw), 1 << 16)  # type: ignore[return-value]
    return raw


def _is_array(path: Path) -> bool:
    """True when the first non-blank character of the (decompressed) file is ``[``."""
    with _open_bytes(path) as stream:
        while True:
            chunk = stream.read(4096)
            if not chunk:
                return False
            stripped = chunk.lstrip(b" \t\r\n").removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1] == b"["


def _lone_surrogate(text: str, obj: Any) -> bool:
    """True when the decoded ``obj`` holds an unpaired surrogate (checked only when ``text`` has an escape)."""
    if not _SURROGATE_JSON.search(text):
        return False
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_jsonl(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """``(line, object or SkipRecord)`` per non-blank line."""
    for line_no, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (
                line_no,
                SkipRecord("bad_utf8", f"invalid UTF-8 at byte {e.start}: {raw[e.start : e.start + 4]!r}"),
            )
            continue
        if line_no == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            yield line_no, SkipRecord("malformed_json", str(e)[:200])
            continue
        yield line_no, SkipRecord("bad_utf8", _LONE_SURROGATE) if _lone_surrogate(text, obj) else obj


def _iter_array(stream: IO[bytes], chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[int, Any]]:
    """``(element index + 1, object or SkipRecord)`` per element of one top-level JSON array.

    Bytes are decoded incrementally with ``surrogateescape``; an element whose text holds an undecodable
    byte is ``bad_utf8`` (the array goes on). A syntax error yields ``malformed_json`` and stops.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        want = max(chunk_chars, len(buf) - pos)  # geometric growth for a large element
        data = stream.read(want)
        text = decoder.decode(data, final=not data)
        eof = not data
        buf = buf[pos:] + text
        pos = 0
        return bool(text) or not eof

    def skip_ws() -> bool:
        """Advance past whitespace; False at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        yield 1, SkipRecord("malformed_json", "a JSON array file must start with '['")
        return
    pos += 1
    index = 0
    while True:
        if not skip_ws():
            yield index + 1, SkipRecord("malformed_json", "truncated JSON array (no closing ']')")
            return
        if index == 0 and buf[pos] == "]":
            return
        while True:  # decode one element, reading more text until it is complete
            try:
                obj, end = _decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                need_more = e.msg.startswith("Unterminated string") or e.pos >= len(buf) - _TAIL
                if need_more and more():
                    continue
                yield (
                    index + 1,
                    SkipRecord("malformed_json", f"{e.msg} (element {index}); rest of the array skipped"),
                )
                return
            except RecursionError:
                yield (
                    index + 1,
                    SkipRecord("malformed_json", f"nesting too deep (element {index}); rest skipped"),
                )
                return
            if end >= len(buf) and more():  # a bare number may continue in the next chunk
                continue
            break
        text = buf[pos:end]
        pos = end
        index += 1
        if _SURROGATE_ESCAPE.search(text):
            yield index, SkipRecord("bad_utf8", f"invalid UTF-8 in element {index - 1}")
        elif _lone_surrogate(text, obj):
            yield index, SkipRecord("bad_utf8", f"{_LONE_SURROGATE} (element {index - 1})")
        else:
            yield index, obj
        if not skip_ws():
            yield index + 1, SkipRecord("malformed_json", "truncated JSON array (no closing ']')")
            return
        if buf[pos] == "]":
            return
        if buf[pos] != ",":
            yield index + 1, SkipRecord("malformed_json", f"expected ',' or ']' after element {index - 1}")
            return
        pos += 1


def iter_raw(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, decoded JSON value or SkipRecord)`` for each record of one file, streaming.

    Raises ``ValueError`` naming the file when it is missing or its compression is corrupt; a gzip stream
    that ends early yields a final ``truncated_file`` skip after the records before the cut.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    kind = columnar_kind(path)
    if kind is not None:
        yield from iter_columnar(path, kind)
        return
    line = 0
    try:
        array = _is_array(path)
        with _open_bytes(path) as stream:
            for line, value in _iter_array(stream) if array else _iter_jsonl(stream):
                yield line, value
            if getattr(getattr(stream, "raw", None), "truncated", False):  # gzip cut short: the rest is good
                yield line + 1, SkipRecord("truncated_file", f"gzip stream ends early (cut file) after record {line}")
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: unreadable after record {line}: {e}") from e


# --------------------------------------------------------------------------------------------- API


def detect_format(path: PathLike, field_map: Mapping[str, str] | None = None) -> str:
    """The format of a file, from its first record that is a JSON object (looking at most 32 records).

    Rules (``formats.guess_format``): ``conversations`` -> sharegpt; ``responses`` -> ranked; ``chosen``
    and ``rejected`` with ``prompt`` -> pair; without ``prompt``, message lists -> pair, ``Human:`` /
    ``Assistant:`` transcripts -> transcript. Raises ``ValueError`` naming the file when none applies.
    """
    field_map = check_field_map(field_map)
    seen = 0
    for line, value in iter_raw(path):
        if isinstance(value, dict):
            fmt = guess_format(value, field_map)
            if fmt is None:
                raise ValueError(
                    f"{path}: cannot detect the format from record {line} (fields: {', '.join(sorted(value))}); "
                    f"pass --format (one of {', '.join(FORMATS)}) or --field-map canonical=column"
                )
            return fmt
        seen += 1
        if seen >= DETECT_MAX_RECORDS:
            break
    raise ValueError(f"{path}: cannot detect the format: no JSON object among its first {seen} records")


def open_records(
    paths: Sequence[PathLike],
    fmt: str = "auto",
    field_map: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[PreferenceRecord | Skipped]:
    """Stream the records of ``paths`` in order: a ``PreferenceRecord`` or a ``Skipped`` per record.

    ``fmt`` is one of ``FORMATS`` or ``"auto"`` (detected per file, one ``log`` line per file saying which).
    ``field_map`` maps canonical field names to the file's columns. Files are checked eagerly (existence,
    format), so an unusable file raises ``ValueError`` naming it before anything is yielded.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    field_map = check_field_map(field_map)
    plan: list[tuple[Path, str]] = []
    for p in expand_inputs(paths):
        chosen = fmt
        if fmt == "auto":
            chosen = detect_format(p, field_map)
            log(f"{p}: format '{chosen}' (auto-detected)")
        plan.append((p, chosen))
    return _stream(plan, field_map)


def expand_inputs(paths: Sequence[PathLike]) -> list[Path]:
    """The data files of ``paths`` in reading order: a file as is, a folder as its Parquet/Arrow files
    (``columnar.folder_files``). Raises ``ValueError`` naming a missing path or an unusable folder."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(folder_files(p))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return files


def _stream(plan: list[tuple[Path, str]], field_map: dict[str, str]) -> Iterator[PreferenceRecord | Skipped]:
    for path, fmt in plan:
        parse = PARSERS[fmt]
        source = str(path)
        base_dir = path.parent
        for line, value in iter_raw(path):
            try:
                if isinstance(value, SkipRecord):
                    raise value
                if not isinstance(value, dict):
                    raise SkipRecord("bad_type", f"record is a {type(value).__name__}, expected an object")
                refuse_media(value)
                rec = parse(value, field_map)
                refuse_placeholders(rec)
                images = images_of(value, field_map, base_dir)
                rec = PreferenceRecord(rec.prompt, rec.responses, rec.scores, source, line, images)
                check_images(rec)
            except SkipRecord as e:
                yield Skipped(source, line, e.reason, e.detail)
                continue
            except RecursionError:
                yield Skipped(source, line, "malformed_json", "nesting too deep")
                continue
            yield rec
