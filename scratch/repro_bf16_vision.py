"""Repro: a LLaVA built in bfloat16 (what the trainer does on GPU: build_model with params_dtype bf16, no
Float16Module) keeps CLIPViTModel's conv1 / class_token / position_embeddings / ln_pre in float32, and the
forward with pixel_values fails ("expected m1 and m2 to have the same dtype").
usage: python scratch/repro_bf16_vision.py HF_LLAVA_DIR"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.spec import build_model
from megatron_prefix.parallel import init_parallel  # noqa
cfg = ModelConfig.from_hf_config(sys.argv[1])
init_parallel(1, 1, 1, seed=0)
m = build_model(cfg, "dense", dtype="bfloat16").eval()
odd = sorted({n.rsplit(".", 1)[0] for n, p in m.named_parameters() if p.dtype != torch.bfloat16})
print("non-bf16 parameters:", odd)
v = cfg.vision
px = torch.randn(1, 3, v.image_size, v.image_size)
try:
    with torch.no_grad():
        f = m.image_features(px)
    print("image_features OK", f.dtype, tuple(f.shape))
except Exception as e:
    print("image_features FAILED:", type(e).__name__, e)
