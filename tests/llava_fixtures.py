"""A tiny Hugging Face LLaVA for tests, and a few real photographs.

``make_tiny_llava(tmpdir, ...)`` writes a complete ``LlavaForConditionalGeneration`` folder, as
``save_pretrained`` does for ``llava-hf/llava-1.5-7b-hf``, but tiny and random (seeded):

- ``config.json``: ``model_type: llava``, a llama ``text_config`` (2 layers, hidden 64, 4 heads, 2 KV
  groups), a CLIP ``vision_config`` (image 28 px, patch 14 -> 4 patches + CLS, 3 layers, hidden 32),
  ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"`` (CLS dropped), so one image
  is ``TOKENS_PER_IMAGE = 4`` tokens, ``image_token_index`` = the tokenizer's ``<image>`` id;
- ``*.safetensors`` (fp32), ``tokenizer.json`` / ``tokenizer_config.json`` (byte-level BPE with the
  specials ``<|endoftext|>``, ``<s>``, ``</s>``, ``<image>``; BOS ``<s>`` added by the post-processor,
  EOS ``</s>``, a llava-1.5-style chat template over content-part lists);
- the processor files (``LlavaProcessor``; transformers 5 writes the ``CLIPImageProcessor`` settings,
  shortest edge 28, center crop 28, CLIP mean/std, inside ``processor_config.json``, older versions in
  ``preprocessor_config.json``: read them with ``AutoImageProcessor.from_pretrained(folder)``).

transformers 5 saves the weights as ``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.embeddings.*`` / ``vision_tower.encoder.layers.*`` / ``vision_tower.pre_layrnorm.*`` /
``vision_tower.post_layernorm.*`` and ``multi_modal_projector.linear_{1,2}.*``; Hub checkpoints
(``llava-hf/llava-1.5-7b-hf``) spell the tower ``vision_tower.vision_model.*``.

``photographs()`` returns a few real photographs shipped with scikit-image (``skimage.data``; no
download) as uint8 HxWx3 arrays; ``make_photo_files(dir)`` writes them as PNG/JPEG files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.tokenizer_fixtures import DEFAULT_TEXTS, make_hf_tokenizer

IMAGE_SIZE = 28
PATCH_SIZE = 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" strategy: the CLS token is dropped

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photographs(names: tuple[str, ...] = PHOTOS) -> dict[str, "object"]:
    """Real photographs from ``skimage.data`` (shipped with the package) as uint8 HxWx3 numpy arrays."""
    import skimage.data

    return {n: getattr(skimage.data, n)() for n in names}


def make_photo_files(directory: Path | str, names: tuple[str, ...] = PHOTOS) -> dict[str, Path]:
    """Write ``photographs()`` under ``directory`` (PNG, and JPEG for every other one); name -> path."""
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, arr) in enumerate(photographs(names).items()):
        path = d / (f"{name}.jpg" if i % 2 else f"{name}.png")
        Image.fromarray(arr).save(path)
        out[name] = path
    return out


def make_tiny_llava(
    tmpdir: Path | str,
    *,
    seed: int = 0,
    text_layers: int = 2,
    vision_layers: int = 3,
    tie_word_embeddings: bool = False,
    select_strategy: str = "default",
    dtype: str = "float32",
) -> Path:
    """Write a tiny random ``LlavaForConditionalGeneration`` folder (see the module docstring); return it."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers import PreTrainedTokenizerFast

    folder = Path(tmpdir) / "tiny_llava"
    folder.mkdir(parents=True, exist_ok=True)
    texts = list(DEFAULT_TEXTS) + ["USER: <image>\nWhat is in the picture? ASSISTANT: a cat on a sofa"] * 10
    tok_dir = make_hf_tokenizer(
        folder / "_tok",
        texts,
        LLAVA_TEMPLATE,
        specials=("<|endoftext|>", "<s>", "</s>", "<image>"),
        bos_post_processor="<s>",
        config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|endoftext|>"},
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    text_config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=TOKENS_PER_IMAGE + (1 if select_strategy == "full" else 0),
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # larger than the default init so that a wrong wiring shows in the log-probs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder), safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=select_strategy,
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(folder))
    (folder / "fixture.json").write_text(json.dumps({"image_token_id": image_id, "vocab": vocab}))
    return folder


# --------------------------------------------------------------------------- image preference datasets
# (added by the data helper: TRL-format image preference files and built datasets for the other tests)

QUESTIONS = ("What is in the picture?", "Describe the image.", "What colour dominates?", "Is it outdoors?")


def write_vision_prefs(directory: Path | str, records: int = 8, k: int = 2, seed: int = 0) -> Path:
    """A preference file with real photographs, images as paths relative to it; returns the file.

    ``k == 2``: TRL's vision format (``images``, a conversational ``prompt`` with ``{"type": "image"}``
    parts, ``chosen``/``rejected`` assistant messages); ``k > 2``: the ``ranked`` format with the same
    prompt and ``k`` responses with distinct ``scores``. Every other record has two images.
    """
    import random

    d = Path(directory)
    photos = make_photo_files(d / "img")
    names = sorted(photos)
    rng = random.Random(seed)
    lines = []
    for i in range(records):
        n_img = 2 if i % 2 else 1
        imgs = [f"img/{photos[names[(i + j) % len(names)]].name}" for j in range(n_img)]
        parts = [{"type": "image"}] * n_img + [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        prompt = [{"role": "user", "content": parts}]
        answers = [f"{rng.choice(names)} number {rng.randint(0, 99)} " * rng.randint(1, 3) for _ in range(k)]
        answers = [f"{a}(answer {j})" for j, a in enumerate(answers)]
        if k == 2:
            row = {"images": imgs, "prompt": prompt,
                   "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answers[0]}]}],
                   "rejected": [{"role": "assistant", "content": answers[1]}]}
        else:
            row = {"images": imgs, "prompt": prompt, "responses": answers, "scores": [float(k - j) for j in range(k)]}
        lines.append(json.dumps(row))
    path = d / ("vision_prefs.jsonl" if k == 2 else f"vision_prefs_k{k}.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def build_vision_dataset(directory: Path | str, llava_dir: Path | str, records: int = 8, k: int = 2,
                         pack_tokens: int = 512, max_unit_tokens: int = 256) -> Path:
    """``write_vision_prefs`` built with ``--tokenizer``/``--image-processor`` ``llava_dir``; returns the
    dataset folder (``images.bin`` + ``meta.json["images"]``)."""
    from megatron_prefix.data.builder import BuildConfig, build_dataset
    from megatron_prefix.data.units import UnitConfig

    d = Path(directory)
    src = write_vision_prefs(d / "src", records=records, k=k)
    out = d / f"vision_ds_k{k}"
    cfg = BuildConfig(inputs=[str(src)], tokenizer=str(llava_dir), output=str(out),
                      units=UnitConfig(max_unit_tokens=max_unit_tokens, template_date="2026-01-01"),
                      pack_tokens=pack_tokens, image_processor=str(llava_dir))
    build_dataset(cfg, log=lambda _: None)
    return out
