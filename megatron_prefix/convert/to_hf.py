"""Our megatron checkpoint (any TP/PP, with or without optimizer) -> a Hugging Face safetensors checkpoint.

No model is built and no process group is needed: a dist_checkpointing (torch_dist) checkpoint is a
torch-DCP checkpoint whose tensors are global (TP/PP-independent), so its metadata gives every key's
global shape and dtype, and torch DCP loads one transformer layer at a time (a request for row ``i`` of
the stacked layer axis reads only the overlapping saved chunks). Peak memory is one layer plus one
output shard, whatever the model size. The inverse mapping of
``convert.layout`` gives the HF tensors, written as ``model-0000X-of-0000N.safetensors`` shards with
``model.safetensors.index.json`` and ``config.json``; tokenizer files are copied when given.

A reward model (``task: rm``; checkpoint keys ``output_layer.weight`` [1, h] and ``output_layer.bias``
[1]) becomes ``<Family>ForSequenceClassification`` with ``num_labels: 1`` and ``score.weight``. HF's
``score`` layer has no bias: a non-zero bias is refused unless ``reward_bias="drop"``, which exports
without it and records its value as ``reward_bias`` in config.json (every reward is shifted by that
constant; reward differences, hence Bradley-Terry / Plackett-Luce preferences and rankings, are
unchanged). Under the pairwise / listwise losses the bias gets no gradient, so it stays 0 in practice.

A LLaVA checkpoint (``model.vision`` in train_state.json) becomes ``LlavaForConditionalGeneration`` in the
key layout the installed transformers writes (``convert.llava``), with the tokenizer and processor files
of ``--tokenizer`` (or else of the HF folder it was converted from, when recorded and still present).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prefix.convert import llava
from megatron_prefix.convert.hf_files import ShardedWriter, copy_tokenizer, hf_config_dict
from megatron_prefix.convert.layout import (
    CKPT_LAYER_KEYS,
    GLOBAL_TABLE,
    HF_LAYER_PREFIX,
    LAYER_TABLE,
    REWARD_HEAD,
    HeadLayout,
    split_fc1,
    split_qkv,
)
from megatron_prefix.model.config import DTYPES, ModelConfig

REWARD_BIAS_MODES = ("refuse", "drop")


@dataclass
class CheckpointInfo:
    """What an export needs to know about a checkpoint before reading tensors."""

    path: Path
    cfg: ModelConfig
    task: str
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]]  # checkpoint key -> (global shape, dtype)
    reward: bool
    tied: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.meta["embedding.word_embeddings.weight"][1]


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """A checkpoint directory from a run dir (``latest``) or the checkpoint dir itself."""
    from megatron_prefix.training.checkpoint import resolve

    path = resolve(ckpt)
    if path is None or not path.is_dir():
        raise ValueError(f"--ckpt: {ckpt} holds no checkpoint (no `latest` marker, no train_state.json)")
    return path


def inspect_checkpoint(ckpt: str | Path) -> CheckpointInfo:
    """Read ``train_state.json`` and the tensor metadata; decide tied / reward; check the shapes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_prefix.compat.safe_metadata import install_safe_metadata_reader

    path = resolve_checkpoint(ckpt)
    state = json.loads((path / "train_state.json").read_text())
    if "model" not in state:
        raise ValueError(f"{path}/train_state.json: no `model` entry (the architecture) to export")
    cfg = ModelConfig(**state["model"])
    cfg.validate()
    install_safe_metadata_reader()  # .metadata is a pickle: admit only checkpoint metadata classes
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    meta = {k: (tuple(m.size), m.properties.dtype) for k, m in stored.items() if isinstance(m, TensorStorageMetadata)}
    task = state.get("task", "dpo")
    reward = "output_layer.bias" in meta or task == "rm"
    tied = not reward and "output_layer.weight" not in meta
    if tied != (bool(cfg.tie_word_embeddings) and not reward):
        raise ValueError(f"{path}: model.tie_word_embeddings={cfg.tie_word_embeddings} but the checkpoint "
                         f"{'has no' if tied else 'has an'} output_layer.weight")
    info = CheckpointInfo(path, cfg, task, meta, reward, tied)
    _check_shapes(info)
    if cfg.vision is not None:
        llava.check_vision_shapes(cfg, meta, path)
    return info


