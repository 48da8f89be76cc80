"""Preemption: SIGTERM / SIGUSR1 (SLURM's notice) set a flag that all ranks agree on at safe points.

The training loop checks it after every step (save, exit ``EXIT_PREEMPTED``); the reference precompute
after every saved chunk (``PreemptedExit``: progress kept, exit ``EXIT_PREEMPTED``).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptedExit(Exception):
    """A signal arrived before training started (during the reference precompute); progress is saved."""


class _Preempted:
    """Set by SIGTERM / SIGUSR1; checked (and agreed on by all ranks) after every step."""

    flag = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.flag = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
