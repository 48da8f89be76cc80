"""Test hook for the fault-injection suite (``tests/test_faults.py``): die or get signalled at named points.

``MEGATRON_PREFIX_FAULT=<action>_in_<where>:<n>`` with ``action`` ``kill`` (SIGKILL: the whole process
group when this process leads it, as a scheduler kills a job, so megatron's helper processes go too) or
``term`` (SIGTERM to this process: a preemption notice), fired when ``fault_point(where, n)`` is reached.
Points: ``save:STEP`` (checkpoint shards written, nothing renamed), ``metrics_rewrite:STEP`` (the trimmed
metrics file written, not yet renamed), ``precompute:CHUNK`` (reference chunk CHUNK computed, not yet
saved), ``build:0`` (dataset built in its temporary folder, not yet renamed), ``setup:0`` (a training run's
dataset and checkpoints opened, before the model is built). Action ``error``: raise a ``ValueError`` (as a
data error would). ``MEGATRON_PREFIX_FAULT_RANK=R``: fire on global rank ``R`` only (``RANK``). Unset: no
effect.

Pure Python: no torch, no megatron.
"""

from __future__ import annotations

import os
import signal

ENV = "MEGATRON_PREFIX_FAULT"


def fault_point(where: str, n: int) -> None:
    """Fire the fault ``MEGATRON_PREFIX_FAULT`` asks for at point ``where`` number ``n``, if any."""
    fault = os.environ.get(ENV, "")
    if not fault:
        return
    only = os.environ.get(ENV + "_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    if fault == f"error_in_{where}:{n}":
        on = "" if only is None else f" on rank {only}"
        raise ValueError(f"injected fault at {where}:{n}{on} ({ENV})")
    if fault == f"kill_in_{where}:{n}":
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"term_in_{where}:{n}":
        os.kill(os.getpid(), signal.SIGTERM)
