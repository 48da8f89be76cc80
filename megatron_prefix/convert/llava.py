"""LLaVA parts of the converters (``to_mcore`` / ``to_hf`` dispatch here when ``ModelConfig.vision`` is set).

- HF -> megatron: ``hf_views(dir)`` gives the language-model view (the text converter reads it as a
  llama / qwen2 checkpoint) and the vision view; ``check_vision_tensors`` refuses missing or unknown
  vision tensors; ``fill_vision_from_hf`` copies this rank's shards into ``vision_model`` /
  ``vision_projection`` (first pipeline stage only).
- megatron -> HF: ``vision_hf_tensors(info, load)`` streams the tower one layer at a time;
  ``llava_config_dict`` writes a ``LlavaForConditionalGeneration`` ``config.json`` (``text_config`` is
  the text exporter's config); ``copy_processor_files`` copies the tokenizer and processor files.

Names and layouts: ``convert.llava_layout``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_prefix.convert.hf_files import PASSTHROUGH_KEYS, hf_config_dict
from megatron_prefix.convert.llava_layout import (
    VISION_GLOBAL,
    VISION_LAYER,
    VISION_LAYER_PARAM,
    RenamedReader,
    expected_vision_names,
    llava_name,
    llava_views,
    read_vision_shard,
    vision_ckpt_layer_key,
    vision_shapes,
    vision_to_hf,
)
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.model.vision_config import VisionConfig

VISION_PREFIXES = ("vision_model.", "vision_projection.")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "special_tokens_map.json")
PROCESSOR_GLOBS = ("tokenizer*", "chat_template*")


def hf_views(reader) -> tuple[RenamedReader, RenamedReader]:
    """(language-model view, vision view) of a LLaVA ``HFReader`` (any key layout)."""
    return llava_views(reader)


def check_vision_tensors(reader: RenamedReader, vision: VisionConfig) -> None:
    """Refuse missing vision / projector tensors, or ones this mapping would silently drop."""
    expected, present = set(expected_vision_names(vision)), set(reader.names())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"--hf: {len(missing)} vision tensors missing from {reader.dir}, e.g. {missing[:5]}")
    extra = sorted(present - expected)
    if extra:
        raise ValueError(f"--hf: {len(extra)} tensors have no megatron counterpart (not a CLIP tower + MLP "
                         f"projector LLaVA?), e.g. {extra[:5]}")


def fill_vision_from_hf(model: torch.nn.Module, reader: RenamedReader, vision: VisionConfig, tp: int,
                        tp_rank: int) -> int:
    """Copy this rank's shard of every vision / projector parameter; returns how many were filled."""
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(VISION_PREFIXES)]
    with torch.no_grad():
        for name, p in params:
            shard = read_vision_shard(reader, name, vision, tp, tp_rank)
            if tuple(shard.shape) != tuple(p.shape):
                raise ValueError(f"{name}: the Hugging Face tensors give shape {tuple(shard.shape)} on tp rank "
                                 f"{tp_rank}, the model expects {tuple(p.shape)} (config.json does not match?)")
            p.copy_(shard.to(p.dtype))
    return len(params)


# ---------------------------------------------------------------------------- export


def check_vision_shapes(cfg: ModelConfig, meta: dict, where: Path) -> None:
    """The checkpoint's vision keys have the shapes ``cfg.vision`` implies."""
    for key, shape in vision_shapes(cfg.vision, cfg.hidden_size).items():
        if key not in meta:
            raise ValueError(f"{where}: checkpoint key {key!r} is missing (model.vision is set in train_state.json)")
        if tuple(meta[key][0]) != shape:
            raise ValueError(f"{where}: {key} has shape {meta[key][0]}, model.vision implies {shape}")


