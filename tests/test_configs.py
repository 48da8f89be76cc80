"""Every recipe in configs/ parses, and validates for its intended world (pure CPU tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prefix.config import apply_overrides, from_dict, load_yaml, parse_override
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.training.config import TrainConfig
from tests.conftest import ROOT

LLAMA3_8B = ModelConfig(family="llama", hidden_size=4096, ffn_hidden_size=14336, num_layers=32,
                        num_attention_heads=32, num_query_groups=8, vocab_size=128256)
QWEN25_72B = ModelConfig(family="qwen2", hidden_size=8192, ffn_hidden_size=29568, num_layers=80,
                         num_attention_heads=64, num_query_groups=8, vocab_size=152064, qkv_bias=True)
RECIPES = {"demo-cpu.yaml": (None, 1, False), "llama3-8b-dpo.yaml": (LLAMA3_8B, 8, True),
           "qwen2.5-72b-dpo.yaml": (QWEN25_72B, 32, True)}


def load(name: str) -> TrainConfig:
    data = load_yaml(ROOT / "configs" / name)
    (data.get("model") or {}).pop("hf_config", None)
    return from_dict(TrainConfig, data)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates_for_its_world(name):
    model, world, cuda = RECIPES[name]
    cfg = load(name)
    if model is not None:
        cfg.model = model
    cfg.validate(world_size=world, cuda=cuda)


def test_every_recipe_is_covered():
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == set(RECIPES)


def test_gpu_recipes_refuse_cpu():
    cfg = load("llama3-8b-dpo.yaml")
    cfg.model = LLAMA3_8B
    with pytest.raises(ValueError, match="attention.backend|train.dtype"):
        cfg.validate(world_size=8, cuda=False)


def test_overrides_are_typed_and_unknown_keys_fail():
    data = apply_overrides({}, ["train.max_steps=20", "loss.beta=0.05", "data.layout=unshared",
                                "parallel.use_distributed_optimizer=true"])
    cfg = from_dict(TrainConfig, data)
    assert cfg.train.max_steps == 20 and cfg.loss.beta == 0.05 and cfg.parallel.use_distributed_optimizer is True
    with pytest.raises(ValueError, match="train.max_stpes"):
        from_dict(TrainConfig, apply_overrides({}, ["train.max_stpes=3"]))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("train.max_steps")
    assert Path(ROOT / "configs").is_dir()
