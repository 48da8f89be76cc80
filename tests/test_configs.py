"""Every recipe in configs/ parses, and validates for its intended world (pure CPU tier)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prefix.config import apply_overrides, from_dict, load_yaml, parse_override
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.training.config import TrainConfig
from tests.conftest import ROOT

SHAPES = ROOT / "configs" / "hf_shapes"
# recipe -> (the HF shapes its model.hf_config names, or None for a recipe-defined model; world size; CUDA)
RECIPES = {"demo-cpu.yaml": (None, 1, False), "llama3.1-8b-dpo.yaml": ("llama3.1-8b.json", 8, True),
           "llama3.1-70b-dpo.yaml": ("llama3.1-70b.json", 32, True),
           "qwen2.5-72b-dpo.yaml": ("qwen2.5-72b.json", 32, True),
           "llava-1.5-7b-dpo.yaml": ("llava-1.5-7b.json", 8, True)}


def load(name: str) -> TrainConfig:
    data = load_yaml(ROOT / "configs" / name)
    (data.get("model") or {}).pop("hf_config", None)
    return from_dict(TrainConfig, data)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates_for_its_world(name):
    shapes, world, cuda = RECIPES[name]
    cfg = load(name)
    if shapes is not None:
        assert load_yaml(ROOT / "configs" / name)["model"]["hf_config"] == f"configs/hf_shapes/{shapes}"
        cfg.model = ModelConfig.from_hf_config(SHAPES / shapes)
    cfg.validate(world_size=world, cuda=cuda)


def test_every_recipe_is_covered():
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == set(RECIPES)


def test_gpu_recipes_refuse_cpu():
    cfg = load("llama3.1-8b-dpo.yaml")
    cfg.model = ModelConfig.from_hf_config(SHAPES / "llama3.1-8b.json")
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
