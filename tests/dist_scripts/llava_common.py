"""Helpers shared by ``tests/test_llava_model.py``, ``tests/test_llava_convert.py`` and ``llava_parity.py``.

- ``sample(folder)``: one ``[prompt with two real photographs + response]`` sequence made by the HF
  ``LlavaProcessor`` of a tiny LLaVA (``tests.llava_fixtures.make_tiny_llava``): token ids [L], the
  prompt length, pixel values [2, 3, 28, 28] (skimage photographs, CLIP-preprocessed);
- ``hf_logits(folder, ids, pixels)``: ``LlavaForConditionalGeneration`` on it (fp32, eager) [L, V];
- ``micro_batch(ids, prompt_len, image_token_id, pixels=...)``: the sequence as a ``Unit`` with its
  images, packed alone into one row by the data pipeline (``pack_row``, ``MicroBatch.from_rows``:
  positions 0..L-1, one document, i.e. plain causal attention; padding to a multiple of 8), and its
  ``image_feature_index`` (the k-th image token reads feature row k: image-major order);
- ``our_logits(model, ...)``: our model on that row through ``MicroBatch.forward`` (this CP rank's
  slice of the tokens and of ``image_feature_index``), logits gathered over TP and CP, [L, V] on the
  last pipeline stage (stages pass hidden states with send/recv), None elsewhere;
- ``load_llava(run_dir)``: ``SharedPrefixLLaVAModel`` at the current parallel layout, loaded.

Only ``sample`` / ``hf_logits`` import transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

PROMPT = "USER: <image>\n<image>\nWhat is in the pictures? ASSISTANT:"
RESPONSE = " an astronaut and a cup of coffee</s>"
PHOTOS = ("astronaut", "coffee")


def image_token_id(folder: str | Path) -> int:
    return int(json.loads((Path(folder) / "config.json").read_text())["image_token_index"])


def sample(folder: str | Path, photos: tuple[str, ...] = PHOTOS) -> dict:
    """``{"ids": [L] int64, "prompt_len": int, "pixels": [N, 3, H, W] fp32}`` (see the module docstring)."""
    from transformers import AutoProcessor

    from tests.llava_fixtures import photographs

    processor = AutoProcessor.from_pretrained(str(folder))
    images = list(photographs(photos).values())
    prompt = PROMPT if len(photos) == 2 else PROMPT.replace("<image>\n", "", 2 - len(photos))
    enc = processor(images=images, text=prompt, return_tensors="pt")
    response = processor.tokenizer(RESPONSE, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.cat([enc["input_ids"][0], response]).long()
    return {"ids": ids, "prompt_len": int(enc["input_ids"].shape[1]), "pixels": enc["pixel_values"].float()}


@torch.no_grad()
def hf_logits(folder: str | Path, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return model(input_ids=ids[None], pixel_values=pixels).logits[0].float()


def feature_index(tokens_bs: torch.Tensor, image_token: int) -> torch.Tensor:
    """[b, s] int64: -1, or the running count of image tokens (row-major) at image tokens."""
    mask = tokens_bs == image_token
    index = torch.full(tokens_bs.shape, -1, dtype=torch.long)
    index[mask] = torch.arange(int(mask.sum()))
    return index


def micro_batch(ids: torch.Tensor, prompt_len: int, image_token: int, cp_size: int = 1, cp_rank: int = 0,
                pixels: torch.Tensor | None = None):
    """(MicroBatch of the sequence packed alone, image_feature_index [1, T/cp]) for one CP rank.

    With ``pixels`` the unit carries its images and the index is the data pipeline's
    (``MicroBatch.image_feature_index``); without, it is ``feature_index`` of the tokens.
    """
    from megatron_prefix.attention.context_parallel import split_for_cp
    from megatron_prefix.data.row import pack_row
    from megatron_prefix.data.unit import Unit
    from megatron_prefix.model.batch import MicroBatch

    a = ids.numpy()
    images = None if pixels is None else pixels.numpy().astype(np.float32)
    unit = Unit(a[:prompt_len], [a[prompt_len:]], np.zeros(1, dtype=np.float32), unit_id=0, images=images,
                image_token_id=image_token if images is not None else None)
    row = pack_row([unit], -(-len(a) // 8) * 8, pad_id=0)  # padded at the end
    mb = MicroBatch.from_rows([row], cp_size, cp_rank)
    if pixels is not None:
        return mb, mb.image_feature_index
    full_index = feature_index(torch.from_numpy(row.tokens.astype(np.int64))[None], image_token)
    return mb, split_for_cp(full_index, cp_size, cp_rank)


@torch.no_grad()
def our_logits(model, ids: torch.Tensor, prompt_len: int, pixels: torch.Tensor, image_token: int,
               index: torch.Tensor | None = None) -> torch.Tensor | None:
    """[L, V] fp32 logits (full vocabulary) of our model; None off the last pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    mb, _ = micro_batch(ids, prompt_len, image_token, cp, cp_rank, pixels=pixels)
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if pp_rank > 0:
        hidden = torch.empty(mb.tokens.shape[1], 1, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    if index is None:  # the data pipeline's batch: MicroBatch.forward passes pixel_values / image_feature_index
        out = mb.forward(model)
    else:
        out = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.params, pixel_values=pixels,
                    image_feature_index=index)
    if pp_rank < pp - 1:  # (no sequence parallelism with PP here: the buffers are full-sequence)
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    logits = gather_from_tensor_model_parallel_region(out)[:, 0].float()  # [T/cp, V]
    if cp > 1:  # put every CP rank's positions back in row order
        from megatron_prefix.attention.context_parallel import local_positions

        t = logits.shape[0] * cp
        parts = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_context_parallel_group())
        full = torch.empty(t, logits.shape[1])
        for r, part in enumerate(parts):
            full[local_positions(t, cp, r)] = part
        logits = full
    return logits[: len(ids)]


