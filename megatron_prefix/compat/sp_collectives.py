"""Sequence-parallel collectives on gloo (CPU accommodation, applied only without CUDA).

Sequence parallelism gathers the sequence before the column-parallel linears and reduce-scatters it after
the row-parallel ones, through megatron's module globals ``dist_all_gather_func`` /
``dist_reduce_scatter_func`` (``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor``,
or the older ``_all_gather_base`` / ``_reduce_scatter_base``) in ``tensor_parallel.mappings`` and
``tensor_parallel.layers``. gloo implements the tensor forms only in recent PyTorch (2.13's does); on a
build without them the call raises. The wrappers installed here call the native collective and, when gloo
refuses it as unsupported, switch for the rest of the process to an equivalent built from collectives
gloo always had: ``all_gather`` into views of the output, and ``all_reduce`` + this rank's slice
(``async_op`` is kept: the returned handle finishes the copy in ``wait()``). ``FORCE_FALLBACK`` makes
the fallback the only path (tests compare it with the native one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_prefix.compat.pins import require, require_module

MARK = "__megatron_prefix_sp_collectives__"
MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers")
WHY = "sequence-parallel all-gather / reduce-scatter on gloo"

FORCE_FALLBACK = False
FALLBACK_CALLS = {"all_gather": 0, "reduce_scatter": 0}
_NATIVE_OK: dict[str, bool | None] = {"all_gather": None, "reduce_scatter": None}


class _FinishOnWait:
    """A work handle whose ``wait()`` waits for the collective, then runs ``finish`` once."""

    def __init__(self, work: Any, finish: Callable[[], None]):
        self._work, self._finish = work, finish

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        if self._work is not None:
            self._work.wait(*args, **kwargs)
            self._work = None
            self._finish()
        return True

    def is_completed(self) -> bool:
        return self._work is None


def all_gather_fallback(output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False):
    """``all_gather_into_tensor`` (dim 0) from ``all_gather`` writing into views of ``output``."""
    FALLBACK_CALLS["all_gather"] += 1
    world = dist.get_world_size(group)
    assert output.is_contiguous() and output.shape[0] == world * input_.shape[0], "all-gather shapes"
    return dist.all_gather(list(output.chunk(world, dim=0)), input_.contiguous(), group=group, async_op=async_op)


def reduce_scatter_fallback(output: torch.Tensor, input_: torch.Tensor, group: Any = None,
                            async_op: bool = False, op: Any = dist.ReduceOp.SUM):
    """``reduce_scatter_tensor`` (dim 0) from ``all_reduce`` of a copy, then this rank's slice."""
    FALLBACK_CALLS["reduce_scatter"] += 1
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    assert input_.shape[0] == world * output.shape[0], "reduce-scatter shapes"
    buf = input_.contiguous().clone()
    work = dist.all_reduce(buf, op=op, group=group, async_op=async_op)

    def finish() -> None:
        output.copy_(buf.chunk(world, dim=0)[rank])

    if not async_op:
        finish()
        return None
    return _FinishOnWait(work, finish)


def _unsupported(err: Exception) -> bool:
    msg = str(err).lower()
    return "not supported" in msg or "not implemented" in msg or "unsupported" in msg or "gloo" in msg


def _wrap(kind: str, native: Callable, fallback: Callable) -> Callable:
    @functools.wraps(native)
    def collective(output: torch.Tensor, input_: torch.Tensor, group: Any = None, async_op: bool = False,
                   **kwargs: Any):
        if FORCE_FALLBACK or _NATIVE_OK[kind] is False:
            return fallback(output, input_, group=group, async_op=async_op, **kwargs)
        try:
            result = native(output, input_, group=group, async_op=async_op, **kwargs)
        except (RuntimeError, NotImplementedError) as err:
            if _NATIVE_OK[kind] or not _unsupported(err):
                raise
            _NATIVE_OK[kind] = False
            return fallback(output, input_, group=group, async_op=async_op, **kwargs)
        _NATIVE_OK[kind] = True
        return result

    setattr(collective, MARK, True)
    return collective


def patch_sp_collectives() -> None:
    """Wrap ``dist_all_gather_func`` / ``dist_reduce_scatter_func`` of ``MODULES`` (pinned; idempotent)."""
    for module_name in MODULES:
        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            require(module_name, name, WHY)
    for module_name in MODULES:
        module = require_module(module_name, WHY)
        if not getattr(module.dist_all_gather_func, MARK, False):
            module.dist_all_gather_func = _wrap("all_gather", module.dist_all_gather_func, all_gather_fallback)
        if not getattr(module.dist_reduce_scatter_func, MARK, False):
            module.dist_reduce_scatter_func = _wrap(
                "reduce_scatter", module.dist_reduce_scatter_func, reduce_scatter_fallback
            )
