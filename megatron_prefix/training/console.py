"""The run directory's ``console.log``: everything a process prints, also appended to a file.

Rank 0 tees from the start (config, progress, errors); the last pipeline stage, which prints the training
lines, tees as well when it is another rank. Appended across restarts, line-buffered, so a kill loses at
most one line.
"""

from __future__ import annotations

import sys
from pathlib import Path


class _Tee:
    """A text stream that also appends to a file."""

    def __init__(self, stream, fh):
        self.stream, self.fh = stream, fh

    def write(self, text: str) -> int:
        self.fh.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.fh.flush()
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def tee_console(run_dir: str | Path) -> None:
    """Copy everything this process prints (stdout and stderr) into ``<run_dir>/console.log`` (once)."""
    if isinstance(sys.stdout, _Tee):
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fh = open(Path(run_dir) / "console.log", "a", buffering=1)  # noqa: SIM115 (open for the process)
    sys.stdout, sys.stderr = _Tee(sys.stdout, fh), _Tee(sys.stderr, fh)
