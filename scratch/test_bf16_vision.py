"""Regression (vreview): a LLaVA built in bfloat16 (the trainer's GPU path, no Float16Module) runs its tower.
Before the fix megatron's CLIPViTModel.conv1 stayed float32 and the first tower layer failed with
"expected m1 and m2 to have the same dtype". Run: .venv/bin/python -m pytest -q scratch/test_bf16_vision.py"""
import torch


def test_bf16_llava_tower_runs(tmp_path):
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.parallel import init_parallel
    from tests.llava_fixtures import make_tiny_llava

    cfg = ModelConfig.from_hf_config(make_tiny_llava(tmp_path))
    init_parallel(1, 1, 1, seed=0)
    model = build_model(cfg, "dense", dtype="bfloat16").eval()
    assert model.vision_model.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        feats = model.image_features(torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size))
    assert feats.dtype == torch.bfloat16 and feats.shape[0] == 2 * cfg.vision.tokens_per_image
