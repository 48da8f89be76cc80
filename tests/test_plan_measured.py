"""On CPU, a tiny model's measured activation high-water mark is within 15% of the planner's figure.

Measured: every tensor autograd saves for backward is tracked by storage (``saved_tensors_hooks``; a
storage counts once however many views of it are saved, and stops counting when autograd releases its
last reference), through the forward, the log-probs and the backward of one packed row; parameters are
excluded. With full recomputation the recomputed layer's tensors are saved during backward, so the high
-water mark includes them. Planner: ``planning.memory.stage_activations`` for the same model, row length,
fp32 and megatron's ``local`` spec with the ``dense`` backend (pp = tp = 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.planning.memory import ActivationArch, Layout, stage_activations

TOLERANCE = 0.15
SEQ = 512
MODEL = ModelConfig(hidden_size=64, ffn_hidden_size=192, num_layers=3, num_attention_heads=4, num_query_groups=2,
                    vocab_size=512)
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


class SavedTracker:
    """Bytes of distinct storages autograd holds for backward, now and at the peak."""

    def __init__(self, skip: set[int]) -> None:
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0
        self.skip = skip

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] = self.refs.get(key, 0) + 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, _Held) else h

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.sizes[key]


class _Held:
    def __init__(self, tracker: SavedTracker, key: int, tensor: torch.Tensor) -> None:
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self) -> None:
        self.tracker.release(self.key)


@pytest.fixture(scope="module")
def micro_batch():
    from megatron_prefix.data.row import pack_row
    from megatron_prefix.data.unit import Unit
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.parallel import destroy_parallel, init_parallel

    init_parallel(1, 1, 1)
    rng = np.random.default_rng(0)
    units = [Unit(rng.integers(1, 500, 100), [rng.integers(1, 500, 60) for _ in range(2)], np.array([1.0, 0.0]),
                  unit_id=i) for i in range(2)]
    yield MicroBatch.from_rows([pack_row(units, SEQ, 0)])
    destroy_parallel()


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
def test_measured_activation_peak_within_15_percent(micro_batch, recompute):
    from megatron_prefix.model.logprobs import response_logprobs
    from megatron_prefix.model.spec import build_model

    torch.manual_seed(0)
    model = build_model(MODEL, "dense", impl="local", **RECOMPUTE[recompute])
    tracker = SavedTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        logits_sbv = micro_batch.forward(model)
        logps = response_logprobs(logits_sbv, micro_batch.index).logps
        logps.sum().backward()
    assert tracker.now == 0  # everything saved was released
    arch = ActivationArch.from_model(MODEL, "dense", impl="local")
    planned = sum(stage_activations(MODEL, arch, Layout(recompute=recompute), SEQ, 4, in_flight=1, first=True,
                                    last=True).values())
    print(f"{recompute}: measured {tracker.peak} planned {planned:.0f} ratio {tracker.peak / planned:.3f}")
    assert abs(tracker.peak / planned - 1) <= TOLERANCE, (tracker.peak, planned)
