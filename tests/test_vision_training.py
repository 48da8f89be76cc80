"""Issue 11 acceptance: vision-language DPO / RM training on image preference data, exact and resumable.

One tiny LLaVA (``tests.llava_fixtures.make_tiny_llava``: an HF ``LlavaForConditionalGeneration`` made
from a config), converted HF -> megatron; one image preference dataset in TRL's vision format built from
real photographs (``skimage.data``) and generated pictures, with relative paths. Then:

- DPO trains 3 steps through ``launch/train_dpo.py`` from the converted checkpoint (vision tower frozen,
  projector and language model trained), exports to HF, and transformers loads the export;
- per-response log-probs of packed shared rows equal ``LlavaForConditionalGeneration`` on each
  [prompt with its image + response] alone (``tools/verify_sharing.py``, fp32, rtol 1e-5) at TP=1 and
  TP=2, and the negative controls (``--control mask``, ``--control image``) fail;
- the online reference gives the precomputed reference's losses; the reward model trains and resumes
  bitwise; an image dataset with a text model, or with another model's image settings, is refused.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from megatron_prefix.training.image_checks import check_dataset_images, image_mismatches
from megatron_prefix.training.resume import freeze_changes, model_mismatch
from tests import train_helpers as th
from tests.conftest import ROOT

META = {"images": {"shape": [3, 28, 28], "dtype": "float32", "image_token_id": 3, "tokens_per_image": 4,
                   "count": 10, "processor": {}}}


def _vision(**kw):
    from megatron_prefix.model.vision_config import VisionConfig

    base = {"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_layers": 3, "image_token_id": 3}
    return VisionConfig(**{**base, **kw})


# ---------------------------------------------------------------- pure checks (no model)


def test_dataset_images_must_match_the_model():
    check_dataset_images(META, _vision(), "data/x", "the recipe")  # agrees
    check_dataset_images({}, _vision(), "data/x", "the recipe")  # a text dataset trains a vision model
    with pytest.raises(ValueError, match=r"holds 10 images .* no vision encoder"):
        check_dataset_images(META, None, "data/x", "the recipe")
    diffs = image_mismatches(META["images"], _vision(image_token_id=7, image_size=42))
    assert any("image_token_id: the dataset has 3, the model (model.vision.image_token_id) 7" in d for d in diffs)
    assert any("tokens_per_image: the dataset has 4, the model 9" in d for d in diffs)
    assert any("[3, 28, 28], the model reads [3, 42, 42]" in d for d in diffs)
    with pytest.raises(ValueError, match="--image-processor"):
        check_dataset_images(META, _vision(select_strategy="full"), "data/x", "checkpoint c")


def test_freeze_flags_are_not_architecture():
    """Changing what trains is no "other model"; loading optimizer state for another set is refused."""
    from megatron_prefix.model.config import ModelConfig

    saved = asdict(ModelConfig(vision=_vision()))  # as train_state.json records it
    asked = ModelConfig(vision=_vision(), freeze_vision=False, freeze_projector=True)
    assert model_mismatch(saved, asked) == []
    assert freeze_changes(saved, asked) == [
        "model.freeze_vision: the checkpoint trained with True, this run asks False",
        "model.freeze_projector: the checkpoint trained with False, this run asks True",
    ]
    assert freeze_changes(saved, ModelConfig(vision=_vision())) == []


# ---------------------------------------------------------------- end to end (tiny LLaVA, CPU)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF folder, converted megatron checkpoint, built image dataset, work dir)."""
    from tests.llava_fixtures import make_tiny_llava
    from tests.vision_helpers import build_image_dataset, convert_in, write_image_preferences

    work = tmp_path_factory.mktemp("vision")
    hf = make_tiny_llava(work)
    mcore = convert_in(hf, work / "mcore")
    jsonl = write_image_preferences(work / "raw", records=24, k=2)
    data = build_image_dataset(jsonl, hf, work / "data")
    return hf, mcore, data, work


