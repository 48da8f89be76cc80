"""``SharedPrefixLLaVAModel`` against ``LlavaForConditionalGeneration`` (fp32, CPU).

A tiny random HF LLaVA (``tests/llava_fixtures.make_tiny_llava``: CLIP 3 layers, llama 2 layers) is
converted at TP=1 and run on one sequence ``[prompt with two real photographs + response]`` (HF's
processor; packed alone: positions 0..L-1, one document). Logits equal HF's within a relative 1e-5
(measured ~3e-7) for the feature layers -2 (LLaVA-1.5), -1, 1 and the ``full`` strategy; TP=2 (with
and without sequence parallelism), PP=2 and CP=2 are in ``test_llava_parallel`` (torchrun, gloo).
Negative controls (swapped images, a wrong feature layer) must fail. Two image units packed shared
(K=2) give HF's per-response log-probs. Also: freeze flags, gradients, the input checks, the CPU
accommodation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import run_torchrun
from tests.dist_scripts import llava_common as lc
from tests.llava_fixtures import make_tiny_llava

REL_TOL = 1e-5
CONTROL_MIN = 1e-2  # a miswired model must be off by far more than the tolerance
LOGP_TOL = 1e-4  # summed response log-probs (nats), |logp| ~ 20-60 here
KINDS = {"default": {}, "full": {}, "last": {"vision_feature_layer": -1}, "first": {"vision_feature_layer": 1}}


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llava_model")


_CACHE: dict = {}


def hf_folder(work: Path, kind: str) -> Path:
    """The tiny LLaVA of ``kind`` (config.json edits on the default weights, or the ``full`` strategy)."""
    folder = work / f"hf_{kind}"
    if not folder.is_dir():
        strategy = "full" if kind == "full" else "default"
        src = work / f"src_{strategy}" / "tiny_llava"
        if not src.is_dir():
            make_tiny_llava(src.parent, select_strategy=strategy)
        shutil.copytree(src, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(KINDS[kind])
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def converted(work: Path, kind: str) -> Path:
    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.parallel import init_parallel

    out = work / f"run_{kind}"
    if not (out / "latest").is_file():
        convert_hf_to_mcore(hf_folder(work, kind), out, progress=False)
        init_parallel(1, 1, 1)
    return out


def reference(work: Path, kind: str) -> tuple[dict, torch.Tensor]:
    if kind not in _CACHE:
        s = lc.sample(hf_folder(work, kind))
        _CACHE[kind] = (s, lc.hf_logits(hf_folder(work, kind), s["ids"], s["pixels"]))
    return _CACHE[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_hf(parallel, work, kind):
    """Converted weights: our logits equal LlavaForConditionalGeneration's on [prompt + images + response]."""
    s, want = reference(work, kind)
    model = lc.load_llava(converted(work, kind))
    image = lc.image_token_id(hf_folder(work, kind))
    assert int((s["ids"] == image).sum()) == 2 * model.vision.tokens_per_image
    got = lc.our_logits(model, s["ids"], s["prompt_len"], s["pixels"], image)
    rel = lc.rel_diff(got, want)
    print(f"REL {kind} tp1 {rel:.3e}")
    assert rel <= REL_TOL, f"{kind}: max relative logit diff {rel:.3g}"


def test_negative_controls(parallel, work):
    """Swapped images, or features from another tower layer, change the logits clearly."""
    s, want = reference(work, "default")
    run, image = converted(work, "default"), lc.image_token_id(hf_folder(work, "default"))
    model = lc.load_llava(run)
    swapped = lc.rel_diff(lc.our_logits(model, s["ids"], s["prompt_len"], s["pixels"].flip(0), image), want)
    state = json.loads((run / "iter_0000000" / "train_state.json").read_text())["model"]
    wrong_layer = lc.load_llava(run, vision={**state["vision"], "feature_layer": -1})
    layer = lc.rel_diff(lc.our_logits(wrong_layer, s["ids"], s["prompt_len"], s["pixels"], image), want)
    print(f"CONTROL swapped_images {swapped:.3e} wrong_feature_layer {layer:.3e}")
    assert swapped > CONTROL_MIN and layer > CONTROL_MIN


def _model(work: Path, **overrides):
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model

    cfg = ModelConfig.from_hf_config(hf_folder(work, "default"))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return build_model(cfg, "dense", impl="local")


def _optimizer_config():
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(optimizer="adam", lr=1e-3)


@pytest.mark.parametrize("freeze_vision,freeze_projector", [(True, False), (False, False), (True, True),
                                                            (False, True)])
