"""Safe loading of torch distributed-checkpoint ``.metadata`` files (a pickle that plain loading executes).

torch's ``FileSystemReader.read_metadata`` calls ``pickle.load`` on ``<checkpoint>/.metadata``; megatron's
``dist_checkpointing.load`` (through ``CachedMetadataFileSystemReader``, a subclass) and our HF exporter go
through it. A crafted ``.metadata`` would run code on load. ``install_safe_metadata_reader()`` replaces
that method (pinned: ``torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata``) with one
that unpickles through ``SafeMetadataUnpickler``: it admits only the classes a real megatron dist
checkpoint's metadata holds (the ``torch.distributed.checkpoint`` metadata / planner dataclasses, torch
``Size`` and dtypes, plain containers) and refuses anything else with ``UnsafeMetadataError`` naming the
file and the class. Idempotent; applied on GPU hosts too (it is a safety fix, not a CPU accommodation).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from megatron_prefix.compat.pins import require

# modules whose *classes defined there* may appear in a metadata pickle
_CLASS_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_EXTRA = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a layout (torch.strided): a lookup
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "range"), ("builtins", "bytearray"),
}


class UnsafeMetadataError(ValueError):
    """A checkpoint metadata pickle names a class outside the allowed set (or is not a pickle)."""


class SafeMetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP metadata: ``find_class`` admits only the allowed classes; ``source`` names the file."""

    def __init__(self, fh: Any, source: str):
        super().__init__(fh)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _EXTRA:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _CLASS_MODULES and "." not in name:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        raise UnsafeMetadataError(
            f"{self.source}: refusing to load checkpoint metadata: it names {module}.{name}, which is not a "
            "checkpoint metadata class (a crafted or foreign file: loading it could run code). Use a "
            "checkpoint written by this project, or restore the file from a trusted copy"
        )


def load_metadata(path: str | Path, data: bytes | None = None) -> Any:
    """Unpickle the DCP metadata file ``path`` safely (``data``: its bytes, when already read)."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    try:
        obj = SafeMetadataUnpickler(io.BytesIO(data), str(path)).load()
    except UnsafeMetadataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise UnsafeMetadataError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err}); "
                                  "the file is truncated or corrupt") from err
    metadata_cls = require("torch.distributed.checkpoint.metadata", "Metadata", "safe .metadata unpickling")
    if not isinstance(obj, metadata_cls):
        raise UnsafeMetadataError(f"{path}: not checkpoint metadata (holds a {type(obj).__name__})")
    return obj


_STATE = {"installed": False}


def install_safe_metadata_reader() -> None:
    """Make every ``FileSystemReader.read_metadata`` (torch, megatron's subclass, our exporter) safe."""
    if _STATE["installed"]:
        return
    why = "safe .metadata unpickling"
    reader_cls = require("torch.distributed.checkpoint.filesystem", "FileSystemReader", why)
    require("torch.distributed.checkpoint.filesystem", "FileSystemReader.read_metadata", why)
    require("torch.distributed.checkpoint.filesystem", "FileSystemReader._get_metadata_path", why)
    storage_meta = require("torch.distributed.checkpoint.metadata", "StorageMeta", why)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = load_metadata(path, fh.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = storage_meta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    read_metadata.__doc__ = "Safe replacement (megatron_prefix.compat.safe_metadata) of the pickle.load path."
    reader_cls.read_metadata = read_metadata
    _STATE["installed"] = True
