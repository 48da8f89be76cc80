"""File digests, one implementation for datasets (input files), checkpoints (manifests) and conversion.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, block_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks (memory stays flat for multi-GB shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(block_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