def test_freeze_flags(parallel, work, freeze_vision, freeze_projector):
    """model.freeze_vision / freeze_projector decide requires_grad; unused tower parts never train (the
    unused layers follow the tower's requires_grad but are held fixed: lr 0 in the optimizer)."""
    from megatron_prefix.model.llava import SharedPrefixLLaVAModel, freeze_vision_parts, held_fixed_parameters
    from megatron_prefix.training.setup import optimizer_overrides

    model = _model(work, freeze_vision=freeze_vision, freeze_projector=freeze_projector)
    assert isinstance(model, SharedPrefixLLaVAModel)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    unused = {n for n in grads if n.startswith(("vision_model.decoder.layers.2.", "vision_model.post_layernorm."))}
    assert len(unused) == 14  # layer 2 of 3 (feature layer -2) and HF's post_layernorm
    held = {id(p) for p in held_fixed_parameters(model)}
    assert {n for n, p in model.named_parameters() if id(p) in held} == (
        set() if freeze_vision else {n for n in unused if n.startswith("vision_model.decoder.")})
    assert (optimizer_overrides(model, _optimizer_config()) is None) is freeze_vision
    for name, trainable in grads.items():
        if name.startswith("vision_model.post_layernorm."):
            assert not trainable, name
        elif name in unused:
            assert trainable is not freeze_vision, name
        elif name.startswith("vision_model."):
            assert trainable is not freeze_vision, name
        elif name.startswith("vision_projection."):
            assert trainable is not freeze_projector, name
        else:
            assert trainable, name
    counts = freeze_vision_parts(model, True, True)  # callable again (e.g. by the trainer), idempotent per call
    assert counts["trainable"] == 0 and counts["frozen"] > 0
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vision_"))


