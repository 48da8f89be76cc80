"""Compatibility layer for megatron-core 0.16.1: CPU/gloo accommodations and the torch-AdamW fallback fix.

``apply_cpu_compat()`` is what callers use (``megatron_prefix.parallel.init_parallel`` calls it). With CUDA
present it only applies the AdamW-fallback fix (a bug fix that also concerns GPU users without apex/TE)
and leaves megatron's GPU path stock. Without CUDA it also applies the CPU accommodations of
``compat.cpu``. Every change is pinned to a named megatron symbol: a missing symbol raises
``CompatError`` at start-up. See docs/compat.md for the list.
"""

from __future__ import annotations

import torch

from megatron_prefix.compat.adamw import fix_adamw_fallback
from megatron_prefix.compat.pins import CompatError, megatron_version, require

__all__ = ["CompatError", "apply_cpu_compat", "cpu_compat_active", "fix_adamw_fallback", "megatron_version", "require"]

_STATE = {"cpu": False, "adamw": False}


def apply_cpu_compat(force_cpu: bool = False) -> bool:
    """Make megatron-core 0.16 run on this host; returns True when the CPU accommodations are active.

    Idempotent. On a CUDA host (and ``force_cpu`` False) only ``fix_adamw_fallback()`` is applied.
    ``force_cpu`` applies the CPU accommodations even when CUDA is present (tests only).
    """
    if not _STATE["adamw"]:
        fix_adamw_fallback()
        _STATE["adamw"] = True
    if force_cpu or not torch.cuda.is_available():
        from megatron_prefix.compat.cpu import apply_cpu_accommodations

        apply_cpu_accommodations()
        _STATE["cpu"] = True
    return _STATE["cpu"]


def cpu_compat_active() -> bool:
    """True once ``apply_cpu_compat`` installed the CPU accommodations in this process."""
    return _STATE["cpu"]
