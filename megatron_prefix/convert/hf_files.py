"""Hugging Face checkpoint files: a lazy safetensors reader, a sharded safetensors writer, ``config.json``.

- ``HFReader(dir)``: the tensors of ``model.safetensors`` / ``model.safetensors.index.json`` (any
  ``*.safetensors`` set), opened with ``safetensors.safe_open``; ``read(name, rows, cols)`` reads only
  the requested slice from disk (so a tensor-parallel rank never materialises the whole tensor).
  ``pytorch_model.bin`` checkpoints are refused (pickles; re-save them as safetensors).
- ``ShardedWriter(dir, max_shard_bytes)``: ``add(name, tensor)`` buffers and flushes shards of at most
  ``max_shard_bytes`` (a single larger tensor gets a shard of its own); ``close()`` names them
  ``model-0000X-of-0000N.safetensors`` and writes ``model.safetensors.index.json``.
- ``hf_config_dict(cfg, dtype, reward)``: the ``config.json`` of a ``ModelConfig`` (transformers 5
  ``rope_parameters`` / ``dtype`` plus the transformers 4 ``rope_theta`` / ``rope_scaling`` /
  ``torch_dtype`` keys, so that both read it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_prefix.digests import sha256_file  # noqa: F401 - re-exported for the converters
from megatron_prefix.model.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# config.json keys that do not describe the architecture (copied from a base config when given)
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout", "pretraining_tp")


class HFReader:
    """Lazy reader of the safetensors files of a Hugging Face checkpoint folder."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"--hf: {self.dir} is not a directory")
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        else:
            paths = sorted(self.dir.glob("*.safetensors"))
            if not paths:
                found = [p.name for p in self.dir.glob("*.bin")]
                hint = f" (found {found}: re-save with safe_serialization=True)" if found else ""
                raise ValueError(f"--hf: no *.safetensors weights in {self.dir}{hint}")
            self.files = {}
            for path in paths:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        self.files[name] = path
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        if name not in self.files:
            raise ValueError(f"--hf: tensor {name!r} is missing from {self.dir}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self._slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor ``name`` (or its ``[rows]`` / ``[:, cols]`` slice), read from disk."""
        sl = self._slice(name)
        if rows is None and cols is None:
            return sl[:]
        if cols is None:
            return sl[rows]
        return sl[rows if rows is not None else slice(None), cols]


class ShardedWriter:
    """Writes ``model-0000X-of-0000N.safetensors`` shards and their index, in the order tensors are added."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 10**9):
        if max_shard_bytes <= 0:
            raise ValueError(f"--shard-size: must be positive, got {max_shard_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        number = len(self._shards) + 1
        save_file(self._buffer, str(self.dir / f"shard-{number:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, rename the shards to their final names, write the index; returns the shard paths."""
        self._flush()
        total, weight_map, paths = len(self._shards), {}, []
        for i, names in enumerate(self._shards, start=1):
            final = self.dir / f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.dir / f"shard-{i:05d}.tmp").replace(final)
            paths.append(final)
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths


def _rope_blocks(cfg: ModelConfig) -> tuple[dict, dict | None]:
    """(transformers 5 ``rope_parameters``, transformers 4 ``rope_scaling``) of ``cfg``."""
    s = cfg.rope_scaling
    if s.type == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}, None
    if s.type == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s.type == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    else:
        raise ValueError(f"model.rope_scaling.type: {s.type!r} cannot be exported")
    return {**scaling, "rope_theta": cfg.rope_theta}, dict(scaling)


def hf_config_dict(cfg: ModelConfig, dtype: str, reward: bool = False, base: dict | None = None) -> dict:
    """``config.json`` for ``cfg`` (``*ForCausalLM``, or ``*ForSequenceClassification`` with one label).

    ``base`` (e.g. the source model's config.json) contributes only ``PASSTHROUGH_KEYS`` (token ids ...).
    """
    family = cfg.family
    if family not in ARCHITECTURES:
        raise ValueError(f"model.family: {family!r} cannot be exported (supported: {sorted(ARCHITECTURES)})")
    if cfg.qkv_bias and family != "qwen2":
        raise ValueError(f"model.qkv_bias: {family} in transformers has no QKV-only bias (only qwen2 does)")
    rope_parameters, rope_scaling = _rope_blocks(cfg)
    head = "ForSequenceClassification" if reward else "ForCausalLM"
    out: dict = {
        "architectures": [ARCHITECTURES[family] + head],
        "model_type": family,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings) and not reward,
        "rope_parameters": rope_parameters,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "dtype": dtype,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)
    else:  # mistral
        out.update(sliding_window=None)
    if reward:
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    for key in PASSTHROUGH_KEYS:
        if base and key in base:
            out[key] = base[key]
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` to ``dst``; raises if there is none."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"--tokenizer: {src} is not a directory")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if not copied:
        raise ValueError(f"--tokenizer: {src} holds none of {', '.join(TOKENIZER_FILES)}")
    return copied
