"""The process group a conversion runs in: gloo on CPU, whatever the machine has.

Conversion moves tensors from files to files, so it never needs a GPU: ``conversion_world`` initialises
``torch.distributed`` with gloo (under ``torchrun`` from the environment, else a world of one on a
private ``FileStore``) unless a group already exists, then megatron's model-parallel groups through
``megatron_prefix.parallel.init_parallel`` (which also applies the CPU compat layer).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist


def world_layout(tp: int | None, pp: int | None, world: int) -> tuple[int, int]:
    """(tp, pp) with ``tp * pp == world``; a missing one is derived (both missing: ``tp = world``)."""
    for name, value in (("--tp", tp), ("--pp", pp)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if tp is None and pp is None:
        tp, pp = world, 1
    elif tp is None:
        if world % pp:
            raise ValueError(f"--pp: {pp} does not divide the world size {world}")
        tp = world // pp
    elif pp is None:
        if world % tp:
            raise ValueError(f"--tp: {tp} does not divide the world size {world}")
        pp = world // tp
    if tp * pp != world:
        raise ValueError(f"--tp/--pp: tp*pp = {tp}*{pp} must equal the number of processes ({world}); "
                         f"launch with torchrun --nproc-per-node={tp * pp}")
    return tp, pp


@contextlib.contextmanager
def gloo_world(timeout_minutes: int = 60) -> Iterator[None]:
    """A gloo default process group for the block (reused, and left alone, if one already exists)."""
    if dist.is_initialized():
        yield
        return
    store_path = None
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend="gloo", timeout=timeout)
    else:
        fd, store_path = tempfile.mkstemp(prefix="megatron_prefix_convert_")
        os.close(fd)
        os.unlink(store_path)
        store = dist.FileStore(store_path, 1)
        dist.init_process_group(backend="gloo", store=store, rank=0, world_size=1, timeout=timeout)
    try:
        yield
    finally:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
        if store_path and os.path.exists(store_path):
            os.unlink(store_path)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