def _check_shapes(info: CheckpointInfo) -> None:
    cfg, meta = info.cfg, info.meta
    h, layout = cfg.hidden_size, HeadLayout.of(cfg)
    qkv_rows = layout.groups * (layout.q_per_group + 2) * layout.dim
    want = {
        "embedding.word_embeddings.weight": (cfg.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        CKPT_LAYER_KEYS["input_layernorm.weight"]: (cfg.num_layers, h),
        CKPT_LAYER_KEYS["self_attention.linear_qkv.weight"]: (cfg.num_layers, qkv_rows, h),
        CKPT_LAYER_KEYS["self_attention.linear_proj.weight"]: (cfg.num_layers, h, layout.heads * layout.dim),
        CKPT_LAYER_KEYS["pre_mlp_layernorm.weight"]: (cfg.num_layers, h),
        CKPT_LAYER_KEYS["mlp.linear_fc1.weight"]: (cfg.num_layers, 2 * cfg.ffn_hidden_size, h),
        CKPT_LAYER_KEYS["mlp.linear_fc2.weight"]: (cfg.num_layers, h, cfg.ffn_hidden_size),
    }
    if cfg.qkv_bias:
        want[CKPT_LAYER_KEYS["self_attention.linear_qkv.bias"]] = (cfg.num_layers, qkv_rows)
    if info.reward:
        want["output_layer.weight"] = (1, h)
    elif not info.tied:
        want["output_layer.weight"] = (cfg.vocab_size, h)
    for key, shape in want.items():
        if key not in meta:
            raise ValueError(f"{info.path}: checkpoint key {key!r} is missing")
        if meta[key][0] != shape:
            raise ValueError(f"{info.path}: {key} has shape {meta[key][0]}, the config "
                             f"(train_state.json `model`) implies {shape}")


def _block_planner(offsets: dict[str, tuple[int, ...]]):
    """A torch-DCP ``LoadPlanner`` filling plain tensors that are blocks of saved tensors at ``offsets``.

    DCP's default planner only loads whole tensors into plain tensors; this one asks, per key, for the
    block ``[offsets, offsets + target.shape)`` (DCP's resharding reads only the overlapping saved
    chunks) and copies into the target in place.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BlockLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            requests = []
            for fqn, target in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=target.size())
                requests += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(requests)

        def lookup_tensor(self, index) -> torch.Tensor:
            return self.state_dict[index.fqn]

    return BlockLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def _load(info: CheckpointInfo, keys: list[str], layer: int | None) -> dict[str, torch.Tensor]:
    """The global tensors ``keys`` (only row ``layer`` of the stacked layer axis when given)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    blocks, offsets = {}, {}
    for key in keys:
        shape, dtype = info.meta[key]
        if layer is None:
            blocks[key], offsets[key] = torch.empty(shape, dtype=dtype), (0,) * len(shape)
        else:
            blocks[key] = torch.empty((1, *shape[1:]), dtype=dtype)
            offsets[key] = (layer,) + (0,) * (len(shape) - 1)
    dcp_load(blocks, storage_reader=FileSystemReader(str(info.path)), planner=_block_planner(offsets), no_dist=True)
    return {key: block[0] if layer is not None else block for key, block in blocks.items()}


def hf_tensors(info: CheckpointInfo, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model in HF order, one layer in memory at a time."""
    from tqdm import tqdm

    cfg, layout = info.cfg, HeadLayout.of(info.cfg)
    yield GLOBAL_TABLE["embedding.word_embeddings.weight"][0], _load(info, ["embedding.word_embeddings.weight"],
                                                                       None)["embedding.word_embeddings.weight"]
    suffixes = [s for s in LAYER_TABLE if cfg.qkv_bias or not s.endswith(".bias")]
    for i in tqdm(range(cfg.num_layers), desc="megatron -> hf", unit="layer", disable=not progress):
        loaded = _load(info, [CKPT_LAYER_KEYS[s] for s in suffixes], i)
        prefix = HF_LAYER_PREFIX.format(i)
        for suffix in suffixes:
            tensor = loaded[CKPT_LAYER_KEYS[suffix]]
            names = [prefix + n for n in LAYER_TABLE[suffix][0]]
            if suffix.startswith("self_attention.linear_qkv."):
                parts = split_qkv(tensor, layout)
            elif suffix == "mlp.linear_fc1.weight":
                parts = split_fc1(tensor)
            else:
                parts = (tensor,)
            yield from zip(names, parts)
        if cfg.family == "qwen2" and not cfg.qkv_bias:  # HF Qwen2 always has QKV biases: export zeros
            for n, rows in (("q", layout.heads * layout.dim), ("k", layout.groups * layout.dim),
                            ("v", layout.groups * layout.dim)):
                yield prefix + f"self_attn.{n}_proj.bias", torch.zeros(rows, dtype=info.dtype)
    yield GLOBAL_TABLE["decoder.final_layernorm.weight"][0], _load(info, ["decoder.final_layernorm.weight"],
                                                                     None)["decoder.final_layernorm.weight"]
    if info.reward:
        yield REWARD_HEAD, _load(info, ["output_layer.weight"], None)["output_layer.weight"]
    elif not info.tied:
        yield GLOBAL_TABLE["output_layer.weight"][0], _load(info, ["output_layer.weight"], None)["output_layer.weight"]


def reward_bias(info: CheckpointInfo) -> float:
    """The scalar head's bias (0.0 when the checkpoint has none)."""
    if "output_layer.bias" not in info.meta:
        return 0.0
    return float(_load(info, ["output_layer.bias"], None)["output_layer.bias"].float().item())


def convert_mcore_to_hf(ckpt: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                        dtype: str | None = None, shard_size: int = 5 * 10**9, hf_config: str | Path | None = None,
                        reward_bias_mode: str = "refuse", progress: bool = True) -> Path:
    """Export the checkpoint ``ckpt`` (run dir or checkpoint dir) to the HF folder ``out_dir``; returns it.

    ``dtype`` (default: the checkpoint's) is the dtype written. ``hf_config``: a ``config.json`` (or its
    folder) whose token ids (``bos/eos/pad_token_id`` ...) are carried over; ids it does not set come
    from the tokenizer (``tokenizer`` or the one recorded for the checkpoint, see
    ``convert.token_ids``). Single process.
    """
    from megatron_prefix.convert.token_ids import read_hf_config, tokenizer_token_ids

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: must be one of {DTYPES}, got {dtype!r}")
    if reward_bias_mode not in REWARD_BIAS_MODES:
        raise ValueError(f"--reward-bias: must be one of {REWARD_BIAS_MODES}, got {reward_bias_mode!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty")
    base = read_hf_config(hf_config) if hf_config else None
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("convert_mcore_to_hf: run it as a single process (not under torchrun)")
    info = inspect_checkpoint(ckpt)
    torch_dtype = getattr(torch, dtype) if dtype else info.dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    vision = info.cfg.vision is not None
    if vision and info.reward:
        raise ValueError(f"{info.path}: a LLaVA reward model (task rm) has no Hugging Face class to export to "
                         "(transformers has no LlavaForSequenceClassification); the checkpoint itself stays "
                         "usable with checkpoint.load")
    if vision:  # LlavaForConditionalGeneration: the text model's config (and token ids) in text_config
        if base is None:  # default: the config.json of the LLaVA folder it was converted from, if still there
            src = llava.source_hf_dir(info.path)
            base = read_hf_config(src) if src is not None and (src / "config.json").is_file() else None
        config = llava.llava_config_dict(info.cfg, dtype_name, base=base)
        ids_into, ids_base = config["text_config"], (base or {}).get("text_config")
    else:
        config = hf_config_dict(info.cfg, dtype_name, reward=info.reward, base=base)
        ids_into, ids_base = config, base
    token_ids, _ = tokenizer_token_ids(resolve_checkpoint(ckpt), tokenizer)
    for key, value in token_ids.items():
        if not (ids_base and key in ids_base):
            ids_into[key] = value
    if info.reward:
        bias = reward_bias(info)
        if bias != 0.0 and reward_bias_mode == "refuse":
            raise ValueError(
                f"output_layer.bias: the reward head has bias {bias!r}, but Hugging Face's "
                "*ForSequenceClassification score layer has none. Rewards would all shift by this constant "
                "(preferences and rankings would not change): rerun with --reward-bias drop to export "
                "without it (its value is then recorded in config.json as `reward_bias`)"
            )
        config["reward_bias"] = bias
    writer = ShardedWriter(out, shard_size)
    tensors = hf_tensors(info, progress=progress)
    if vision:
        tensors = llava.all_hf_tensors(info.cfg.vision, tensors, lambda keys, layer: _load(info, keys, layer))
    for name, tensor in tensors:
        writer.add(name, tensor.to(torch_dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if vision:
        llava.copy_llava_files(tokenizer, resolve_checkpoint(ckpt), out)
    elif tokenizer:
        copy_tokenizer(tokenizer, out)
    return out
