"""Checkpoint manifests and verification: what makes a checkpoint directory usable before it is loaded.

``write_manifest`` records the size and sha256 of every file of a checkpoint (``manifest.json``, written
inside the atomic save, before ``latest`` moves); ``verify`` checks them, ``train_state.json`` and
``.metadata`` (through the safe unpickler) and raises ``CheckpointError`` naming the bad file;
``read_latest`` reads the ``latest`` marker, naming it when it is garbled or names a missing folder.
Hashing is shared round-robin over the ranks; every function here is collective when torch.distributed is
initialized (all ranks get the same answer). See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_prefix.compat.safe_metadata import load_metadata
from megatron_prefix.digests import sha256_file

LATEST = "latest"
STATE_FILE = "train_state.json"
MANIFEST = "manifest.json"
METADATA = ".metadata"
_ITER = re.compile(r"^iter_\d{7}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, foreign); the message names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(obj: Any) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def read_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``<run_dir>/latest`` names; None without ``latest``.

    Raises ``CheckpointError`` naming ``latest`` when it is garbled or names a folder that is gone.
    """
    marker = Path(run_dir) / LATEST
    if not marker.is_file():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{marker}: unreadable ({err})") from err
    if not _ITER.match(name):
        raise CheckpointError(f"{marker}: does not name a checkpoint directory (holds {name[:60]!r})")
    path = Path(run_dir) / name
    if not (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        what = "is missing" if not path.exists() else f"holds neither {STATE_FILE} nor {MANIFEST}"
        raise CheckpointError(f"{marker}: names {name} but {path} {what}")
    return path


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digests(path: Path, names: list[str]) -> dict[str, str]:
    """sha256 of ``names`` under ``path``, shared round-robin over the ranks (collective)."""
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = {}
    for name in names[rank::world]:
        try:
            mine[name] = sha256_file(path / name)
        except OSError as err:
            mine[name] = f"unreadable: {err}"
    out: dict[str, str] = {}
    for part in _gather(mine):
        out.update(part)
    return out


def write_manifest(path: Path) -> None:
    """Write ``manifest.json`` (size + sha256 of every other file) into checkpoint ``path`` (collective)."""
    names = _broadcast(_files(path) if _rank() == 0 else None)
    digests = _digests(path, names)
    if _rank() == 0:
        files = {n: {"size": (path / n).stat().st_size, "sha256": digests[n]} for n in names}
        tmp = path / (MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / MANIFEST)


def _check_manifest(path: Path) -> tuple[list[str], str | None]:
    """(names to hash, problem) from the manifest alone (sizes, presence); rank-local, cheap."""
    mpath = path / MANIFEST
    try:
        files = json.loads(mpath.read_text())["files"]
        if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [], f"{mpath}: unreadable manifest ({type(err).__name__}: {err}); the checkpoint cannot be verified"
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return [], f"{f}: missing (listed in {mpath})"
        size = f.stat().st_size
        if size != entry.get("size"):
            return [], f"{f}: {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
    return sorted(files), None


def verify(path: str | Path) -> str | None:
    """Check checkpoint ``path`` before loading (collective); returns a note, raises ``CheckpointError``.

    With ``manifest.json``: every listed file present, same size and sha256. Without (a checkpoint
    written before manifests existed): a note says it is not verified. Either way ``train_state.json``
    must parse and ``.metadata`` must pass the safe unpickler.
    """
    path = Path(path)
    note = None
    problem = None
    if not path.is_dir():
        problem = f"{path}: checkpoint directory is missing"
    elif (path / MANIFEST).is_file():
        names, problem = _check_manifest(path)
        names = _broadcast(names)
        problem = _broadcast(problem)
        if problem is None:
            expected = json.loads((path / MANIFEST).read_text())["files"]
            got = _digests(path, names)
            bad = [n for n in names if got.get(n) != expected[n].get("sha256")]
            if bad:
                problem = (f"{path / bad[0]}: checksum differs from {path / MANIFEST} (corrupt)"
                           + (f"; also {len(bad) - 1} more file(s)" if len(bad) > 1 else ""))
    else:
        note = f"note: {path} has no {MANIFEST} (written by an older version): its files are not verified"
    if problem is None:
        problem = _broadcast(_readable(path) if _rank() == 0 else None)
    if problem:
        raise CheckpointError(problem)
    return note


def _readable(path: Path) -> str | None:
    """The first problem reading ``train_state.json`` or ``.metadata`` (rank 0), None when fine."""
    try:
        json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{path / STATE_FILE}: missing"
    except (ValueError, UnicodeDecodeError) as err:
        return f"{path / STATE_FILE}: not valid JSON ({err})"
    if not (path / METADATA).is_file():
        return f"{path / METADATA}: missing (torch distributed-checkpoint metadata)"
    try:
        load_metadata(path / METADATA)
    except ValueError as err:
        return str(err)
    return None


