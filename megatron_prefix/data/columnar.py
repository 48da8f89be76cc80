"""Parquet and Arrow inputs, as Hugging Face ``datasets`` writes them, streamed in constant memory.

Accepted inputs (each read unchanged, row by row, in order):

- a Parquet file (``Dataset.to_parquet``, or one shard such as ``data/train-00000-of-00002.parquet``),
  recognised by its ``PAR1`` magic; read one row group at a time (in slices of ``BATCH_ROWS`` rows);
- an Arrow IPC file: the *stream* format ``save_to_disk`` writes (``data-00000-of-00001.arrow``) or the
  random-access *file* format (``ARROW1`` magic); read one record batch at a time;
- a folder: a ``save_to_disk`` folder (``state.json`` lists its ``.arrow`` files, in order; without it,
  its ``*.arrow`` files sorted by name), or a folder holding ``*.parquet`` files at any depth (a
  downloaded dataset), read sorted by relative path. A ``DatasetDict`` folder (``dataset_dict.json``)
  is refused with the split folders to choose from, and so is a folder holding several splits' shards
  (``train-*`` and ``test-*``): name the split's files instead.

A row is a ``dict`` of Python values (structs become dicts, lists lists); its ``line`` is its 1-based row
number within its file. A corrupt file raises ``ValueError`` naming it and the row reached.

Needs ``pyarrow`` (a dependency of the project). Pure Python + pyarrow: no torch, no megatron.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the continuation marker every IPC stream message starts with
BATCH_ROWS = 256
_SPLIT_RE = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}\.(parquet|arrow)$")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(8)


def columnar_kind(path: Path) -> str | None:
    """``"parquet"``, ``"arrow_stream"``, ``"arrow_file"`` for a columnar file, ``"folder"``, or None."""
    if path.is_dir():
        return "folder"
    head = _magic(path)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ARROW_FILE_MAGIC):
        return "arrow_file"
    if head.startswith(ARROW_STREAM_MAGIC):
        return "arrow_stream"
    return None


def folder_files(folder: Path) -> list[Path]:
    """The data files of a ``save_to_disk`` or parquet folder, in reading order; ``ValueError`` otherwise."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ValueError(
            f"{folder}: a DatasetDict folder (dataset_dict.json); pass one split's folder with --input, "
            f"one of: {', '.join(str(folder / s) for s in splits)}"
        )
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{state}: not a datasets state.json ({err})") from err
        return [folder / n for n in names]
    files = sorted(folder.glob("*.arrow")) or sorted(folder.rglob("*.parquet"))
    if not files:
        raise ValueError(
            f"{folder}: a folder, but it holds no .arrow files (save_to_disk) nor .parquet files"
        )
    splits = {m["split"] for f in files if (m := _SPLIT_RE.match(f.name))}
    if len(splits) > 1:
        raise ValueError(
            f"{folder}: holds shards of several splits ({', '.join(sorted(splits))}); pass one split's "
            f"files with --input (e.g. {folder}/**/{min(splits)}-*.parquet)"
        )
    return files


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency
        raise ValueError("reading Parquet/Arrow needs pyarrow: pip install pyarrow") from err
    return pyarrow


def _batches(path: Path, kind: str) -> Iterator[Any]:
    pa = _pyarrow()
    if kind == "parquet":
        with pa.parquet.ParquetFile(path) as pf:
            yield from pf.iter_batches(batch_size=BATCH_ROWS)
        return
    with pa.memory_map(str(path), "r") as source:
        if kind == "arrow_file":
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from pa.ipc.open_stream(source)


def iter_columnar(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    """``(row number, row dict)`` for each row of one Parquet/Arrow file, one batch in memory at a time."""
    pa = _pyarrow()
    row = 0
    try:
        for batch in _batches(path, kind):
            for start in range(0, batch.num_rows, BATCH_ROWS):
                for obj in batch.slice(start, BATCH_ROWS).to_pylist():
                    row += 1
                    yield row, obj
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: unreadable {kind.replace('_', ' ')} file after row {row}: {err}") from err