def load_llava(run_dir: str | Path, sequence_parallel: bool = False, **cfg_overrides):
    """``SharedPrefixLLaVAModel`` (dense attention) at the current parallel layout, loaded from ``run_dir``."""
    from megatron.core import dist_checkpointing

    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.training.checkpoint import resolve

    path = resolve(run_dir)
    data = json.loads((path / "train_state.json").read_text())["model"]
    cfg = ModelConfig(**{**data, **cfg_overrides})
    model = build_model(cfg, "dense", impl="local", sequence_parallel=sequence_parallel)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max())


# ---------------------------------------------------------------------------- HF key layouts

def _hub(name: str) -> str:
    """transformers 5 name -> the Hub llava-hf layout (``vision_tower.vision_model.*``)."""
    return "vision_tower.vision_model." + name[len("vision_tower."):] if name.startswith("vision_tower.") else name


def _v4(name: str) -> str:
    """transformers 5 name -> the transformers 4.5x layout (``model.language_model.*``, ``lm_head.weight`` ...)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + name[len("vision_tower."):]
    return "model." + name


LAYOUTS = {"tf5": None, "hub": _hub, "v4": _v4}


def relayout(src: str | Path, dst: str | Path, layout: str) -> Path:
    """A copy of the HF folder ``src`` whose safetensors use the key ``layout`` (``LAYOUTS``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    rename = LAYOUTS[layout]
    if rename is not None:
        for path in dst.glob("*.safetensors"):
            tensors = load_file(str(path))
            save_file({rename(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        index = dst / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))
    return dst


def safetensors_of(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def bit_identical_report(src: str | Path, dst: str | Path) -> str | None:
    """None when both folders hold the same tensor names, dtypes and values; else what differs."""
    a, b = safetensors_of(src), safetensors_of(dst)
    if sorted(a) != sorted(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:8]}"
    for name in a:
        if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name]):
            return f"{name}: differs after the round trip"
    return None


def make_qwen2_llava(llama_llava: str | Path, dst: str | Path, seed: int = 3) -> Path:
    """A LLaVA with a qwen2 language model (QKV biases, perturbed), from the tiny llama LLaVA's folder
    (same tower sizes, tokenizer and processor files); saved by transformers like ``make_tiny_llava``."""
    import shutil

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    src, dst = Path(llama_llava), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "config.json"))
    hf = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in hf["text_config"].items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    text.update(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                use_sliding_window=False)
    config = LlavaConfig(**{**{k: v for k, v in hf.items() if k not in ("text_config", "architectures",
                                                                            "transformers_version")},
                            "text_config": text})
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


def tokenizer_ids(folder: str | Path, text: str) -> list[int]:
    """Token ids of ``text`` by the LLaVA folder's tokenizer (no special tokens added)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"]
