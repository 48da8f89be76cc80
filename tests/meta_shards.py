"""Build one (TP, PP) rank's real megatron model shard on the ``meta`` device, in one process.

No weights are allocated and no other process exists: megatron's parallel state is initialised for a world
of 1 (``init_parallel``, gloo), then, for the duration of the build only, the getters megatron-core
0.16.1 reads while constructing a ``GPTModel`` answer as rank ``(tp_rank, pp_stage)`` of a ``tp x pp``
layout would (``unittest.mock.patch.object``, undone on exit):

- ``parallel_state.get_tensor_model_parallel_world_size`` / ``_rank`` and
  ``get_pipeline_model_parallel_world_size`` / ``_rank`` (layer offsets, stage flags);
- ``get_tensor_model_parallel_group`` / ``get_pipeline_model_parallel_group``: a ``FakeGroup`` whose
  ``size()`` / ``rank()`` are those of the simulated rank (``ProcessGroupCollection.use_mpu_process_groups``
  hands them to ``ColumnParallelLinear``, ``RowParallelLinear`` and ``VocabParallelEmbedding``, which
  size their shards with them). Nothing communicates during construction, so no collective is faked.

Test-only simulation; the model itself is ``megatron_prefix.model.spec.build_model`` unchanged.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from megatron.core import parallel_state as ps

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.spec import build_model


class FakeGroup:
    """A process group as far as shard sizing asks: ``size()`` and ``rank()``."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@contextlib.contextmanager
def simulated_rank(tp: int, pp: int, tp_rank: int, pp_stage: int):
    """megatron's parallel-state getters answer as rank (tp_rank, pp_stage) of tp x pp (needs init_parallel)."""
    patches = {
        "get_tensor_model_parallel_world_size": lambda *a, **k: tp,
        "get_tensor_model_parallel_rank": lambda *a, **k: tp_rank,
        "get_pipeline_model_parallel_world_size": lambda *a, **k: pp,
        "get_pipeline_model_parallel_rank": lambda *a, **k: pp_stage,
        "get_tensor_model_parallel_group": lambda *a, **k: FakeGroup(tp, tp_rank),
        "get_pipeline_model_parallel_group": lambda *a, **k: FakeGroup(pp, pp_stage),
    }
    with contextlib.ExitStack() as stack:
        for name, fn in patches.items():
            assert hasattr(ps, name), f"megatron.core.parallel_state.{name} is gone: update tests/meta_shards.py"
            stack.enter_context(mock.patch.object(ps, name, fn))
        yield


def meta_shard(m: ModelConfig, tp: int, pp: int, tp_rank: int, pp_stage: int) -> torch.nn.Module:
    """The real ``SharedPrefixGPTModel`` of that rank, every parameter on ``meta`` (bf16, local spec)."""
    with simulated_rank(tp, pp, tp_rank, pp_stage), torch.device("meta"):
        tc = m.to_transformer_config(tp=tp, pp=pp, dtype="bfloat16", use_cpu_initialization=True,
                                     perform_initialization=False)
        return build_model(m, transformer_config=tc, impl="local")
