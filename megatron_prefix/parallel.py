"""Process-group initialisation: torch.distributed + megatron model parallelism + seeding.

``init_parallel(tp, pp, cp, seed)`` works the same under ``torchrun`` (reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and in a plain process (a world of 1 on a private
``FileStore``). The backend is nccl with CUDA and gloo without; on CPU ``compat.apply_cpu_compat()`` is
applied before megatron is touched. Seeding covers python, numpy, torch and megatron's model-parallel RNG
tracker (``model_parallel_cuda_manual_seed``), so a run is deterministic for a given (seed, layout).
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_prefix.compat import apply_cpu_compat

_OWNED: dict = {"store_file": None, "we_initialised_dist": False}


@dataclass(frozen=True)
class ParallelInfo:
    """Where this rank sits: global rank/world, tp/pp/cp/dp ranks and sizes, and its device."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _validate_sizes(world_size: int, tp: int, pp: int, cp: int) -> None:
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"parallel.tp/pp/cp: world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: env:// rendezvous
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    fd, path = tempfile.mkstemp(prefix="megatron_prefix_store_")
    os.close(fd)
    os.unlink(path)  # FileStore wants a fresh path (a stale file would hold old keys)
    _OWNED["store_file"] = path
    store = dist.FileStore(path, 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (all devices) and megatron's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, timeout_minutes: int = 30) -> ParallelInfo:
    """Initialise torch.distributed and megatron's tp/pp/cp/dp groups, seed everything; return this rank's place.

    Raises ``ValueError`` naming ``parallel.tp/pp/cp`` when the world size is not divisible by tp*pp*cp.
    Calling it again after ``destroy_parallel()`` is allowed.
    """
    from megatron.core import parallel_state as ps

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _validate_sizes(world_size, tp, pp, cp)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    apply_cpu_compat()  # the AdamW-fallback fix everywhere; CPU accommodations only without CUDA
    if not dist.is_initialized():
        _init_process_group("nccl" if cuda else "gloo", timeout_minutes)
        _OWNED["we_initialised_dist"] = True
    _validate_sizes(dist.get_world_size(), tp, pp, cp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    """This rank's ``ParallelInfo`` (after ``init_parallel``)."""
    from megatron.core import parallel_state as ps

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=device,
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and (if ``init_parallel`` created it) the default process group."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and _OWNED["we_initialised_dist"]:
        dist.destroy_process_group()
        _OWNED["we_initialised_dist"] = False
    path = _OWNED["store_file"]
    if path:
        _OWNED["store_file"] = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