def test_gradients_reach_the_used_tower_layers(parallel, work):
    """Unfrozen tower: layers before the feature layer get gradients, the unused ones none."""
    s, _ = reference(work, "default")
    model = _model(work, freeze_vision=False).train()
    mb, index = lc.micro_batch(s["ids"], s["prompt_len"], lc.image_token_id(hf_folder(work, "default")))
    out = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.params, pixel_values=s["pixels"],
                image_feature_index=index)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(("vision_model.decoder.layers.2.", "vision_model.post_layernorm.")):
            assert p.grad is None, name
        elif name.startswith(("vision_model.decoder.layers.0.", "vision_model.conv1", "vision_projection.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_input_checks(parallel, work):
    """Mismatched image tokens, wrong image sizes and one-sided arguments are refused by name."""
    s, _ = reference(work, "default")
    model = _model(work)
    image = lc.image_token_id(hf_folder(work, "default"))
    mb, index = lc.micro_batch(s["ids"], s["prompt_len"], image)

    def run(pixels, idx):
        with torch.no_grad():
            return model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.params, pixel_values=pixels,
                         image_feature_index=idx)

    shifted = index.clone()
    first = int((index[0] >= 0).nonzero()[0])
    shifted[0, first - 1], shifted[0, first] = shifted[0, first], -1
    with pytest.raises(ValueError, match="image features go exactly where the image token"):
        run(s["pixels"], shifted)
    with pytest.raises(ValueError, match="pixel_values: expected \\[N, 3, 28, 28\\]"):
        run(torch.zeros(2, 3, 32, 32), index)
    with pytest.raises(ValueError, match="are not used"):
        run(torch.cat([s["pixels"], s["pixels"][:1]]), index)
    with pytest.raises(ValueError, match="out of range"):
        run(s["pixels"][:1], index)
    with pytest.raises(ValueError, match="pass both"):
        run(s["pixels"], None)


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp,cp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_llava_parallel(parallel, work, tp, pp, cp):
    """TP=2 (with and without sequence parallelism), PP=2 (vision on the first stage), CP=2 (CP-local
    image_feature_index): each rank converts its shards, the model matches HF's logits, a TP=1
    checkpoint loads at this layout, and the checkpoint written at TP=2 / PP=2 exports bit-identical."""
    s, want = reference(work, "default")
    converted(work, "default")
    torch.save({**s, "logits": want}, work / "ref_default.pt")
    args = ["--work", str(work), "--kind", "default", "--tp", str(tp), "--pp", str(pp), "--cp", str(cp)]
    out = run_torchrun("tests/dist_scripts/llava_parity.py", nproc=2, args=args, timeout=300)
    rels = {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if line.startswith("REL ")}
    print(rels)
    want_names = {"from_tp1"} | ({"own"} if cp == 1 else set()) | ({"own_sp"} if tp > 1 else set())
    assert set(rels) == want_names, out[-3000:]
    assert all(v <= REL_TOL for v in rels.values()), rels
    if cp == 1:  # the checkpoint this layout wrote exports bit-identical to the source
        from megatron_prefix.convert import convert_mcore_to_hf

        back = work / f"back_tp{tp}pp{pp}"
        convert_mcore_to_hf(work / f"run_default_tp{tp}pp{pp}", back, progress=False)
        assert lc.bit_identical_report(hf_folder(work, "default"), back) is None


def test_cpu_accommodation_for_clip_vit(parallel, work, monkeypatch):
    """CPU: CLIPViTModel's position_ids .cuda() is absorbed by a module-scoped proxy pinned to the symbol."""
    import megatron.core.models.vision.clip_vit_model as clip_vit

    from megatron_prefix.compat import CompatError
    from megatron_prefix.compat.vision import TORCH_FOR_CLIP_VIT, patch_clip_vit_position_ids

    assert clip_vit.torch is TORCH_FOR_CLIP_VIT and clip_vit.torch.nn is torch.nn
    positions = _model(work).vision_model.position_ids
    assert type(positions) is torch.Tensor and positions.device.type == "cpu"
    assert torch.equal(positions, torch.arange(5)[None])
    patch_clip_vit_position_ids()  # idempotent
    monkeypatch.delattr(clip_vit, "CLIPViTModel")
    with pytest.raises(CompatError, match="CLIPViTModel is missing"):
        patch_clip_vit_position_ids()


def test_shared_rows_logps_match_hf(parallel, work):
    """Two units with images, K=2 each, packed shared into one row: every response's summed log-prob
    equals LlavaForConditionalGeneration on [prompt with its images + that response] alone (max 4e-6
    nats on |logp| 18-68), as does the unshared (duplicated) layout's row. Controls: one unit's two images swapped, and unit 0's image given to unit 1,
    are off by 0.08 / 0.15 nats."""
    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from megatron_prefix.data.row import layout_docs, pack_row
    from megatron_prefix.data.unit import Unit
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import response_logprobs

    folder = hf_folder(work, "default")
    image = lc.image_token_id(folder)
    a, b = lc.sample(folder), lc.sample(folder, photos=("chelsea",))

    def tok(text: str) -> np.ndarray:
        return np.asarray(lc.tokenizer_ids(folder, text), dtype=np.int64)

    specs = [(a, [tok(" a man in space</s>"), tok(" two pictures</s>")]), (b, [tok(" a cat</s>"), tok(" a dog</s>")])]
    units = [Unit(s["ids"][: s["prompt_len"]].numpy(), resps, np.zeros(2, dtype=np.float32), unit_id=i,
                  images=s["pixels"].numpy(), image_token_id=image) for i, (s, resps) in enumerate(specs)]
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    want = []
    with torch.no_grad():
        for s, resps in specs:
            for r in resps:
                ids = torch.cat([s["ids"][: s["prompt_len"]], torch.from_numpy(r)])[None]
                logp = torch.log_softmax(hf(input_ids=ids, pixel_values=s["pixels"]).logits[0].float(), -1)
                p = s["prompt_len"]
                want.append(float(logp[p - 1 : -1].gather(1, ids[0, p:, None]).sum()))
    want = torch.tensor(want)
    model = lc.load_llava(converted(work, "default"))
    row = pack_row(units, -(-sum(u.shared_len for u in units) // 8) * 8 + 8, pad_id=0)
    mb = MicroBatch.from_rows([row])
    assert mb.pixel_values.shape[0] == 3 and int((mb.image_feature_index >= 0).sum()) == 12
    docs = layout_docs(units, "unshared")  # [prompt, r_i] each with its own copy of the images
    alone_row = pack_row(docs, -(-sum(d.shared_len for d in docs) // 8) * 8 + 8, pad_id=0)
    mb_alone = MicroBatch.from_rows([alone_row])
    assert mb_alone.pixel_values.shape[0] == 6  # the images encoded once per response
    with torch.no_grad():
        got = response_logprobs(mb.forward(model), mb.index).logps
        got_unshared = response_logprobs(mb_alone.forward(model), mb_alone.index).logps
        controls = {}
        for name, order in (("swapped", [1, 0, 2]), ("wrong_unit", [0, 1, 0])):  # unit 1 gets unit 0's image
            mb.pixel_values = pixels = MicroBatch.from_rows([row]).pixel_values[order]
            controls[name] = float((response_logprobs(mb.forward(model), mb.index).logps - want).abs().max())
            assert pixels.shape[0] == 3
    diff = float((got - want).abs().max())
    print(f"LOGP shared max_abs {diff:.3e} max_rel {float(((got - want).abs() / want.abs()).max()):.3e} "
          f"|logp| {float(want.abs().min()):.1f}..{float(want.abs().max()):.1f} CONTROL {controls}")
    assert diff <= LOGP_TOL and min(controls.values()) > 100 * LOGP_TOL
    assert float((got_unshared - want).abs().max()) <= LOGP_TOL  # the duplicated layout gives the same values


def test_bf16_model_runs_its_tower(parallel, work):
    """Built in bfloat16 (the trainer's GPU path: no Float16Module), the tower computes in bf16 (megatron
    builds ``CLIPViTModel.conv1`` in fp32: the first layer then failed on mixed dtypes) and gives finite features."""
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model

    cfg = ModelConfig.from_hf_config(hf_folder(work, "default"))
    model = build_model(cfg, "dense", dtype="bfloat16").eval()
    assert model.vision_model.conv1.weight.dtype == torch.bfloat16
    norms = ("layernorm.", "ln_pre.")  # the project's norms keep fp32 weights (as for text)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not any(x in n for x in norms))
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        feats = model.image_features(pixels.bfloat16())
    assert feats.dtype == torch.bfloat16 and feats.shape[0] == 2 * cfg.vision.tokens_per_image
    assert torch.isfinite(feats.float()).all()
