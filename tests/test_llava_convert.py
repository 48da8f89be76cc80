"""LLaVA checkpoint conversion: HF ``LlavaForConditionalGeneration`` <-> our megatron run dirs.

The tiny random HF LLaVA of ``tests/llava_fixtures.make_tiny_llava`` is written in three key layouts
(transformers 5's own, the Hub ``vision_tower.vision_model.*`` one, transformers 4.5x's
``model.language_model.*``; all three load in transformers), plus tied embeddings and a qwen2 language
model, converted at TP=1 in process and at TP=2 under torchrun (PP=2: ``tests/test_llava_model.py``),
and exported back: every tensor is bit-identical to the source in the layout the installed transformers
writes, ``LlavaForConditionalGeneration.from_pretrained`` computes the same logits, and the tokenizer /
processor files come along. Unsupported HF configs and checkpoints are
refused with messages naming the key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import ROOT, run_torchrun
from tests.dist_scripts import llava_common as lc
from tests.llava_fixtures import make_tiny_llava


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """``hf_<layout>`` for every layout (same weights), plus ``hf_tied`` (tied word embeddings)."""
    work = tmp_path_factory.mktemp("llava_convert")
    src = make_tiny_llava(work / "src")
    for layout in lc.LAYOUTS:
        lc.relayout(src, work / f"hf_{layout}", layout)
    lc.relayout(make_tiny_llava(work / "src_tied", tie_word_embeddings=True, seed=1), work / "hf_tied", "tf5")
    lc.make_qwen2_llava(src, work / "hf_qwen2")
    return work


def _convert(work: Path, name: str, **kwargs) -> Path:
    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import init_parallel

    out = work / f"run_{name}"
    if not (out / "latest").is_file():
        convert_hf_to_mcore(work / f"hf_{name}", out, progress=False, **kwargs)
        init_parallel(1, 1, 1)
    return out


@pytest.mark.parametrize("layout", list(lc.LAYOUTS))
def test_round_trip_bit_identical(parallel, work, layout):
    """HF (any layout) -> megatron -> HF: transformers 5 names, every tensor bit for bit; HF loads it."""
    from megatron_prefix.convert import convert_mcore_to_hf

    run = _convert(work, layout)
    state = json.loads((run / "iter_0000000" / "train_state.json").read_text())
    assert state["model"]["vision"]["feature_layer"] == -2 and state["model"]["freeze_vision"] is True
    out = work / f"back_{layout}"
    convert_mcore_to_hf(run, out, shard_size=60_000, progress=False)
    assert lc.bit_identical_report(work / "hf_tf5", out) is None, lc.bit_identical_report(work / "hf_tf5", out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    source = json.loads((work / "hf_tf5" / "config.json").read_text())
    for key in ("image_token_index", "image_seq_length", "vision_feature_layer", "vision_feature_select_strategy",
                "projector_hidden_act"):
        assert config[key] == source[key], key
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config["text_config"][key] == source["text_config"][key], key
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), f"{name} not copied (source folder recorded in train_state.json)"


def test_exported_model_computes_the_same(parallel, work):
    """The exported folder: LlavaForConditionalGeneration and AutoProcessor load it; same logits exactly."""
    from transformers import AutoProcessor

    from megatron_prefix.convert import convert_mcore_to_hf

    out = work / "back_tied"
    convert_mcore_to_hf(_convert(work, "tied"), out, tokenizer=work / "hf_tied", progress=False)
    assert lc.bit_identical_report(work / "hf_tied", out) is None
    assert "language_model.lm_head.weight" not in lc.safetensors_of(out)
    assert AutoProcessor.from_pretrained(str(out)).__class__.__name__ == "LlavaProcessor"
    s = lc.sample(work / "hf_tied")
    assert torch.equal(lc.hf_logits(out, s["ids"], s["pixels"]), lc.hf_logits(work / "hf_tied", s["ids"], s["pixels"]))


@pytest.mark.parametrize("name", ["tied", "qwen2"])
def test_other_llava_logits(parallel, work, name):
    """Tied embeddings, and a qwen2 language model (QKV biases): our model matches HF; bit-identical back."""
    from megatron_prefix.convert import convert_mcore_to_hf

    s = lc.sample(work / f"hf_{name}")
    want = lc.hf_logits(work / f"hf_{name}", s["ids"], s["pixels"])
    run = _convert(work, name)
    got = lc.our_logits(lc.load_llava(run), s["ids"], s["prompt_len"], s["pixels"], lc.image_token_id(work / "hf_tied"))
    rel = lc.rel_diff(got, want)
    print(f"REL {name} tp1 {rel:.3e}")
    assert rel <= 1e-5
    if name == "qwen2":
        convert_mcore_to_hf(run, work / "back_qwen2", progress=False)
        assert lc.bit_identical_report(work / "hf_qwen2", work / "back_qwen2") is None


def test_reward_model_conversion_and_export(parallel, work):
    """task rm: a fresh scalar head on the LLaVA; its export is refused (no HF LLaVA reward class)."""
    from megatron_prefix.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_prefix.parallel import init_parallel

    run = work / "rm_run"
    convert_hf_to_mcore(work / "hf_tf5", run, task="rm", progress=False)
    init_parallel(1, 1, 1)
    with pytest.raises(ValueError, match="no LlavaForSequenceClassification"):
        convert_mcore_to_hf(run, work / "rm_back", progress=False)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("edit,message", [
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer=\\[-2, -1\\] is not supported"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "only a CLIP vision tower"),
    ({"multimodal_projector_bias": False}, "multimodal_projector_bias=false is not supported"),
    ({"projector_hidden_act": "gelu_fast"}, "projector_hidden_act='gelu_fast' is not supported"),
    ({"vision_config": {"hidden_act": "gelu_new"}}, "vision_config.hidden_act='gelu_new' is not supported"),
    ({"vision_feature_select_strategy": "pooled"}, "vision_feature_select_strategy='pooled'"),
    ({"image_seq_length": 7}, "image_seq_length=7 disagrees"),
    ({"vision_config": {"num_channels": 1}}, "num_channels=1 is not supported"),
    ({"vision_feature_layer": 5}, "model.vision.feature_layer: must be in \\[-4, 3\\]"),
    ({"text_config": {"model_type": "gemma"}}, "text_config.model_type='gemma' is not supported"),
    ({"text_config": {"hidden_act": "gelu"}}, "hidden_act='gelu' is not supported"),
    ({"image_token_index": 10_000}, "outside the vocabulary"),
    ({"vision_config": {"image_size": 30}}, "model.vision.patch_size: must divide image_size=30"),
])
def test_unsupported_configs_refused(work, edit, message):
    from megatron_prefix.model.config import ModelConfig

    config = json.loads((work / "hf_tf5" / "config.json").read_text())
    for key, value in edit.items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(config)


def test_vision_config_yaml_typing():
    """model.vision in a recipe: typed, validated, errors name the field."""
    from megatron_prefix.config import ConfigError
    from megatron_prefix.model.config import ModelConfig

    cfg = ModelConfig.from_dict({"vision": {"image_size": 28, "patch_size": 14, "hidden_size": 32,
                                            "intermediate_size": 64, "num_attention_heads": 4, "num_layers": 3,
                                            "image_token_id": 3}})
    assert cfg.vision.tokens_per_image == 4 and cfg.vision.layers_run == 2 and cfg.freeze_vision
    with pytest.raises(ConfigError, match="model.vision.patch_size: expected an int, got 'x'"):
        ModelConfig.from_dict({"vision": {"patch_size": "x"}})
    with pytest.raises(ValueError, match="model.vision.num_attention_heads: 4 heads cannot be split"):
        ModelConfig.from_dict({"num_attention_heads": 8, "vision": {"num_attention_heads": 4, "hidden_size": 32,
                                                                     "image_token_id": 3}}).validate(tp=8)
    assert ModelConfig(**cfg.to_dict()) == cfg  # train_state.json round trip


def _tensor_edit(work: Path, name: str, edit) -> Path:
    from safetensors.torch import load_file, save_file

    folder = work / f"hf_bad_{name}"
    if not folder.is_dir():
        lc.relayout(work / "hf_tf5", folder, "tf5")
        tensors = load_file(str(folder / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_bad_checkpoints_refused(parallel, work):
    """Missing or unknown vision tensors, and two key layouts mixed, stop the conversion."""
    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import init_parallel

    cases = {
        "missing": (lambda t: t.pop("vision_tower.encoder.layers.1.mlp.fc1.bias"), "vision tensors missing"),
        "extra": (lambda t: t.update({"vision_tower.head.weight": torch.zeros(2)}), "no megatron counterpart"),
        "mixed": (lambda t: t.update({"vision_tower.vision_model.pre_layrnorm.bias": torch.zeros(32)}),
                  "two key layouts"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            convert_hf_to_mcore(_tensor_edit(work, name, edit), work / f"run_bad_{name}", progress=False)
        init_parallel(1, 1, 1)


def test_cli_dispatches_on_model_type(work):
    """Both tools, unchanged flags, on a LLaVA folder (Hub layout): round trip, processor files."""
    run, back = work / "cli_run", work / "cli_back"
    py = [sys.executable]
    for cmd in (
        [*py, "tools/convert_hf_to_mcore.py", "--hf", str(work / "hf_hub"), "--out", str(run), "--no-progress"],
        [*py, "tools/convert_mcore_to_hf.py", "--ckpt", str(run), "--out", str(back), "--tokenizer",
         str(work / "hf_hub"), "--hf-config", str(work / "hf_hub"), "--no-progress"],
    ):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lc.bit_identical_report(work / "hf_tf5", back) is None
    assert (back / "processor_config.json").is_file() and (back / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------ TP=2


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp,layouts", [(2, 1, ("hub", "v4"))])
def test_parallel_conversion_round_trip(parallel, work, tp, pp, layouts):
    """Each rank converts its own shards at TP=2 (any input layout); the export is bit-identical. (PP=2
    conversion: ``test_llava_model.test_llava_parallel``.)"""
    from megatron_prefix.convert import convert_mcore_to_hf

    out = run_torchrun("tests/dist_scripts/llava_convert.py", nproc=2,
                       args=["--work", str(work), "--layouts", ",".join(layouts), "--tp", str(tp), "--pp", str(pp)],
                       timeout=300)
    assert all(f"CONVERTED {layout}" in out for layout in layouts), out[-3000:]
    for layout in layouts:
        back = work / f"back_{layout}_tp{tp}pp{pp}"
        convert_mcore_to_hf(work / f"run_{layout}_tp{tp}pp{pp}", back, progress=False)
        report = lc.bit_identical_report(work / "hf_tf5", back)
        assert report is None, f"{layout} tp{tp}pp{pp}: {report}"


# llava-hf/llava-1.5-7b-hf's config.json: text_config / vision_config hold only what differs from the
# transformers defaults
HUB_LLAVA_15 = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_sparse_hub_config_uses_transformers_defaults():
    """A Hub config.json that leaves defaults implicit reads as transformers' fully expanded one does."""
    from transformers import LlavaConfig

    from megatron_prefix.model.config import ModelConfig

    sparse = ModelConfig.from_hf_config(HUB_LLAVA_15)
    expanded = ModelConfig.from_hf_config(LlavaConfig(**HUB_LLAVA_15).to_dict())
    assert sparse == expanded
    assert (sparse.hidden_size, sparse.num_layers, sparse.kv_heads, sparse.vocab_size) == (4096, 32, 32, 32064)
    assert sparse.vision.tokens_per_image == 576 and sparse.vision.hidden_act == "quick_gelu"
    assert sparse.params_dtype == "float16" and sparse.max_position_embeddings == 4096
    for family in ("qwen2", "mistral"):
        config = {**HUB_LLAVA_15, "text_config": {"model_type": family, "vocab_size": 32064}}
        if family == "mistral":  # its default sliding window (4096) is refused both ways
            config["text_config"]["sliding_window"] = None
        assert ModelConfig.from_hf_config(config) == ModelConfig.from_hf_config(LlavaConfig(**config).to_dict())


def test_bf16_round_trip(parallel, work):
    """A bf16 LLaVA stays bf16 (default --dtype: config.json's) and round-trips bit for bit."""
    from megatron_prefix.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_prefix.parallel import init_parallel

    src = make_tiny_llava(work / "src_bf16", dtype="bfloat16", seed=2)
    run, back = work / "run_bf16", work / "back_bf16"
    convert_hf_to_mcore(src, run, progress=False)
    init_parallel(1, 1, 1)
    assert json.loads((run / "iter_0000000" / "train_state.json").read_text())["model"]["params_dtype"] == "bfloat16"
    convert_mcore_to_hf(run, back, progress=False)
    assert lc.bit_identical_report(src, back) is None, lc.bit_identical_report(src, back)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
