"""A lock file that names its holder: one writer per checkpoint directory or dataset output folder.

``DirLock(path, what).acquire()`` creates ``path`` exclusively (``O_CREAT | O_EXCL``, atomic on local
file systems and NFSv3+) and writes the holder's host, pid and start time into it. A second process gets
``LockHeld`` naming the holder. A lock left by a process that died (same host, pid no longer running) is
taken over with a note (``acquire`` returns it); a lock held on another host is never taken over (we cannot
tell whether its process lives): remove the file by hand when that job is gone. ``release()`` removes the
file when this process still holds it; it also runs at interpreter exit.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time
from pathlib import Path


class LockHeld(ValueError):
    """Another live process holds the lock (a user-facing error: the message names host and pid)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    """An exclusive lock file at ``path``; ``what`` says what it protects (for messages)."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False

    def _me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self._me()) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def holder(self) -> dict | None:
        """The recorded holder (``host``, ``pid``, ``since``), ``{}`` when unreadable, None when free."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            return info if isinstance(info, dict) else {}
        except json.JSONDecodeError:
            return {}  # being written this instant, or garbage

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, raises ``LockHeld`` when busy."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            if self._try_create():
                self.held = True
                atexit.register(self.release)
                return note
            info = self.holder()
            if info is None:
                continue  # released between our two looks
            host, pid = info.get("host"), info.get("pid")
            if not info:  # half-written by a racing process: give it a moment
                time.sleep(0.2)
                info = self.holder() or {}
                host, pid = info.get("host"), info.get("pid")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                note = (f"{self.what}: took over the stale lock {self.path} of process {pid} on {host} "
                        f"(since {info.get('since', '?')}), which is no longer running")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            raise LockHeld(
                f"{self.what}: {self.path} is locked by process {pid} on host {host} (since "
                f"{info.get('since', '?')}); another job is using it. Wait for it to finish or use another "
                f"directory; if that job is gone (e.g. on another machine), delete {self.path}"
            )
        raise LockHeld(f"{self.what}: could not take the lock {self.path} (it keeps changing hands); retry")

    def release(self) -> None:
        """Remove the lock file if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        info = self.holder()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
