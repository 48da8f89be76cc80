"""The planner's per-rank parameter counts equal the real megatron shards built on the ``meta`` device.

Qwen2.5-72B, Llama-3.1-70B and Llama-3.1-8B (``configs/hf_shapes/*.json``, shapes only), at TP 8 x PP 4
and two other layouts; every pipeline stage (the first holds the embedding, the last the final norm and
the output layer), first and last TP rank. See ``tests/meta_shards.py`` for how one rank is simulated.
"""

from __future__ import annotations

import pytest

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.parallel import destroy_parallel, init_parallel
from megatron_prefix.planning.params import format_count, stage_params, total_params
from tests.conftest import ROOT
from tests.meta_shards import meta_shard

SHAPES = {"qwen2.5-72b": "72.7B", "llama3.1-70b": "70.6B", "llama3.1-8b": "8.0B"}
LAYOUTS = [(8, 4), (4, 2), (2, 8)]


@pytest.fixture(scope="module")
def world_of_one():
    init_parallel(1, 1, 1)
    yield
    destroy_parallel()


def _model(name: str) -> ModelConfig:
    return ModelConfig.from_hf_config(ROOT / "configs" / "hf_shapes" / f"{name}.json")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_total_parameter_count(name):
    assert format_count(total_params(_model(name))) == SHAPES[name]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_planner_counts_equal_meta_shards(world_of_one, name, tp, pp):
    m = _model(name)
    total = 0
    for stage in range(pp):
        for tp_rank in sorted({0, tp - 1}):
            model = meta_shard(m, tp, pp, tp_rank, stage)
            params = list(model.parameters())
            assert all(p.device.type == "meta" for p in params)
            assert model.pre_process == (stage == 0) and model.post_process == (stage == pp - 1)
            assert len(model.decoder.layers) == m.num_layers // pp
            assert model.decoder.layers[0].layer_number == stage * (m.num_layers // pp) + 1
            n = sum(p.numel() for p in params)
            assert n == stage_params(m, tp, pp, stage), (name, tp, pp, stage, tp_rank)
        norms = sum(p.numel() for k, p in model.named_parameters() if "norm" in k)  # replicated over TP
        total += (n - norms) * tp + norms
    assert total == total_params(m)  # the stages' shards add up to the whole model
