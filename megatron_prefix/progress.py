"""Progress with an ETA for the long loops (reference precompute, evaluation, training).

On a terminal: a tqdm bar. Otherwise (a log file, SLURM, ``tee``): one plain line every ``every_s``
seconds and one at the end, so a log still shows how far a run is and how long is left. Only the rank
that prints (rank 0) passes ``enabled=True``; elsewhere every call is a no-op. Imports neither torch nor
megatron.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``; ``?`` for an unknown (negative or non-finite) time."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(done: float, total: float, elapsed: float) -> float:
    """Seconds left at the mean rate so far (``-1`` before anything is done)."""
    if done <= 0 or elapsed <= 0:
        return -1.0
    return max(total - done, 0) * elapsed / done


class Progress:
    """``total`` items of ``unit``, labelled ``desc``; ``update(n)`` after each batch, ``close()`` at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, every_s: float = 10.0,
                 log: Callable[[str], None] | None = None, tty: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled and total > 0
        self.every_s = every_s
        self.log = log or (lambda msg: print(msg, flush=True))
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start
        self._bar = None
        if self.enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, leave=False)

    def update(self, n: int) -> None:
        """``n`` more items are done."""
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: 120/500 unit (24%) | elapsed 0:31 | eta 1:38``."""
        elapsed = (now or time.perf_counter()) - self.start
        pct = 100.0 * self.done / self.total
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) | elapsed "
                f"{format_duration(elapsed)} | eta {format_duration(eta_seconds(self.done, self.total, elapsed))}")

    def close(self) -> None:
        """Close the bar; print one final line (also on a terminal: the bar is not left behind)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self.log(self.line())
        self.enabled = False