def _recipe(path: Path, hf: Path, mcore: Path, dataset: Path, run: Path, **sections) -> Path:
    """A DPO / RM recipe on the tiny LLaVA: architecture from its HF config, weights from ``mcore``."""
    base = {
        "data": {"pack_tokens": 256, "global_batch_units": 8},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        "checkpoint": {"dir": str(run), "load": str(mcore), "load_optimizer": False},
        "train": {"max_steps": 3, "seed": 7},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    recipe = th.write_recipe(path, dataset, run, **base)
    text = yaml.safe_load(recipe.read_text())
    text["model"] = {"hf_config": str(hf)}  # not the tiny text model of train_helpers
    recipe.write_text(yaml.safe_dump(text))
    return recipe


def _tool():
    spec = importlib.util.spec_from_file_location("verify_sharing", ROOT / "tools" / "verify_sharing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meta_records_images(llava):
    _, _, data, _ = llava
    meta = json.loads((data / "meta.json").read_text())
    images = meta["images"]
    assert images["tokens_per_image"] == 4 and images["shape"] == [3, 28, 28] and images["count"] >= 20


def test_reference_key_holds_what_changes_image_logprobs(llava):
    """The precomputed reference's key changes with the vision tower and the pixels, not with what trains."""
    from dataclasses import replace

    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.training.reference import key_digest, reference_key

    hf, _, data, _ = llava
    ds = PreferenceDataset(data)
    cfg = ModelConfig.from_hf_config(hf)

    def key(model):
        return key_digest(reference_key(ds, asdict(model), {"checkpoint": "c"}, "float32"))

    base = key(cfg)
    assert key(replace(cfg, freeze_vision=False, freeze_projector=True)) == base
    assert key(replace(cfg, vision=replace(cfg.vision, feature_layer=-1))) != base
    assert key(replace(cfg, vision=replace(cfg.vision, select_strategy="full"))) != base
    assert "images" in ds.meta  # the processor settings are in meta.json, whose digest is in the key


def test_dpo_three_steps_then_export_loads_in_transformers(llava):
    """The acceptance run: 3 DPO steps from the converted HF LLaVA, then back to HF."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    hf, mcore, data, work = llava
    run = work / "dpo"
    out = th.train(_recipe(work / "dpo.yaml", hf, mcore, data, run, data={"eval_fraction": 0.25, "eval_units": 8}))
    assert "loaded weights from" in out
    recs = th.metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["pairs"] > 0 for r in recs)
    assert all(abs(r["loss"]) < 10 and r["images"] > 0 for r in recs)  # images encoded in every step
    evals = th.metrics(run, split="eval")  # evaluation ran on image rows too
    assert len(evals) == 1 and evals[0]["pairs"] > 0 and abs(evals[0]["loss"]) < 10
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_mcore_to_hf.py"), "--ckpt", str(run), "--out",
                    str(work / "hf_trained"), "--no-progress"], check=True, capture_output=True, cwd=ROOT)
    LlavaForConditionalGeneration.from_pretrained(str(work / "hf_trained"), dtype=torch.float32)  # loads

    def tensors(folder: Path) -> dict:
        return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}

    start, now = tensors(hf), tensors(work / "hf_trained")
    assert set(start) == set(now)
    vision = [k for k in start if "vision_tower" in k]
    projector = [k for k in start if "multi_modal_projector" in k]
    assert vision and projector
    assert all(torch.equal(start[k], now[k]) for k in vision)  # model.freeze_vision (default): untouched
    assert any(not torch.equal(start[k], now[k]) for k in projector)  # the projector trained
    # the exported, trained model is still exactly what the shared rows compute
    assert _tool().main(["--model", str(work / "hf_trained"), "--data", str(data), "--units", "6"]) == 0


def test_logprobs_equal_transformers_llava_tp1_and_controls_fail(llava, capsys):
    hf, _, data, _ = llava
    tool = _tool()
    assert tool.main(["--model", str(hf), "--data", str(data), "--units", "12", "--pack-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "LlavaForConditionalGeneration" in out
    assert tool.main(["--model", str(hf), "--data", str(data), "--units", "12", "--pack-tokens", "256", "--control", "mask"]) == 1
    assert tool.main(["--model", str(hf), "--data", str(data), "--units", "12", "--pack-tokens", "256", "--control", "image"]) == 1
    assert capsys.readouterr().out.count("FAIL") == 2


@pytest.mark.dist
def test_logprobs_equal_transformers_llava_tp2(llava):
    import subprocess
    import sys

    hf, _, data, _ = llava
    cmd = [sys.executable, str(ROOT / "tools" / "verify_sharing.py"), "--model", str(hf), "--data", str(data),
           "--units", "8", "--pack-tokens", "256", "--tp", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=th.env(), timeout=300, check=False)
    assert proc.returncode == 0 and "PASS" in proc.stdout and "tp=2" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run(cmd + ["--control", "image"], capture_output=True, text=True, cwd=ROOT, env=th.env(),
                          timeout=300, check=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr


def test_online_reference_matches_precomputed(llava):
    hf, mcore, data, work = llava
    th.train(_recipe(work / "pre.yaml", hf, mcore, data, work / "pre", train={"max_steps": 2}))
    th.train(_recipe(work / "onl.yaml", hf, mcore, data, work / "onl", train={"max_steps": 2},
                     reference={"mode": "online"}))
    pre, onl = th.metrics(work / "pre"), th.metrics(work / "onl")
    assert len(pre) == len(onl) == 2
    for a, b in zip(pre, onl):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) <= 1e-4


@pytest.mark.dist
def test_pipeline_parallel_matches_one_process(llava):
    """PP=2: the tower lives on the first stage, the pixels still travel through megatron's pipeline
    schedule (the reference precompute included: its own cache here) and every stage gets the micro-batch."""
    hf, mcore, data, work = llava
    th.train(_recipe(work / "pp1.yaml", hf, mcore, data, work / "pp_one", train={"max_steps": 2}))
    th.train(_recipe(work / "pp2.yaml", hf, mcore, data, work / "pp_two", train={"max_steps": 2},
                     reference={"path": str(work / "ref_pp2")}, parallel={"pp": 2}), nproc=2)
    one, two = th.metrics(work / "pp_one"), th.metrics(work / "pp_two")
    assert len(one) == len(two) == 2 and (work / "ref_pp2" / "key.json").is_file()
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


def test_reward_model_trains_and_resumes_bitwise(llava):
    hf, mcore, data, work = llava
    common = {"loss": {"type": "bt"}, "train": {"max_steps": 4}}
    whole = _recipe(work / "rm.yaml", hf, mcore, data, work / "rm_whole", **common)
    th.train(whole, task="rm")
    cut = _recipe(work / "rm2.yaml", hf, mcore, data, work / "rm_cut", **common, checkpoint={"interval": 2})
    th.train(cut, ["train.exit_interval=2"], task="rm")
    assert "resumed from" in th.train(cut, task="rm")
    a, b = th.metrics(work / "rm_whole"), th.metrics(work / "rm_cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x["step"], x["loss"], y["loss"])


def test_image_dataset_with_a_text_model_is_refused(llava, tmp_path):
    _, _, data, _ = llava
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", data={"pack_tokens": 256},
                             train={"max_steps": 1})
    out = th.train(recipe, expect_rc=2)
    assert "no vision encoder" in out and str(data) in out and "Traceback" not in out


def test_score_tool_gives_transformers_logprobs_on_image_data(llava, tmp_path):
    """``tools/score.py`` on an image dataset: each response's log-prob is transformers' on it alone."""
    import subprocess
    import sys

    import torch
    from transformers import LlavaForConditionalGeneration

    from megatron_prefix.data.dataset import PreferenceDataset

    hf, mcore, data, _ = llava
    out = tmp_path / "scores.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "score.py"), "--ckpt", str(mcore), "--data",
                           str(data), "--out", str(out), "--units", "4", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=th.env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ours = torch.tensor([v for line in lines for v in line["logps"]], dtype=torch.float64)
    units = PreferenceDataset(data).units(range(4))
    assert sum(u.images is not None and len(u.images) > 0 for u in units) >= 2, "the check needs image units"
    model = LlavaForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        want = _tool().hf_alone_logps(model, units).double()
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-4), (ours, want)


def test_training_the_tower_saves_and_keeps_its_unused_layers(llava):
    """``model.freeze_vision=false``: the tower trains and checkpoints (its layers after the feature layer,
    stacked with the others in megatron's checkpoint, stay in the optimizer at lr 0) and the unused layers
    and ``post_layernorm`` come back unchanged in the HF export; a resume with the tower frozen again is
    refused (another optimizer state), naming the flag and the way."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    hf, mcore, data, work = llava
    run = work / "tower"
    recipe = _recipe(work / "tower.yaml", hf, mcore, data, run, train={"max_steps": 2})
    th.train(recipe, ["model.freeze_vision=false"])
    # resuming with another set of trained parameters is refused, with the way to do it
    out = th.train(recipe, ["train.max_steps=3"], expect_rc=2)
    assert "model.freeze_vision: the checkpoint trained with False, this run asks True" in out
    assert "checkpoint.load_optimizer=false" in out
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_mcore_to_hf.py"), "--ckpt", str(run), "--out",
                    str(work / "hf_tower"), "--no-progress"], check=True, capture_output=True, cwd=ROOT)

    def tensors(folder: Path) -> dict:
        return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}

    start, now = tensors(hf), tensors(work / "hf_tower")
    last = json.loads((hf / "config.json").read_text())["vision_config"]["num_hidden_layers"] - 1  # unused at -2
    unused = [k for k in start if f"encoder.layers.{last}." in k or "post_layernorm" in k]
    used = [k for k in start if "encoder.layers.0." in k]
    assert unused and used
    assert all(torch.equal(start[k], now[k]) for k in unused)
    assert any(not torch.equal(start[k], now[k]) for k in used)  # the tower trained


def test_verify_sharing_removes_its_conversion_on_an_error(llava, tmp_path, monkeypatch):
    """An error after the HF folder was converted leaves no temporary checkpoint behind."""
    import tempfile

    hf, _, data, _ = llava
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rc = _tool().main(["--model", str(hf), "--data", str(data), "--units", "2", "--pack-tokens", "8"])
    assert rc == 2
    assert not list(tmp_path.glob("megatron_prefix_weights_*"))
