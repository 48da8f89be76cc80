"""End to end: a tiny HF model -> convert in -> DPO (launch/train_dpo.py) -> convert out -> transformers.

The exported checkpoint must give the trained model's logits (max |diff| <= 1e-4, fp32), and those must
differ from the starting model's (training changed the weights).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests import train_helpers as th
from tests.conftest import ROOT
from tests.dist_scripts import convert_common as cc

pytestmark = pytest.mark.slow


def test_dpo_from_converted_hf_model_exports_back(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_prefix.parallel import init_parallel

    hf_cfg = cc.hf_config("llama")
    hf_cfg.vocab_size, hf_cfg.max_position_embeddings = 258, 2048  # the byte tokenizer's vocabulary
    torch.manual_seed(0)
    start = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    start.save_pretrained(str(tmp_path / "hf"))
    tools = ROOT / "tools"
    subprocess.run([sys.executable, str(tools / "convert_hf_to_mcore.py"), "--hf", str(tmp_path / "hf"), "--out",
                    str(tmp_path / "mcore"), "--no-progress"], check=True, capture_output=True)
    data = th.build_demo_dataset(tmp_path / "data", records=48)
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", model={"hf_config": str(tmp_path / "hf")},
                             data={"global_batch_units": 8}, optimizer={"lr": 1e-3, "min_lr": 1e-4},
                             checkpoint={"dir": str(tmp_path / "run"), "load": str(tmp_path / "mcore"),
                                         "load_optimizer": False},
                             train={"max_steps": 3, "seed": 7})
    out = th.train(recipe)
    assert "loaded weights from" in out
    subprocess.run([sys.executable, str(tools / "convert_mcore_to_hf.py"), "--ckpt", str(tmp_path / "run"), "--out",
                    str(tmp_path / "hf_trained"), "--no-progress"], check=True, capture_output=True)

    init_parallel(1, 1, 1)
    tokens = cc.sample_tokens(258)
    ours = cc.megatron_logits(cc.load_converted(tmp_path / "run"), tokens)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_trained"), dtype=torch.float32).eval()
    theirs = cc.hf_logits(exported, tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (cc.hf_logits(start, tokens) - theirs).abs().max().item() > 1e-3