def vision_hf_tensors(vision: VisionConfig, load: Callable[[list[str], int | None], dict]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the tower and projector; ``load(keys, layer)`` reads checkpoint keys."""
    names = list(VISION_GLOBAL)
    loaded = load(names, None)
    for name in names:
        yield from vision_to_hf(name, loaded[name], vision)
    suffixes = list(VISION_LAYER)
    for i in range(vision.num_layers):
        keys = {s: vision_ckpt_layer_key(s) for s in suffixes}
        layer = load(list(keys.values()), i)
        for s in suffixes:
            yield from vision_to_hf(VISION_LAYER_PARAM.format(i) + s, layer[keys[s]], vision)


def llava_config_dict(cfg: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    """``config.json`` of a ``LlavaForConditionalGeneration`` for ``cfg`` (``cfg.vision`` set).

    ``base`` (the source LLaVA config.json) contributes its token ids (``hf_files.PASSTHROUGH_KEYS``, at
    the top level and in ``text_config``).
    """
    v = cfg.vision
    text = hf_config_dict(cfg, dtype, base=(base or {}).get("text_config"))
    for key in ("architectures", "dtype", "torch_dtype"):
        text.pop(key, None)
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
        "attention_dropout": 0.0,
    }
    if base and isinstance(base.get("vision_config"), dict) and "projection_dim" in base["vision_config"]:
        vision["projection_dim"] = base["vision_config"]["projection_dim"]
    out = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": v.image_token_id,
        "image_seq_length": v.tokens_per_image,
        "projector_hidden_act": v.projector_hidden_act,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": v.select_strategy,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    for key in PASSTHROUGH_KEYS:  # top-level token ids of the source (llava-1.5 keeps pad_token_id there)
        if base and key in base:
            out[key] = base[key]
    return out


def copy_processor_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer and image-processor files of a LLaVA folder (``tokenizer*``, ``chat_template*``,
    ``processor_config.json``, ``preprocessor_config.json``, ``special_tokens_map.json``,
    ``generation_config.json``); returns the names copied."""
    src, dst = Path(src), Path(dst)
    names = {p.name for pattern in PROCESSOR_GLOBS for p in src.glob(pattern) if p.is_file()}
    names |= {n for n in (*PROCESSOR_FILES, "generation_config.json") if (src / n).is_file()}
    for name in sorted(names):
        shutil.copy2(src / name, dst / name)
    return sorted(names)




def all_hf_tensors(vision: VisionConfig, text_tensors: Iterator[tuple[str, torch.Tensor]],
                   load: Callable[[list[str], int | None], dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole LLaVA in HF names: the text exporter's tensors renamed into ``language_model.*``,
    then the tower and projector."""
    for name, tensor in text_tensors:
        yield llava_name(name), tensor
    yield from vision_hf_tensors(vision, load)


def source_hf_dir(ckpt_path: Path, hops: int = 5) -> Path | None:
    """The HF folder a checkpoint was converted from: ``source.hf_dir`` of its train_state.json, or of the
    checkpoint its training run loaded (``config.checkpoint.load``, followed a few hops); None if unknown."""
    from megatron_prefix.training.checkpoint import resolve

    path: Path | None = Path(ckpt_path)
    for _ in range(hops):
        state_file = path / "train_state.json" if path else None
        if state_file is None or not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        hf_dir = (state.get("source") or {}).get("hf_dir")
        if hf_dir:
            return Path(hf_dir)
        load = (((state.get("config") or {}).get("checkpoint") or {}).get("load"))
        path = resolve(load) if load else None
    return None


def copy_llava_files(tokenizer: str | Path | None, ckpt_path: Path, out: Path) -> list[str]:
    """Copy the tokenizer and processor files from ``--tokenizer``, else from the source HF folder;
    says so on stderr when there is none (the weights alone load, but ``AutoProcessor`` would not)."""
    if tokenizer:
        if not Path(tokenizer).is_dir():
            raise ValueError(f"--tokenizer: {tokenizer} is not a directory")
        copied = copy_processor_files(tokenizer, out)
        if not copied:
            raise ValueError(f"--tokenizer: {tokenizer} holds no tokenizer or processor files")
        return copied
    src = source_hf_dir(ckpt_path)
    if src is not None and src.is_dir():
        return copy_processor_files(src, out)
    print(f"convert_mcore_to_hf: note: no tokenizer / processor files copied to {out} (the source LLaVA folder "
          f"{src or '(not recorded)'} is not available); pass --tokenizer HF_LLAVA_DIR to copy them",
          file=sys.stderr)
    return []
